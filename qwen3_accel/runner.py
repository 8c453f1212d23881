"""The model runner: runs an optimized model's forward on our kernels.

It owns what a forward needs: the typed weights (weights.py), the kernels, the RoPE table, the persistent KV cache
and the compiled decode steps. Its steps, in the order a request meets them:

  embed -> prefill (a prompt, or steps over HF's DynamicCache) -> logits
        -> decode (one token per row on our cache, HF's loop)  or  fast_step (the fast loop's whole step)

`decode` and `fast_step` replay CUDA graphs, one per graph key: ("decode", rows, cache rows, cache length) for
HF's loop and ("fast", rows, cache rows, cache length, do_sample) for the fast loop; rows is a power of two up to
the cache's max_batch_size, so the set is bounded (at most 3 graphs per batch bucket of the current cache).
Who calls which step is decided in router.py; the fast loop itself is fast_generate.py.
"""

import collections

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import decoder, parallel
from .cache import CacheLayout, PersistentCache, Qwen3StaticCache
from .custom_ops import select_kernels
from .fast_generate import FastDecodeState, pick
from .graphs import CompiledSteps, outside_inference_mode
from .speculative import Speculator
from .weights import DecoderWeights, build_weights


PAGED_GRAPH_POOLS = 2  # KV pool shapes whose engine decode graphs are kept (each set holds its CUDA graphs)


