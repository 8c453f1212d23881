"""A persistent static KV cache that `generate()` reuses call after call.

Tensors are allocated once (zeros, so masked slots are finite) and only written in place, so a
captured CUDA graph sees the same addresses on every call. All sequences of a batch write the same
slot at each step (HF left-pads prompts); `kv_valid` records, per sequence, which slots are real
tokens. A call with fewer sequences than `max_batch_size` uses the first rows; the decode step runs a
power-of-two number of rows, so one graph serves every batch size of its bucket.
"""

import torch
from transformers import Cache, DynamicCache


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
        return min(self.max_batch_size, 1 << (batch_size - 1).bit_length())

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
