"""Qwen3-MoE: routing and a fused grouped-GEMM MoE over HF v5's expert tensors, CUDA-graph safe.

Weights are read in place: `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`.
A "slot" is one (token, k) pair, `slot = token * top_k + k`. Slots are grouped by expert and each
group padded to the GEMM block size, in buffers sized by a static bound, entirely on the device: no
`.item()`, no host sync, so the whole layer can be captured in a CUDA graph.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fallback import triton_or_fallback
from .formats import dequantize
from .rms_norm import rms_norm_reference
from .tiles import block_within_group, dequantized_rows, hf_silu_mul, load_weight, rms_normed, row_rstd, scaled_partial


# ------------------------------------------------------------------------------------------------ routing
@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, logits_row_stride, n_experts,
                  TOP_K: tl.constexpr, BLOCK_TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    # logits: [T, E] -> weights: [T, TOP_K] fp32, ids: [T, TOP_K] int32. One program per token.
    # BLOCK_TOP_K is TOP_K rounded up to a power of two (tl.arange's rule); the extra lanes are never stored.
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + token * logits_row_stride + e, mask=e < n_experts, other=float("-inf"))
    logits = logits.to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    remaining = tl.where(e < n_experts, probs, -1.0)
    k_offs = tl.arange(0, BLOCK_TOP_K)
    top_weights = tl.zeros([BLOCK_TOP_K], tl.float32)
    top_ids = tl.zeros([BLOCK_TOP_K], tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=0)
        best_id = tl.min(tl.where(remaining == best, e, BLOCK_E), axis=0)  # lowest index among ties
        top_weights = tl.where(k_offs == k, best, top_weights)
        top_ids = tl.where(k_offs == k, best_id, top_ids)
        remaining = tl.where(e == best_id, -1.0, remaining)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=0)
    tl.store(weights_ptr + token * TOP_K + k_offs, top_weights, mask=k_offs < TOP_K)
    tl.store(ids_ptr + token * TOP_K + k_offs, top_ids, mask=k_offs < TOP_K)


def moe_route_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    n_tokens, n_experts = router_logits.shape
    assert router_logits.stride(-1) == 1 and top_k <= n_experts
    weights = torch.empty((n_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((n_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if n_tokens:
        _route_kernel[(n_tokens,)](router_logits, weights, ids, router_logits.stride(0), n_experts,
                                   TOP_K=top_k, BLOCK_TOP_K=triton.next_power_of_2(top_k),
                                   RENORMALIZE=renormalize,
                                   BLOCK_E=triton.next_power_of_2(n_experts), num_warps=1)
    return weights, ids


def moe_route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """HF's `Qwen3MoeTopKRouter` after the logits: fp32 softmax, top-k, optional renormalisation."""
    probs = F.softmax(router_logits, dtype=torch.float32, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@torch.library.custom_op("qwen3_accel::moe_route", mutates_args=())
def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts -> top-k -> renormalise, in fp32: (weights [T, k] fp32, expert ids [T, k] int32)."""
    if router_logits.is_cuda:
        return moe_route_triton(router_logits, top_k, renormalize)
    return moe_route_reference(router_logits, top_k, renormalize)


@moe_route.register_fake
def _(router_logits, top_k, renormalize):
    shape = (router_logits.shape[0], top_k)
    return router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int32)


# -------------------------------------------------------------------------------------- alignment
def _align_bounds(n_slots: int, n_experts: int, block_m: int) -> tuple[int, int]:
    """Static sizes: every non-empty expert adds at most block_m - 1 padding rows."""
    max_padded = n_slots + min(n_experts, n_slots) * (block_m - 1)
    return max_padded, triton.cdiv(max_padded, block_m)


def align_slots_reference(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """Group slots by expert, each group padded to `block_m`, in static-size device buffers (torch ops).

    Returns `sorted_slots [max_padded]` (slot ids; `T * k` marks padding), `block_expert [max_blocks]`
    (the expert of each block of `block_m` rows; `n_experts` past the end) and `n_padded [1]`.
    """
    n_slots = topk_ids.numel()
    max_padded, max_blocks = _align_bounds(n_slots, n_experts, block_m)
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, in slot order within a group
    rank = torch.arange(n_slots, device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
    dest = (padded_end - padded)[flat[order]] + rank
    sorted_slots = torch.full((max_padded,), n_slots, dtype=torch.int32, device=flat.device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(max_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)  # n_experts past end
    return sorted_slots, block_expert, padded_end[-1:].to(torch.int32)


@triton.jit
def _align_small_kernel(ids_ptr, sorted_slots_ptr, block_expert_ptr, n_padded_ptr,
                        n_slots, n_experts, max_blocks,
                        SLOTS: tl.constexpr, EXPERTS: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr):
    # ids: [n_slots] -> the outputs of `align_slots_reference`, in one program (few slots: decode).
    s = tl.arange(0, SLOTS)
    valid = s < n_slots
    ids = tl.load(ids_ptr + s, mask=valid, other=EXPERTS)  # out-of-range slots match no expert
    e = tl.arange(0, EXPERTS)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)  # [S, E]
    counts = tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    earlier_same = ((ids[:, None] == ids[None, :]) & (s[None, :] < s[:, None])).to(tl.int32)  # [S, S]
    dest = tl.sum(onehot * starts[None, :], axis=1) + tl.sum(earlier_same, axis=1)
    tl.store(sorted_slots_ptr + dest, s, mask=valid)  # padding rows were filled with n_slots by the launcher
    tl.store(n_padded_ptr, tl.sum(padded, axis=0))
    b = tl.arange(0, BLOCKS)
    before = ((ends[None, :] <= (b * BLOCK_M)[:, None]) & (e[None, :] < n_experts)).to(tl.int32)
    tl.store(block_expert_ptr + b, tl.sum(before, axis=1), mask=b < max_blocks)


_SMALL_ALIGN_SLOTS = 128  # one program holds an S x S and an S x E comparison: fine up to 128 slots


def align_slots(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """`align_slots_reference` in two launches (a fill and one Triton program) when there are few slots
    (decode), where the ~20 small torch kernels of the reference would cost more than the GEMMs inside a
    CUDA graph."""
    n_slots = topk_ids.numel()
    if n_slots > _SMALL_ALIGN_SLOTS:
        return align_slots_reference(topk_ids, n_experts, block_m)
    max_padded, max_blocks = _align_bounds(n_slots, n_experts, block_m)
    device = topk_ids.device
    sorted_slots = torch.full((max_padded,), n_slots, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    n_padded = torch.empty(1, dtype=torch.int32, device=device)
    _align_small_kernel[(1,)](
        topk_ids.reshape(-1).contiguous(), sorted_slots, block_expert, n_padded, n_slots, n_experts, max_blocks,
        SLOTS=triton.next_power_of_2(n_slots), EXPERTS=triton.next_power_of_2(n_experts),
        BLOCKS=triton.next_power_of_2(max_blocks), BLOCK_M=block_m, num_warps=4,
    )
    return sorted_slots, block_expert, n_padded


# ---------------------------------------------------------------------------- quantized expert weights
# Experts may hold fp8 (e4m3) or int8 values with one scale per group_n x group_k block of each expert's matrix:
# `scale [E, ceil(rows/group_n), ceil(cols/group_k)]` (transformers' FP8Experts: `gate_up_proj_scale_inv`,
# `down_proj_scale_inv`), or int4 values packed two per byte along the columns (`[E, rows, cols/2]` uint8, even
# column in the low nibble) with a uint8 zero point beside each scale: `w = (q - zero) * scale`. The kernels convert
# the values exactly, apply zero point and scale to each BLOCK_K partial product (BLOCK_K divides group_k, so one
# block lies in one group) and accumulate in fp32, through the helpers they share with the linear layers
# (tiles.py: `load_weight`, `dequantized_rows`, `scaled_partial`).
def _scale_args(scale: torch.Tensor | None, zero: torch.Tensor | None, weight: torch.Tensor) -> tuple:
    """(scale pointer, zero pointer, expert stride, row stride) of the scales and zero points (same shape); the
    weight stands in for what is absent (never read)."""
    if scale is None:
        return weight, weight, 0, 0
    return scale, zero if zero is not None else scale, scale.stride(0), scale.stride(1)


# ----------------------------------------------------------------------------------- grouped GEMM
@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_slots_ptr, block_expert_ptr, n_padded_ptr, slot_weight_ptr,
    n_out, k_dim, w_cols, n_slots, top_k, gate_up_offset,
    a_row_stride, w_expert_stride, w_row_stride, out_row_stride,
    scale_ptr, zero_ptr, scale_expert_stride, scale_row_stride, group_n, group_k,
    A_ROWS_ARE_TOKENS: tl.constexpr, GATE_UP: tl.constexpr, WEIGHTED: tl.constexpr, FP32_DOT: tl.constexpr,
    SCALED: tl.constexpr, INT4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[slot, n] = act(A[row(slot)] @ W[expert]^T)[n] for the slots of one expert block.
    # GATE_UP: W is gate_up_proj [E, 2I, H], out [T*k, I] = silu(gate) * up.
    # else:    W is down_proj [E, H, I],  out [T*k, H] = (A @ W^T) * routing weight of the slot.
    # Grid: (max_blocks, cdiv(n_out, BLOCK_N)).
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(n_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    row_valid = slots < n_slots
    a_rows = (slots // top_k) if A_ROWS_ARE_TOKENS else slots
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < n_out
    kk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None].to(tl.int64) * a_row_stride
    w_rows = w_ptr + expert * w_expert_stride + n[:, None].to(tl.int64) * w_row_stride
    scale_base = scale_ptr + expert * scale_expert_stride
    zero_base = zero_ptr + expert * scale_expert_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dot_dtype = tl.float32 if FP32_DOT else a_ptr.dtype.element_ty
    for k0 in range(0, k_dim, BLOCK_K):
        k_valid = (k0 + kk) < k_dim
        a = tl.load(a_base + (k0 + kk)[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0).to(dot_dtype)
        w = tl.trans(load_weight(w_rows, n_valid, k0, w_cols, BLOCK_K, INT4, dot_dtype))  # [BLOCK_K, BLOCK_N]
        part = tl.dot(a, w, input_precision="ieee") if FP32_DOT else tl.dot(a, w)
        if SCALED:
            part = scaled_partial(part, a, n, n_valid, k0, scale_base, zero_base, scale_row_stride, group_n, group_k,
                                  INT4)
        acc += part
        if GATE_UP:
            w_up = tl.trans(load_weight(w_rows + gate_up_offset * w_row_stride, n_valid, k0, w_cols, BLOCK_K, INT4,
                                        dot_dtype))
            part = tl.dot(a, w_up, input_precision="ieee") if FP32_DOT else tl.dot(a, w_up)
            if SCALED:
                part = scaled_partial(part, a, gate_up_offset + n, n_valid, k0, scale_base, zero_base,
                                      scale_row_stride, group_n, group_k, INT4)
            acc_up += part
    dtype = out_ptr.dtype.element_ty
    # Round where HF's eager expert loop rounds: each GEMM output, SiLU, the product, the weighting.
    if GATE_UP:
        result = hf_silu_mul(acc, acc_up, dtype)
    else:
        result = acc
        if WEIGHTED:
            weight = tl.load(slot_weight_ptr + slots, mask=row_valid, other=0.0).to(tl.float32)
            result = acc.to(dtype).to(tl.float32) * weight[:, None]
    out_offs = slots[:, None].to(tl.int64) * out_row_stride + n[None, :]
    tl.store(out_ptr + out_offs, result.to(dtype), mask=row_valid[:, None] & n_valid[None, :])


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Launch configuration by number of tokens (first row whose bound >= T). Decode (few tokens) is bound by
# reading expert weights: small BLOCK_M wastes little, wide N/K tiles stream weights. Tune on a GPU with
# `qwen3-accel bench-kernels` and edit here.
MOE_CONFIGS: list[tuple[int, MoeConfig]] = [
    (8, MoeConfig(16, 64, 128, 4, 3)),
    (64, MoeConfig(16, 128, 64, 4, 3)),
    (512, MoeConfig(32, 128, 64, 4, 3)),
    (1 << 62, MoeConfig(64, 128, 64, 8, 3)),
]


def moe_config(n_tokens: int) -> MoeConfig:
    return next(cfg for bound, cfg in MOE_CONFIGS if n_tokens <= bound)


# ------------------------------------------------------------------------------ decode-sized GEMVs
@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, hidden, inter, w_cols, top_k,
    x_row_stride, w_expert_stride, w_row_stride, out_row_stride,
    scale_ptr, zero_ptr, scale_expert_stride, scale_row_stride, group_n, group_k, norm_ptr, eps,
    SCALED: tl.constexpr, INT4: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[slot, n] = silu(x[token] . gate[expert, n]) * (x[token] . up[expert, n]) for one slot and BLOCK_N columns,
    # x RMS-normalised first with NORM (HF's roundings). Grid: (T * top_k, cdiv(I, BLOCK_N)). Products accumulate
    # per lane, reduced once at the end (no tl.dot: one activation row cannot fill a tensor-core tile).
    slot = tl.program_id(0)
    token = (slot // top_k).to(tl.int64)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < inter
    kk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + token * x_row_stride
    dtype = out_ptr.dtype.element_ty
    if NORM:
        rstd = row_rstd(x_row, hidden, eps, BLOCK_K)
    gate_rows = w_ptr + expert * w_expert_stride + n[:, None].to(tl.int64) * w_row_stride
    up_rows = gate_rows + inter * w_row_stride
    scale_base = scale_ptr + expert * scale_expert_stride
    zero_base = zero_ptr + expert * scale_expert_stride
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + kk
        k_valid = k < hidden
        a = tl.load(x_row + k, mask=k_valid, other=0.0).to(tl.float32)
        if NORM:
            a = rms_normed(a, rstd, norm_ptr, k, k_valid, dtype)
        acc_gate += dequantized_rows(gate_rows, n, n_valid, k0, w_cols, scale_base, zero_base, scale_row_stride,
                                     group_n, group_k, BLOCK_K, INT4, SCALED) * a[None, :]
        acc_up += dequantized_rows(up_rows, inter + n, n_valid, k0, w_cols, scale_base, zero_base,
                                   scale_row_stride, group_n, group_k, BLOCK_K, INT4, SCALED) * a[None, :]
    # HF's roundings, as in the grouped GEMM: each projection, SiLU, the product.
    act = hf_silu_mul(tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1), dtype)
    tl.store(out_ptr + slot.to(tl.int64) * out_row_stride + n, act.to(dtype), mask=n_valid)


@triton.jit
def _moe_gemv_down_kernel(
    act_ptr, w_ptr, ids_ptr, slot_weight_ptr, out_ptr, hidden, inter, w_cols, top_k,
    act_row_stride, w_expert_stride, w_row_stride, out_row_stride,
    scale_ptr, zero_ptr, scale_expert_stride, scale_row_stride, group_n, group_k, residual_ptr, residual_row_stride,
    SCALED: tl.constexpr, INT4: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[token, n] = sum over the token's k slots of weight[slot] * (act[slot] . down[expert(slot), n]), plus
    # residual[token, n] with RESIDUAL. Grid: (T, cdiv(H, BLOCK_N)); each program owns its outputs, so the top-k sum
    # needs no atomics.
    token = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < hidden
    kk = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in range(top_k):
        slot = token * top_k + j
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        weight = tl.load(slot_weight_ptr + slot).to(tl.float32)
        rows = w_ptr + expert * w_expert_stride + n[:, None].to(tl.int64) * w_row_stride
        scale_base = scale_ptr + expert * scale_expert_stride
        zero_base = zero_ptr + expert * scale_expert_stride
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + kk
            k_valid = k < inter
            a = tl.load(act_ptr + slot * act_row_stride + k, mask=k_valid, other=0.0).to(tl.float32)
            acc += dequantized_rows(rows, n, n_valid, k0, w_cols, scale_base, zero_base, scale_row_stride,
                                    group_n, group_k, BLOCK_K, INT4, SCALED) * a[None, :]
        # Rounded where the grouped path stores: the projection, then the weighted slot row.
        weighted = (tl.sum(acc, axis=1).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
        total += weighted
    if RESIDUAL:
        residual = tl.load(residual_ptr + token * residual_row_stride + n, mask=n_valid, other=0.0)
        total = total.to(dtype).to(tl.float32) + residual.to(tl.float32)
    tl.store(out_ptr + token * out_row_stride + n, total.to(dtype), mask=n_valid)


# Up to this many tokens, `fused_moe` runs one GEMV per (token, expert) pair instead of the grouped GEMM: with a
# handful of rows a `tl.dot` tile (M >= 16) is mostly padding, and the GEMVs need no slot sorting. Chosen from the
# published comparison (GEMV 3-5x faster below 16 rows), not yet measured here: `qwen3-accel bench-kernels` times
# both paths (moe_experts cases) so a GPU run can move this bound.
MOE_GEMV_MAX_TOKENS = 4
MOE_GEMV_BLOCKS = dict(gate_up=(16, 128), down=(16, 128))  # (BLOCK_N, BLOCK_K) per kernel


def fused_moe_gemv(x, gate_up_proj, down_proj, topk_weights, topk_ids,
        gate_up_scale=None, down_scale=None, group_n=1, group_k=1, gate_up_zero=None, down_zero=None,
        norm_weight=None, eps=0.0, residual=None):
    """`fused_moe` for a few tokens: a GEMV per (token, expert) pair for gate/up + SiLU·mul (after the RMSNorm,
    if any), then per token the down projections, routing weights, top-k sum (and residual) in one program per
    output block."""
    n_tokens, hidden = x.shape
    inter = gate_up_proj.shape[1] // 2
    top_k = topk_ids.shape[1]
    ids = topk_ids.contiguous()
    hidden_act = x.new_empty((n_tokens * top_k, inter))
    out = x.new_empty((n_tokens, hidden))
    if n_tokens == 0:
        return out
    scaled, int4 = gate_up_scale is not None, gate_up_proj.dtype == torch.uint8
    block_n, block_k = MOE_GEMV_BLOCKS["gate_up"]
    _moe_gemv_gate_up_kernel[(n_tokens * top_k, triton.cdiv(inter, block_n))](
        x, gate_up_proj, ids, hidden_act, hidden, inter, gate_up_proj.shape[2], top_k,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), hidden_act.stride(0),
        *_scale_args(gate_up_scale, gate_up_zero, gate_up_proj), group_n, group_k,
        x if norm_weight is None else norm_weight.contiguous(), float(eps),
        SCALED=scaled, INT4=int4, NORM=norm_weight is not None, BLOCK_N=block_n,
        BLOCK_K=block_within_group(block_k, group_k, hidden) if scaled else block_k,
    )
    slot_weights = topk_weights.to(x.dtype).contiguous()  # HF casts routing weights to the model dtype
    block_n, block_k = MOE_GEMV_BLOCKS["down"]
    _moe_gemv_down_kernel[(n_tokens, triton.cdiv(hidden, block_n))](
        hidden_act, down_proj, ids, slot_weights, out, hidden, inter, down_proj.shape[2], top_k,
        hidden_act.stride(0), down_proj.stride(0), down_proj.stride(1), out.stride(0),
        *_scale_args(down_scale, down_zero, down_proj), group_n, group_k,
        x if residual is None else residual, 0 if residual is None else residual.stride(0),
        SCALED=scaled, INT4=int4, RESIDUAL=residual is not None, BLOCK_N=block_n,
        BLOCK_K=block_within_group(block_k, group_k, inter) if scaled else block_k,
    )
    return out


def fused_moe_triton(x, gate_up_proj, down_proj, topk_weights, topk_ids,
        gate_up_scale=None, down_scale=None, group_n=1, group_k=1, gate_up_zero=None, down_zero=None,
        norm_weight=None, eps=0.0, residual=None):
    """`fused_moe` on the GPU: the decode-sized GEMVs for at most MOE_GEMV_MAX_TOKENS tokens, else grouped GEMMs.

    The GEMVs are newer than the grouped path and not yet built on every GPU we support: where Triton cannot build
    them for these experts' dtype, the grouped path serves every size (fallback.py's policy).
    """
    args = (x, gate_up_proj, down_proj, topk_weights, topk_ids, gate_up_scale, down_scale, group_n, group_k,
            gate_up_zero, down_zero, norm_weight, eps, residual)
    if x.shape[0] > MOE_GEMV_MAX_TOKENS:
        return _grouped_around(*args)
    _check_moe_shapes(x, gate_up_proj, down_proj)
    return triton_or_fallback("fused_moe_gemv", f"{gate_up_proj.dtype} experts", fused_moe_gemv, _grouped_around,
                              *args, fallback="the grouped GEMMs")


def _grouped_around(*args):
    """`fused_moe_grouped` with the RMSNorm before it and the residual add after it (see `_around`)."""
    return _around(fused_moe_grouped, *args)


def _around(experts_fn, x, gate_up_proj, down_proj, topk_weights, topk_ids, gate_up_scale, down_scale, group_n,
            group_k, gate_up_zero, down_zero, norm_weight, eps, residual):
    """`experts_fn` (no norm, no residual) with the RMSNorm before it and the residual add after it, as HF does."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    out = experts_fn(x, gate_up_proj, down_proj, topk_weights, topk_ids, gate_up_scale, down_scale, group_n, group_k,
                     gate_up_zero, down_zero)
    return out if residual is None else residual + out


