"""The decoder stack on our ops, over the typed weights of weights.py: readable in one sitting.

  forward_hidden            embeddings -> every layer -> final norm
    general_layer           any number of tokens: RMSNorm (residual add folded in) -> fused QKV GEMM ->
                            QK-norm + RoPE -> attention -> o_proj -> RMSNorm -> MLP or MoE block
    fused_decode_layer      a few tokens (a decode step): the same through `decode_linear` GEMVs, each RMSNorm,
                            SiLU·mul and residual add folded into one (7 launches per dense layer instead of 10)
  decode_logits             final RMSNorm + LM head in one launch, after fused decode layers

Attention is one of four strategies, chosen by the caller (runner.py): `PrefillAttention` (no cache, or HF's
DynamicCache through its `update`), `StaticPrefillAttention` (a prompt into our cache), `DecodeAttention` (one
token per row over our cache; the QK-norm + RoPE kernel writes the keys and values into it itself) and
`PagedAttention` (a packed step of the continuous-batching engine over its paged cache).
Under tensor parallelism (`tp`) attention runs this rank's heads and the MLP its slice: both outputs are partial
sums, reduced over the ranks.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .cache import PrefillSpan, Qwen3StaticCache
from .custom_ops import Kernels
from .custom_ops.attention import prefill_attention
from .custom_ops.linear import DECODE_LINEAR_DENSE_MAX_HIDDEN, DECODE_LINEAR_MAX_ROWS
from .parallel import SingleDevice
from .weights import DecoderWeights, DenseMlpWeights, LayerWeights, Linear, MoeMlpWeights, Norm

DECODE_LINEAR_MODES = ("auto", "always", "never")


# ----------------------------------------------------------------------------------- the ops, by keyword
def linear(kernels: Kernels, x: torch.Tensor, w: Linear) -> torch.Tensor:
    """x @ w.T (+ bias): cuBLAS in the model dtype, `quantized_linear` for quantized weights."""
    if not w.quantized:
        return F.linear(x, w.weight, w.bias)
    out = kernels.quantized_linear(x, w.weight, w.scale, w.zero, w.group_n, w.group_k)
    return out if w.bias is None else out + w.bias


def decode_linear(kernels: Kernels, x: torch.Tensor, w: Linear, *, norm: Norm | None = None,
                  residual: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """One `decode_linear` launch: [RMSNorm(x) ->] x @ w.T [-> SiLU(gate)·up] [+ residual] (no bias)."""
    return kernels.decode_linear(x, w.weight, w.scale, w.zero, w.group_n, w.group_k,
                                 None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
                                 residual, silu_mul)


def rms_norm(kernels: Kernels, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    return kernels.rms_norm(x, norm.weight, norm.eps)


def add_rms_norm(kernels: Kernels, x: torch.Tensor, residual: torch.Tensor, norm: Norm):
    """(RMSNorm(x + residual), x + residual), as HF's two roundings give them."""
    return kernels.fused_add_rms_norm(x, residual, norm.weight, norm.eps)


def row_parallel_linear(kernels: Kernels, tp: SingleDevice, x: torch.Tensor, w: Linear) -> torch.Tensor:
    """x @ w.T for a projection split by input columns: local partial products summed over ranks, bias once."""
    if tp.world_size == 1:
        return linear(kernels, x, w)
    out = tp.all_reduce(F.linear(x, w.weight))
    return out if w.bias is None else out + w.bias


# ------------------------------------------------------------------------------------ attention strategies
class PrefillAttention:
    """New tokens with no cache, or over HF's DynamicCache (`update` returns every key so far)."""

    writes_cache = False

    def __init__(self, cache: DynamicCache | None, key_valid: torch.Tensor | None, scale: float):
        self.cache, self.key_valid, self.scale = cache, key_valid, scale

    def __call__(self, layer: int, q, k, v) -> torch.Tensor:  # q [B, L, Hq, D], k/v [B, L, Hkv, D]
        if self.cache is not None:
            keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
            k, v = keys.transpose(1, 2), values.transpose(1, 2)
        return prefill_attention(q, k, v, self.key_valid, self.scale)  # [B, L, Hq * D]


class StaticPrefillAttention:
    """A prompt (or a continuation of one) into our cache: keys and values stored at `span`, then attended."""

    writes_cache = False

    def __init__(self, cache: Qwen3StaticCache, span: PrefillSpan, scale: float):
        self.cache, self.span, self.scale = cache, span, scale

    def __call__(self, layer: int, q, k, v) -> torch.Tensor:
        keys, values = self.cache.write_prefill(layer, self.span, k, v)
        return prefill_attention(q, keys, values, self.span.key_valid, self.scale)


