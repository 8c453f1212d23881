"""A persistent static KV cache that `generate()` reuses call after call.

Tensors are allocated once (zeros, so masked slots are finite) and only written in place, so a
captured CUDA graph sees the same addresses on every call. All sequences of a batch write the same
slot at each step (HF left-pads prompts); `kv_valid` records, per sequence, which slots are real
tokens. A call with fewer sequences than `max_batch_size` uses the first rows; the decode step runs a
power-of-two number of rows, so one graph serves every batch size of its bucket.

The cache keeps its own books: `begin_prefill` / `end_prefill` around a prompt, `advance` after decode steps
(whose graphs move the device's `write_pos` themselves), `reset` between calls; nothing else writes its counters.
`PersistentCache` sizes it for a model and grows it.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from .graphs import outside_inference_mode

LENGTH_ROUNDING = 256  # automatic cache lengths are 256 slots times a power of two (a bounded set of sizes)


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class PrefillSpan:
    """The slots a prefill writes: rows [0, batch), slots [start, end); `key_valid` [batch, end] marks the slots
    holding real tokens, None when attention may read the new keys alone (no padding, nothing cached before)."""

    batch: int
    start: int
    end: int
    key_valid: torch.Tensor | None


class Qwen3StaticCache(Cache):
    """Static KV cache: per-layer `[max_batch_size, max_cache_len, kv_heads, head_dim]` keys and values."""

    is_compileable = False  # our model builds its own masks: HF must pass the plain 2-D attention mask

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        max_cache_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layers = []  # HF's per-layer objects are not used: this cache owns its tensors directly
        self._max_batch_size = max_batch_size
        self._max_cache_len = max_cache_len
        shape = (max_batch_size, max_cache_len, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.kv_valid = torch.zeros((max_batch_size, max_cache_len), dtype=torch.bool, device=device)
        self.seq_start = torch.zeros((max_batch_size,), dtype=torch.int32, device=device)  # first real slot
        self.write_pos = torch.zeros((1,), dtype=torch.long, device=device)  # next slot, on the device
        self.seq_length = 0  # the same number on the host, so the host never reads the device
        self.batch_size_in_use = 0
        for t in (*self.keys, *self.values, self.kv_valid, self.seq_start, self.write_pos):
            torch._dynamo.mark_static_address(t)

    def begin_prefill(self, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None) -> PrefillSpan:
        """Room for `seq_len` new tokens of `batch_size` rows after what is cached; records which are real."""
        self.check_room(batch_size, seq_len)
        start, end = self.seq_length, self.seq_length + seq_len
        padded = attention_mask is not None and not bool(attention_mask.all())
        self.kv_valid[:batch_size, start:end] = attention_mask[:, -seq_len:].bool() if attention_mask is not None \
            else True
        key_valid = self.kv_valid[:batch_size, :end] if (padded or start > 0) else None
        return PrefillSpan(batch_size, start, end, key_valid)

    def write_prefill(self, layer: int, span: PrefillSpan, keys: torch.Tensor, values: torch.Tensor):
        """Store a layer's new keys and values [B, L, kv_heads, D]; returns those attention reads (every cached
        slot of the rows, or the new ones alone when `span.key_valid` is None)."""
        self.keys[layer][: span.batch, span.start : span.end] = keys
        self.values[layer][: span.batch, span.start : span.end] = values
        if span.key_valid is None:
            return keys, values
        return self.keys[layer][: span.batch, : span.end], self.values[layer][: span.batch, : span.end]

    def end_prefill(self, span: PrefillSpan) -> None:
        """The prefill is in: the next token goes to slot `span.end`; each row starts at its first real slot."""
        self.seq_length = span.end
        self.batch_size_in_use = span.batch
        self.write_pos.fill_(span.end)
        self.seq_start[: span.batch] = self.kv_valid[: span.batch, : span.end].int().argmax(dim=1).int()

    def advance(self, steps: int) -> None:
        """`steps` decode steps ran (each wrote one slot per row and moved `write_pos` on the device)."""
        self.seq_length += steps

    def reset(self) -> None:
        """Forget every sequence; tensors keep their addresses."""
        self.kv_valid.zero_()
        self.seq_start.zero_()
        self.write_pos.zero_()
        self.seq_length = 0
        self.batch_size_in_use = 0

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        """Raise a clear error when `new_tokens` more tokens for `batch_size` sequences do not fit."""
        if batch_size > self.max_batch_size:
            raise ValueError(
                f"batch of {batch_size} sequences exceeds the KV cache's max_batch_size={self.max_batch_size}; "
                "pass a larger max_batch_size to qwen3_accel.optimize"
            )
        if self.batch_size_in_use and batch_size != self.batch_size_in_use:
            raise ValueError(
                f"this cache holds {self.batch_size_in_use} sequences; got {batch_size}. Call reset() first"
            )
        if self.seq_length + new_tokens > self.max_cache_len:
            raise ValueError(
                f"{self.seq_length} cached + {new_tokens} new tokens exceed the KV cache's "
                f"max_cache_len={self.max_cache_len}; pass a larger max_cache_len to qwen3_accel.optimize"
            )

    def to_dynamic(self, config) -> DynamicCache:
        """A copy of what this cache holds as HF's `DynamicCache` (layout [B, kv_heads, T, head_dim]), for a caller
        who keeps it beyond the next `generate()` (which resets this cache)."""
        copy = DynamicCache(config=config)
        rows, length = self.batch_size_in_use, self.seq_length
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            layer_keys, layer_values = keys[:rows, :length].transpose(1, 2), values[:rows, :length].transpose(1, 2)
            copy.update(layer_keys.clone(), layer_values.clone(), layer)
        return copy

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    def decode_rows(self, batch_size: int) -> int:
        """Rows a decode step runs for `batch_size` sequences: the next power of two, at most max_batch_size."""
        return min(self.max_batch_size, next_power_of_two(batch_size))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len

    @property
    def batch_size(self) -> int:
        return self.batch_size_in_use

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "Qwen3StaticCache supports greedy and sampled decoding; beam search and assisted decoding use "
            "HF's own cache (qwen3_accel's generate() falls back to it automatically)"
        )

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


@dataclass(frozen=True)
class CacheLayout:
    """What one cache slot holds for a model: layers x kv_heads x head_dim in `dtype` on `device`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class PersistentCache:
    """The one KV cache of an optimized model, kept from call to call.

    Unset limits size it to the first call (the length rounded up to 256 slots times a power of two, rows to a
    power of two) and grow it, with a warning, when a later call needs more; a set limit is a hard one. Growth
    re-allocates, so `on_realloc` drops whatever captured the old tensors (the CUDA graphs) first.
    """

    def __init__(self, layout: CacheLayout, max_positions: int, max_batch_size: int | None,
                 max_cache_len: int | None, on_realloc: Callable[[], None]):
        self.layout = layout
        self.max_positions = max_positions
        self.fixed = {"max_batch_size": max_batch_size, "max_cache_len": max_cache_len}
        self.on_realloc = on_realloc
        self.current: Qwen3StaticCache | None = None

    def for_call(self, batch_size: int, total_len: int) -> Qwen3StaticCache:
        """The cache, reset, with room for `batch_size` sequences of `total_len` tokens."""
        if total_len > self.max_positions:
            raise ValueError(f"prompt + new tokens = {total_len} exceeds the model's {self.max_positions} positions")
        for name, need in (("max_batch_size", batch_size), ("max_cache_len", total_len)):
            fixed = self.fixed[name]
            if fixed is not None and need > fixed:
                raise ValueError(
                    f"this call needs {name}={need} but the KV cache was fixed at {fixed} by qwen3_accel.optimize"
                )
        cache = self.current
        if cache is None or batch_size > cache.max_batch_size or total_len > cache.max_cache_len:
            self._allocate(max(batch_size, cache.max_batch_size if cache else 0),
                           max(total_len, cache.max_cache_len if cache else 0))
        self.current.reset()
        return self.current

    def _allocate(self, batch_size: int, total_len: int) -> None:
        new_batch = self.fixed["max_batch_size"] or next_power_of_two(batch_size)
        new_len = self.fixed["max_cache_len"] or min(
            self.max_positions, LENGTH_ROUNDING * next_power_of_two(-(-total_len // LENGTH_ROUNDING)))
        old = self.current
        if old is not None:
            warnings.warn(
                f"growing the KV cache from {old.max_batch_size}x{old.max_cache_len} to {new_batch}x{new_len}; the "
                "decode step's CUDA graph is recorded again. Pass max_batch_size/max_cache_len to "
                "qwen3_accel.optimize to size it once.",
                stacklevel=4,
            )
        self.current = old = None  # drop the old tensors (and the graphs that captured them) first
        self.on_realloc()
        layout = self.layout
        with outside_inference_mode():
            self.current = Qwen3StaticCache(layout.num_layers, new_batch, new_len, layout.num_kv_heads,
                                            layout.head_dim, layout.dtype, layout.device)