def _check_moe_shapes(x, gate_up_proj, down_proj) -> None:
    packing = 2 if gate_up_proj.dtype == torch.uint8 else 1  # int4: two values per byte along the columns
    n_experts, two_i, stored_hidden = gate_up_proj.shape
    hidden = stored_hidden * packing
    assert x.shape[1] == hidden and down_proj.shape == (n_experts, hidden, two_i // 2 // packing)
    assert x.stride(-1) == 1 and gate_up_proj.stride(-1) == 1 and down_proj.stride(-1) == 1


def fused_moe_grouped(x, gate_up_proj, down_proj, topk_weights, topk_ids,
        gate_up_scale=None, down_scale=None, group_n=1, group_k=1, gate_up_zero=None, down_zero=None):
    """`fused_moe` for many tokens: slots sorted by expert, one grouped GEMM per projection."""
    n_tokens, hidden = x.shape
    n_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    _check_moe_shapes(x, gate_up_proj, down_proj)
    out = x.new_zeros((n_tokens, hidden))
    if n_tokens == 0:
        return out
    cfg = moe_config(n_tokens)
    sorted_slots, block_expert, n_padded = align_slots(topk_ids, n_experts, cfg.block_m)
    n_slots = n_tokens * top_k
    fp32 = x.dtype == torch.float32
    scaled, int4 = gate_up_scale is not None, gate_up_proj.dtype == torch.uint8
    block_k = cfg.block_k
    if scaled:  # one BLOCK_K for both GEMMs: within one scale group in each, and at least tl.dot's 16
        block_k = max(16, min(block_within_group(block_k, group_k, k_dim) for k_dim in (hidden, inter)))
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, FP32_DOT=fp32, SCALED=scaled,
                  INT4=int4, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    hidden_act = x.new_empty((n_slots, inter))
    _moe_gemm_kernel[(block_expert.numel(), triton.cdiv(inter, cfg.block_n))](
        x, gate_up_proj, hidden_act, sorted_slots, block_expert, n_padded, topk_weights,
        inter, hidden, gate_up_proj.shape[2], n_slots, top_k, inter,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), hidden_act.stride(0),
        *_scale_args(gate_up_scale, gate_up_zero, gate_up_proj), group_n, group_k,
        A_ROWS_ARE_TOKENS=True, GATE_UP=True, WEIGHTED=False, **common,
    )
    weighted = x.new_empty((n_slots, hidden))
    slot_weights = topk_weights.to(x.dtype).contiguous()  # HF casts routing weights to the model dtype
    _moe_gemm_kernel[(block_expert.numel(), triton.cdiv(hidden, cfg.block_n))](
        hidden_act, down_proj, weighted, sorted_slots, block_expert, n_padded, slot_weights,
        hidden, inter, down_proj.shape[2], n_slots, top_k, 0,
        hidden_act.stride(0), down_proj.stride(0), down_proj.stride(1), weighted.stride(0),
        *_scale_args(down_scale, down_zero, down_proj), group_n, group_k,
        A_ROWS_ARE_TOKENS=False, GATE_UP=False, WEIGHTED=True, **common,
    )
    # Each slot row was written by exactly one program: a plain sum over top-k, no atomics.
    return weighted.view(n_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def fused_moe_reference(x, gate_up_proj, down_proj, topk_weights, topk_ids,
        gate_up_scale=None, down_scale=None, group_n=1, group_k=1, gate_up_zero=None, down_zero=None,
        norm_weight=None, eps=0.0, residual=None):
    """HF v5's eager `Qwen3MoeExperts.forward`, step for step (routing weights cast to x's dtype), with the layer's
    RMSNorm before it and the residual add after it when given; quantized experts are dequantized to x's dtype."""
    if norm_weight is not None or residual is not None:
        return _around(fused_moe_reference, x, gate_up_proj, down_proj, topk_weights, topk_ids, gate_up_scale,
                       down_scale, group_n, group_k, gate_up_zero, down_zero, norm_weight, eps, residual)
    if gate_up_scale is not None:
        hidden, inter = x.shape[-1], gate_up_proj.shape[1] // 2
        gate_up_proj = dequantize(gate_up_proj, gate_up_scale, gate_up_zero, group_n, group_k, hidden, x.dtype)
        down_proj = dequantize(down_proj, down_scale, down_zero, group_n, group_k, inter, x.dtype)
    weights = topk_weights.to(x.dtype)
    out = torch.zeros_like(x)
    ids = topk_ids.long()
    for expert in range(gate_up_proj.shape[0]):
        token_idx, k_idx = torch.where(ids == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(x[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down_proj[expert]) * weights[token_idx, k_idx, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


@torch.library.custom_op("qwen3_accel::fused_moe", mutates_args=())
def fused_moe(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None, group_n: int = 1, group_k: int = 1,
    gate_up_zero: torch.Tensor | None = None, down_zero: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE experts for x [T, H] routed by (topk_weights [T, k] fp32, topk_ids [T, k]) -> [T, H]; fp8, int8 or
    packed int4 experts with their block scales and int4 zero points (see above). With `norm_weight`, x is the
    residual stream and is RMS-normalised first; with `residual` [T, H], the result is residual + experts."""
    args = (x, gate_up_proj, down_proj, topk_weights, topk_ids, gate_up_scale, down_scale, group_n, group_k,
            gate_up_zero, down_zero, norm_weight, eps, residual)
    if x.is_cuda:
        return fused_moe_triton(*args)
    return fused_moe_reference(*args)


@fused_moe.register_fake
def _(x, gate_up_proj, down_proj, topk_weights, topk_ids, gate_up_scale=None, down_scale=None, group_n=1,
      group_k=1, gate_up_zero=None, down_zero=None, norm_weight=None, eps=0.0, residual=None):
    return x.new_empty(x.shape)