class DecodeAttention:
    """One token per row over our cache: the QK-norm + RoPE kernel stores k and v at slot `write_pos[0]` of each
    layer's cache, then split-KV decode attention reads the valid slots of [seq_start, write_pos]."""

    writes_cache = True

    def __init__(self, kernels: Kernels, cache_tensors, write_pos: torch.Tensor, scale: float):
        self.kernels, self.scale = kernels, scale
        self.keys, self.values, self.kv_valid, self.seq_start = cache_tensors  # [rows, len, Hkv, D] per layer ...
        self.write_pos, self.seq_end = write_pos, write_pos + 1  # [1]

    def __call__(self, layer: int, q, k=None, v=None) -> torch.Tensor:  # q [B, 1, Hq, D]
        out = self.kernels.decode_attention(q[:, 0], self.keys[layer], self.values[layer], self.kv_valid,
                                            self.seq_start, self.seq_end, self.scale)
        return out.reshape(q.shape[0], 1, -1)


@dataclass(frozen=True)
class PagedBatch:
    """One step's packed inputs. Tokens [T]: one per decoding sequence first, then the prompt chunks in order."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each token
    decode_tables: torch.Tensor  # [D, max_blocks] int32, the decoding sequences' block tables
    decode_seq_lens: torch.Tensor  # [D] int32, their lengths with the new token
    prefill_tables: torch.Tensor  # [P, max_blocks] int32, the prompt chunks' block tables
    prefill_starts: torch.Tensor  # [P + 1] int32: chunk c is tokens[D + starts[c] : D + starts[c + 1]]
    prefill_context_lens: torch.Tensor  # [P] int32: its sequence's tokens up to the chunk's end
    logit_index: torch.Tensor  # [N] int64: where in `tokens` each sampling sequence's last token is

    @classmethod
    def decode(cls, tokens, positions, slot_mapping, tables, seq_lens) -> "PagedBatch":
        """A step of one token per sequence (no prompt chunk): every row samples."""
        device = tokens.device
        no_rows = torch.zeros((0, tables.shape[1]), dtype=torch.int32, device=device)
        none = torch.zeros((0,), dtype=torch.int32, device=device)
        return cls(tokens, positions, slot_mapping, tables, seq_lens, no_rows, torch.zeros((1,), dtype=torch.int32,
                   device=device), none, torch.arange(tokens.shape[0], device=device))

    @classmethod
    def chunks(cls, tokens, positions, slot_mapping, tables, starts, context_lens, logit_index) -> "PagedBatch":
        """Every token through the chunk kernel: chunk c is tokens[starts[c] : starts[c + 1]] (one-token chunks
        included; empty chunks and tokens after the last chunk, a graph bucket's padding, compute nothing)."""
        none = torch.zeros((0,), dtype=torch.int32, device=tokens.device)
        return cls(tokens, positions, slot_mapping, tables[:0], none, tables, starts, context_lens, logit_index)


class PagedAttention:
    """A packed step of the continuous-batching engine over its paged cache: `tokens` [1, T] hold first one token
    per decoding sequence, then prompt chunks. Every token's key and value go to its slot (`paged_store_kv`); the
    decode tokens attend through `paged_decode_attention`, the prompt chunks through `paged_prefill_attention`
    (each over its sequence's keys so far, causal): two launches whatever the mix."""

    writes_cache = False

    def __init__(self, kernels: Kernels, keys: list[torch.Tensor], values: list[torch.Tensor], batch, scale: float):
        self.kernels, self.keys, self.values, self.batch, self.scale = kernels, keys, values, batch, scale

    def __call__(self, layer: int, q, k, v) -> torch.Tensor:  # q [1, T, Hq, D], k/v [1, T, Hkv, D]
        batch, keys, values, ops = self.batch, self.keys[layer], self.values[layer], self.kernels
        ops.paged_store_kv(k[0], v[0], keys, values, batch.slot_mapping)
        n_decode = batch.decode_seq_lens.shape[0]
        parts = []
        if n_decode:
            parts.append(ops.paged_decode_attention(q[0, :n_decode], keys, values, batch.decode_tables,
                                                    batch.decode_seq_lens, self.scale))
        if batch.prefill_context_lens.shape[0]:
            parts.append(ops.paged_prefill_attention(q[0, n_decode:], keys, values, batch.prefill_tables,
                                                     batch.prefill_starts, batch.prefill_context_lens, self.scale))
        return torch.cat(parts).flatten(1)[None]


Attention = PrefillAttention | StaticPrefillAttention | DecodeAttention | PagedAttention


def rope_table(model: torch.nn.Module, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each frequency, then sin, from HF's own rotary module."""
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    positions = torch.arange(max_positions, device=device)[None]
    probe = torch.empty(0, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # [1, P, D] each, both halves identical
    half = cos.shape[-1] // 2
    table = torch.cat([cos[0, :, :half], sin[0, :, half:]], dim=-1).float().contiguous()
    torch._dynamo.mark_static_address(table)
    return table


# ------------------------------------------------------------------------------------------------ layers
def qkv_heads(kernels: Kernels, weights: LayerWeights, qkv: torch.Tensor, batch: int, seq_len: int,
              cos_sin: torch.Tensor, positions: torch.Tensor, attention: Attention, layer: int, shape):
    """Split the fused projection into heads and apply QK-norm + RoPE at `positions` [B * L] (storing k and v in
    the decode cache)."""
    n_q, n_kv, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = qkv.view(batch * seq_len, n_q + 2 * n_kv, head_dim)
    q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
    attn = weights.attention
    norm_rope = (attn.q_norm.weight, attn.k_norm.weight, cos_sin, positions, attn.q_norm.eps)
    if attention.writes_cache:
        q = kernels.qk_norm_rope_store_kv(q, k, v, *norm_rope, attention.keys[layer], attention.values[layer],
                                          attention.write_pos)
        return q.view(batch, seq_len, n_q, head_dim), None, None
    q, k = kernels.qk_norm_rope(q, k, *norm_rope)
    return (q.view(batch, seq_len, n_q, head_dim), k.view(batch, seq_len, n_kv, head_dim),
            v.reshape(batch, seq_len, n_kv, head_dim))


def mlp(kernels: Kernels, w: DenseMlpWeights | MoeMlpWeights, x: torch.Tensor) -> torch.Tensor:
    """The feed-forward block on normed x [B, L, H]: gate/up GEMM, SiLU·mul, down (a partial sum under tensor
    parallelism); or a sparse MoE block: router GEMM, `moe_route` (softmax -> top-k -> renormalise), `fused_moe`."""
    if isinstance(w, DenseMlpWeights):
        return linear(kernels, kernels.silu_and_mul(linear(kernels, x, w.gate_up)), w.down)
    x2d = x.reshape(-1, x.shape[-1])
    routing, experts = kernels.moe_route(F.linear(x2d, w.router.weight), w.top_k, w.norm_topk_prob)
    return kernels.fused_moe(x2d, w.gate_up, w.down, routing, experts, *w.scales).view(x.shape)


def fused_mlp(kernels: Kernels, w: DenseMlpWeights | MoeMlpWeights, norm: Norm, stream: torch.Tensor):
    """The feed-forward block in a fused decode step, on the residual stream [B, 1, H] (returned updated): norm +
    gate/up + SiLU·mul, then down + residual, two launches; MoE: the router GEMV with the norm folded in, routing,
    then the experts with the norm folded into their gate/up GEMVs and the residual add into the down GEMVs."""
    if isinstance(w, DenseMlpWeights):
        act = decode_linear(kernels, stream, w.gate_up, norm=norm, silu_mul=True)
        return decode_linear(kernels, act, w.down, residual=stream)
    x2d = stream.reshape(-1, stream.shape[-1])
    routing, experts = kernels.moe_route(decode_linear(kernels, x2d, w.router, norm=norm), w.top_k, w.norm_topk_prob)
    return kernels.fused_moe(x2d, w.gate_up, w.down, routing, experts, *w.scales, norm_weight=norm.weight,
                             eps=norm.eps, residual=x2d).view(stream.shape)


def general_layer(kernels: Kernels, tp: SingleDevice, weights: LayerWeights, layer: int, hidden: torch.Tensor,
                  residual: torch.Tensor | None, cos_sin, positions, attention: Attention, shape):
    """One decoder layer on [B, L, H]; the residual stream runs one add behind `hidden` (None before layer 0)."""
    batch, seq_len, _ = hidden.shape
    if residual is None:
        residual, x = hidden, rms_norm(kernels, hidden, weights.input_norm)
    else:
        x, residual = add_rms_norm(kernels, hidden, residual, weights.input_norm)
    qkv = linear(kernels, x, weights.attention.qkv)
    q, k, v = qkv_heads(kernels, weights, qkv, batch, seq_len, cos_sin, positions, attention, layer, shape)
    hidden = row_parallel_linear(kernels, tp, attention(layer, q, k, v), weights.attention.o_proj)
    x, residual = add_rms_norm(kernels, hidden, residual, weights.post_attention_norm)
    return tp.all_reduce(mlp(kernels, weights.mlp, x)), residual


def fused_decode_layer(kernels: Kernels, weights: LayerWeights, layer: int, stream: torch.Tensor, cos_sin,
                       positions, attention: Attention, shape) -> torch.Tensor:
    """One decoder layer on the residual stream [B, 1, H] (a few rows, one device), every projection a
    `decode_linear` with the norm before it and the residual add after it folded in."""
    batch, seq_len, _ = stream.shape
    attn = weights.attention
    qkv = decode_linear(kernels, stream, attn.qkv, norm=weights.input_norm)
    q, k, v = qkv_heads(kernels, weights, qkv, batch, seq_len, cos_sin, positions, attention, layer, shape)
    stream = decode_linear(kernels, attention(layer, q, k, v), attn.o_proj, residual=stream)
    return fused_mlp(kernels, weights.mlp, weights.post_attention_norm, stream)


def forward_hidden(kernels: Kernels, weights: DecoderWeights, cos_sin: torch.Tensor, hidden: torch.Tensor,
                   positions: torch.Tensor, attention: Attention, tp: SingleDevice = SingleDevice(),
                   fused: bool = False, final_norm: bool = True) -> torch.Tensor:
    """The decoder stack on embeddings [B, L, H] at positions [B, L] -> final-normed [B, L, H].

    fused: every layer a `fused_decode_layer` (see `fuses_decode_linears`); then with final_norm=False the residual
    stream comes back before the final RMSNorm, for `decode_logits`, which folds it into the LM head."""
    positions = positions.reshape(-1)
    if fused:
        for i, layer in enumerate(weights.layers):
            hidden = fused_decode_layer(kernels, layer, i, hidden, cos_sin, positions, attention, weights.shape)
        return rms_norm(kernels, hidden, weights.final_norm) if final_norm else hidden
    if not final_norm:
        raise ValueError("final_norm=False needs the fused decode layers")
    residual = None
    for i, layer in enumerate(weights.layers):
        hidden, residual = general_layer(kernels, tp, layer, i, hidden, residual, cos_sin, positions, attention,
                                         weights.shape)
    hidden, _ = add_rms_norm(kernels, hidden, residual, weights.final_norm)
    return hidden


def decode_logits(kernels: Kernels, weights: DecoderWeights, stream: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm + LM head in one `decode_linear` launch, on the residual stream of fused decode layers."""
    return decode_linear(kernels, stream, weights.lm_head, norm=weights.final_norm)


# ------------------------------------------------------------------------------------------------ policy
def fuses_decode_linears(weights: DecoderWeights, hidden_size: int, rows: int, tp: SingleDevice,
                         mode: str = "auto") -> bool:
    """Whether a forward of `rows` tokens (a decode step, or a few tokens over HF's cache) runs fused decode layers:
    up to DECODE_LINEAR_MAX_ROWS rows, one device, no biases. With mode "auto": quantized projections always (they
    run our GEMV either way), projections in the model dtype (where it replaces cuBLAS) in models up to
    DECODE_LINEAR_DENSE_MAX_HIDDEN."""
    attn = weights.layers[0].attention
    if mode == "never" or tp.world_size > 1 or rows > DECODE_LINEAR_MAX_ROWS:
        return False
    if attn.qkv.bias is not None or attn.o_proj.bias is not None:
        return False
    return mode == "always" or attn.qkv.quantized or hidden_size <= DECODE_LINEAR_DENSE_MAX_HIDDEN


def fuses_decode_head(weights: DecoderWeights, hidden_size: int, mode: str = "auto") -> bool:
    """Whether fused decode layers also fold the final RMSNorm into the LM head's GEMV. The LM head stays in the
    model dtype, so it follows the rule for such projections: mode "always", or "auto" in models up to
    DECODE_LINEAR_DENSE_MAX_HIDDEN."""
    if mode == "never" or weights.lm_head.bias is not None:
        return False
    return mode == "always" or hidden_size <= DECODE_LINEAR_DENSE_MAX_HIDDEN