class ModelRunner:
    """Prefill, the decode steps, embed and logits of one optimized model, with its cache and compiled steps."""

    def __init__(self, model: torch.nn.Module, options, tp: parallel.SingleDevice):
        self.tp = tp
        self.compile = options.compile
        self.decode_linear_mode = options.decode_linear
        self.hidden_size = model.config.hidden_size
        self.device = model.lm_head.weight.device
        self.kernels = select_kernels(options.kernels, self.device, options.attention)
        self.weights: DecoderWeights = build_weights(model)
        self.scale = model.model.layers[0].self_attn.scaling
        self.cos_sin = decoder.rope_table(model, model.config.max_position_embeddings)
        shape = self.weights.shape
        layout = CacheLayout(shape.num_layers, shape.num_kv_heads, shape.head_dim, model.lm_head.weight.dtype,
                             self.device)
        self.cache = PersistentCache(layout, model.config.max_position_embeddings, options.max_batch_size,
                                     options.max_cache_len, on_realloc=self.drop_graphs)
        self.decode_steps = CompiledSteps(self.decode_step, options.compile)
        self.fast_steps = CompiledSteps(self.fast_step, options.compile)
        self.fast_states: dict[tuple[int, int], FastDecodeState] = {}
        # The continuous-batching engine's (serving/engine.py): graphs by KV pool shape off CUDA, the last
        # two kept, and the size of the last pool sized by free memory (a later one reuses it when it still fits).
        self.paged_graphs: collections.OrderedDict[tuple[int, ...], "PagedGraphs"] = collections.OrderedDict()
        self.default_pool_blocks: int | None = None
        # Speculative decoding (speculative.py): the last assistant's and prompt lookup's pools and graphs.
        self.speculators: dict[str, Speculator] = {}

    # ------------------------------------------------------------------------------------ cache and graphs
    def cache_for(self, batch_size: int, total_len: int) -> Qwen3StaticCache:
        """The persistent cache, reset, with room for `batch_size` sequences of `total_len` tokens."""
        return self.cache.for_call(batch_size, total_len)

    def drop_graphs(self) -> None:
        """Forget every compiled step and the fast loop's buffers (the cache they captured is re-allocated)."""
        self.decode_steps.clear()
        self.fast_steps.clear()
        self.fast_states.clear()

    def paged_graphs_for(self, pool_shape: tuple[int, ...]) -> "PagedGraphs":
        """The continuous-batching engine's graphs for a KV pool of this shape. Off CUDA they are kept for the
        engines of this model one after another (each HF `generate_batch` builds one), which then compile nothing.
        On CUDA each engine gets its own: a new pool's addresses make cudagraph trees record each graph again as one
        more node, and the old ones (their outputs in the graph pool, e.g. logits of 128 rows x 152k vocabulary)
        stay, so sharing across engines would grow memory with every engine."""
        if self.device.type == "cuda":
            return PagedGraphs(self)
        if pool_shape not in self.paged_graphs:
            self.paged_graphs[pool_shape] = PagedGraphs(self)
            while len(self.paged_graphs) > PAGED_GRAPH_POOLS:
                self.paged_graphs.popitem(last=False)  # the oldest shape's graphs go
        self.paged_graphs.move_to_end(pool_shape)
        return self.paged_graphs[pool_shape]

    def speculator(self, draft: "ModelRunner | None") -> Speculator:
        """Speculative decoding with this draft runner (None: prompt lookup); a new assistant replaces the last
        one's pools and graphs."""
        role = "lookup" if draft is None else "assistant"
        current = self.speculators.get(role)
        if current is None or current.draft is not draft:
            self.speculators.pop(role, None)
            self.speculators[role] = Speculator(self, draft)
        return self.speculators[role]

    def graph_count(self) -> int:
        return len(self.decode_steps) + len(self.fast_steps)

    def fast_state(self, rows: int, max_len: int) -> FastDecodeState:
        """The fast loop's static buffers for a batch bucket (allocated once per bucket and cache size)."""
        key = (rows, max_len)
        if key not in self.fast_states:
            with outside_inference_mode():
                self.fast_states[key] = FastDecodeState(rows, max_len, self.device)
        return self.fast_states[key]

    # ----------------------------------------------------------------------------------------------- steps
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (this rank's vocabulary rows summed over ranks under tensor parallelism)."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weights.embed)
        return self.tp.embed(self.weights.embed, input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (every rank's vocabulary slice gathered under tensor parallelism)."""
        head = self.weights.lm_head
        if self.tp.world_size == 1:
            return F.linear(hidden, head.weight, head.bias)
        return self.tp.gather_last_dim(F.linear(hidden, head.weight))

    def prefill(self, cache: Qwen3StaticCache | DynamicCache | None, embeds: torch.Tensor,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Eager forward over new tokens (a prompt, or steps on HF's DynamicCache); extends `cache` when given.
        Returns the final-normed hidden states [B, L, H]."""
        batch, seq_len = embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=embeds.device) + past)[None].expand(batch, seq_len)
        span = None
        if isinstance(cache, Qwen3StaticCache):
            span = cache.begin_prefill(batch, seq_len, attention_mask)
            attention = decoder.StaticPrefillAttention(cache, span, self.scale)
        else:
            padded = attention_mask is not None and not bool(attention_mask.all())
            attention = decoder.PrefillAttention(cache, attention_mask.bool() if padded else None, self.scale)
        # A few tokens (beam search or a user's loop stepping over HF's cache): the decode-sized fused layers.
        fused = decoder.fuses_decode_linears(self.weights, self.hidden_size, batch * seq_len, self.tp,
                                             self.decode_linear_mode)
        hidden = decoder.forward_hidden(self.kernels, self.weights, self.cos_sin, embeds, position_ids, attention,
                                        self.tp, fused)
        if span is not None:
            cache.end_prefill(span)
        return hidden

    def decode(self, cache: Qwen3StaticCache, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None) -> torch.Tensor:
        """One new token per sequence on our cache through the compiled step (HF's loop); logits [B, 1, V]."""
        batch = embeds.shape[0]
        cache.check_room(batch, 1)
        with outside_inference_mode():  # graph inputs of one kind, whichever mode the caller is in
            if embeds.is_inference():
                embeds = embeds.clone()
            if position_ids is None:
                position_ids = torch.full((batch, 1), cache.seq_length, device=embeds.device, dtype=torch.long)
            # Graph inputs must keep their strides from step to step: HF's mask grows, so copy its last column out.
            new_valid = (
                attention_mask[:, -1].bool().clone(memory_format=torch.contiguous_format)
                if attention_mask is not None else torch.ones(batch, dtype=torch.bool, device=embeds.device)
            )
            position_ids = position_ids.clone(memory_format=torch.contiguous_format)
            # Rows are padded to a power of two: one CUDA graph per bucket serves every batch size in it.
            pad = cache.decode_rows(batch) - batch
            if pad:
                embeds = F.pad(embeds, (0, 0, 0, 0, 0, pad))
                position_ids = F.pad(position_ids, (0, 0, 0, pad))
                new_valid = F.pad(new_valid, (0, pad), value=True)
        key = ("decode", embeds.shape[0], cache.max_batch_size, cache.max_cache_len)
        logits = self.decode_steps(key, embeds, position_ids, new_valid, cache.keys, cache.values, cache.kv_valid,
                                   cache.seq_start, cache.write_pos)
        cache.advance(1)
        return logits[:batch].clone()  # graph outputs are overwritten by the next replay

    def decode_step(self, embeds, position_ids, new_valid, keys, values, kv_valid, seq_start, write_pos):
        """The whole decode step for the first B cache rows: [B, 1, H] embeddings -> [B, 1, V] logits (compiled)."""
        batch = embeds.shape[0]
        # Index-put on the whole mask (never on a slice): Inductor writes it in place. Keys and values are written
        # by the QK-norm + RoPE kernel (`DecodeAttention`).
        slot = (torch.arange(batch, device=embeds.device)[:, None], write_pos[None, :])  # [B, 1] x [1, 1]
        kv_valid[slot] = new_valid[:, None]
        attention = decoder.DecodeAttention(self.kernels, (keys, values, kv_valid, seq_start), write_pos, self.scale)
        mode = self.decode_linear_mode
        fused = decoder.fuses_decode_linears(self.weights, self.hidden_size, batch, self.tp, mode)
        fused_head = fused and decoder.fuses_decode_head(self.weights, self.hidden_size, mode)
        hidden = decoder.forward_hidden(self.kernels, self.weights, self.cos_sin, embeds, position_ids, attention,
                                        self.tp, fused, final_norm=not fused_head)
        write_pos.add_(1)
        return decoder.decode_logits(self.kernels, self.weights, hidden) if fused_head else self.logits(hidden)

    def fast_step(self, state: FastDecodeState, keys, values, kv_valid, seq_start, write_pos, *,
                  do_sample: bool) -> None:
        """One step of the fast loop for a bucket of rows, all on the device: forward, pick, write, advance."""
        rows = state.tokens.shape[0]
        embeds = self.embed(state.tokens)[:, None]
        new_valid = torch.ones(rows, dtype=torch.bool, device=state.tokens.device)
        logits = self.decode_step(embeds, state.positions[:, None], new_valid, keys, values, kv_valid, seq_start,
                                  write_pos)
        next_tokens, still = pick(logits[:, 0].float(), state.unfinished, state, do_sample, self.tp)
        state.out[torch.arange(rows, device=state.tokens.device)[:, None], state.step[None, :]] = next_tokens[:, None]
        state.tokens.copy_(next_tokens)
        state.positions.add_(1)
        state.unfinished.copy_(still)
        state.step.add_(1)

    def paged_decode_step(self, tokens, positions, slot_mapping, tables, seq_lens, keys, values) -> torch.Tensor:
        """The engine's step when every sequence decodes one token (compiled per row bucket, serving/engine.py):
        [B] tokens -> [B, V] logits."""
        return self.paged_step(keys, values, decoder.PagedBatch.decode(tokens, positions, slot_mapping, tables,
                                                                       seq_lens))

    def paged_chunks_step(self, tokens, positions, slot_mapping, tables, starts, context_lens, logit_index, keys,
                          values) -> torch.Tensor:
        """The engine's step with prompt chunks (compiled per token bucket, serving/engine.py): every sequence's
        chunk, a decode's one token too, through the chunk kernel -> [C, V] logits at `logit_index` [C]."""
        return self.paged_step(keys, values, decoder.PagedBatch.chunks(tokens, positions, slot_mapping, tables,
                                                                       starts, context_lens, logit_index))

    def paged_step(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                   batch: decoder.PagedBatch) -> torch.Tensor:
        """One packed step of the continuous-batching engine (serving/engine.py) over its paged cache: the logits
        [N, V] at `batch.logit_index` (the last token of each sequence that samples)."""
        embeds = self.embed(batch.tokens)[None]  # [1, T, H]
        attention = decoder.PagedAttention(self.kernels, keys, values, batch, self.scale)
        fused = decoder.fuses_decode_linears(self.weights, self.hidden_size, batch.tokens.shape[0], self.tp,
                                             self.decode_linear_mode)
        hidden = decoder.forward_hidden(self.kernels, self.weights, self.cos_sin, embeds, batch.positions[None],
                                        attention, self.tp, fused)
        return self.logits(hidden[0, batch.logit_index])


class PagedGraphs:
    """The continuous-batching engine's compiled steps over one KV pool, one graph per key: `decode`
    (ModelRunner.paged_decode_step) and `chunks` (ModelRunner.paged_chunks_step)."""

    def __init__(self, runner: ModelRunner):
        self.decode = CompiledSteps(runner.paged_decode_step, runner.compile)
        self.chunks = CompiledSteps(runner.paged_chunks_step, runner.compile)
