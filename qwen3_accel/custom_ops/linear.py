"""Linear layers on our kernels: weight-only quantized projections (`quantized_linear`), and the decode step's
projections with their RMSNorm, SiLU·mul or residual add folded in (`decode_linear`, any weight format).

`quantized_linear` computes `y = x @ dequantize(weight).T` for the int8 / int4 / fp8 formats of formats.py,
dequantized inside the kernel. The kernel never materialises the weight: the integer or fp8 values convert exactly
to the activation dtype, go through the dot product, and the scale (and zero point, through the row sum of the
activations) is applied to each `BLOCK_K` partial product, which lies inside one group. Accumulation is fp32.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activation import silu_and_mul_reference
from .fallback import triton_or_fallback
from .formats import check_quantized_weight, dequantize
from .rms_norm import rms_norm_reference
from .tiles import (block_within_group, dequantized_rows, group_value, hf_silu_mul, load_weight, rms_normed, row_rstd,
                    scaled_partial)

# Up to this many rows `x` runs through a GEMV per row (products accumulated per lane), above it through tl.dot
# tiles; decode steps of up to this many rows run their projections through `decode_linear`, the GEMV with RMSNorm,
# SiLU·mul and residual add folded in. Why 4: a tl.dot tile needs 16 rows, so at 4 rows or fewer at least 3/4 of it
# would be padding; above that, the GEMV's one pass over the weights per row costs more (a first guess, like the
# block sizes below, for `qwen3-accel bench-kernels` to place on a GPU).
DECODE_LINEAR_MAX_ROWS = 4
# The GEMV halves BLOCK_N (down to 8) until it has QLINEAR_GEMV_MIN_PROGRAMS programs (about two per SM of an H100),
# so small projections still spread over the GPU. Block sizes are first guesses, to be set by
# `qwen3-accel bench-kernels` on a GPU (BLOCK_K is further capped so that one block never straddles a scale group).
QLINEAR_GEMV_MIN_PROGRAMS = 256
QLINEAR_BLOCKS = dict(gemv=(32, 128), gemm=(64, 64, 64))  # (BLOCK_N, BLOCK_K), (BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, norm_ptr, residual_ptr, out_ptr, n_out, n_in, w_cols, up_offset, eps,
    x_row_stride, w_row_stride, scale_row_stride, residual_row_stride, out_row_stride, group_n, group_k,
    INT4: tl.constexpr, GROUPED: tl.constexpr, PER_ROW: tl.constexpr,
    NORM: tl.constexpr, SILU_MUL: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y = x' @ W.T for one activation row and BLOCK_N outputs n < n_out. Grid: (rows, cdiv(n_out, BLOCK_N)).
    #   W: the model dtype, or w = (q - zero[g]) * scale[g], g = (n // group_n, k // group_k) (GROUPED; BLOCK_K divides
    #      group_k or one group spans K, so a block takes one scale per output), or one scale per row (PER_ROW).
    #   x' = RMSNorm(x) * norm_weight (NORM), HF's roundings; out = silu(y[n]) * y[n + up_offset] (SILU_MUL) and/or
    #   out = residual + y (RESIDUAL), rounded where HF rounds.
    # Products accumulate per lane and are reduced once at the end (no tl.dot: one row cannot fill a tensor-core tile).
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < n_out
    kk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * x_row_stride
    dtype = x_ptr.dtype.element_ty
    if NORM:
        rstd = row_rstd(x_row, n_in, eps, BLOCK_K)
    rows = w_ptr + n[:, None].to(tl.int64) * w_row_stride
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if SILU_MUL:
        up_rows = rows + up_offset * w_row_stride
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + kk
        k_valid = k < n_in
        a = tl.load(x_row + k, mask=k_valid, other=0.0).to(tl.float32)
        if NORM:
            a = rms_normed(a, rstd, norm_ptr, k, k_valid, dtype)
        acc += dequantized_rows(rows, n, n_valid, k0, w_cols, scale_ptr, zero_ptr, scale_row_stride, group_n,
                                group_k, BLOCK_K, INT4, GROUPED) * a[None, :]
        if SILU_MUL:
            acc_up += dequantized_rows(up_rows, n + up_offset, n_valid, k0, w_cols, scale_ptr, zero_ptr,
                                       scale_row_stride, group_n, group_k, BLOCK_K, INT4, GROUPED) * a[None, :]
    y = tl.sum(acc, axis=1)
    if PER_ROW:
        y *= tl.load(scale_ptr + n.to(tl.int64) * scale_row_stride, mask=n_valid, other=0.0).to(tl.float32)
    if SILU_MUL:
        up = tl.sum(acc_up, axis=1)
        if PER_ROW:
            up_rows = (n + up_offset).to(tl.int64) * scale_row_stride
            up *= tl.load(scale_ptr + up_rows, mask=n_valid, other=0.0).to(tl.float32)
        y = hf_silu_mul(y, up, dtype)
    if RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + n, mask=n_valid, other=0.0).to(tl.float32)
        y = y.to(dtype).to(tl.float32) + residual
    tl.store(out_ptr + row * out_row_stride + n, y.to(out_ptr.dtype.element_ty), mask=n_valid)


@triton.jit
def _quantized_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, rows, n_out, n_in, w_cols,
    x_row_stride, w_row_stride, scale_row_stride, out_row_stride, group_n, group_k,
    INT4: tl.constexpr, PER_ROW: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The same product for BLOCK_M rows through tl.dot. Grid: (cdiv(rows, BLOCK_M), cdiv(n_out, BLOCK_N)). The stored
    # values convert exactly to the dot's dtype; each block's partial product is scaled per output column, the zero
    # point entering through the activations' row sum: x . (q - z) s = s (x . q - z sum(x)).
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = m < rows
    n_valid = n < n_out
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * w_row_stride
    dot_dtype = tl.float32 if FP32_DOT else x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + kk
        k_valid = k < n_in
        a = tl.load(x_ptr + m[:, None].to(tl.int64) * x_row_stride + k[None, :],
                    mask=m_valid[:, None] & k_valid[None, :], other=0.0).to(dot_dtype)
        q = tl.trans(load_weight(w_rows, n_valid, k0, w_cols, BLOCK_K, INT4, dot_dtype))  # [BLOCK_K, BLOCK_N]
        part = tl.dot(a, q, input_precision="ieee") if FP32_DOT else tl.dot(a, q)
        if PER_ROW:
            acc += part
        else:
            acc += scaled_partial(part, a, n, n_valid, k0, scale_ptr, zero_ptr, scale_row_stride, group_n, group_k,
                                  INT4)
    if PER_ROW:
        acc *= group_value(scale_ptr, n, n_valid, 0, scale_row_stride, 1, 1)[None, :]
    out = out_ptr + m[:, None].to(tl.int64) * out_row_stride + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


def _launch_gemv(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                 group_n: int, group_k: int, out: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 0.0, residual: torch.Tensor | None = None, silu_mul: bool = False) -> None:
    """`_gemv_kernel` over the rows of x2d [R, K] into out [R, N] (N = half the weight's rows with silu_mul)."""
    rows, n_in = x2d.shape
    n_out = out.shape[1]
    block_n, block_k = QLINEAR_BLOCKS["gemv"]
    while x2d.is_cuda and block_n > 8 and rows * triton.cdiv(n_out, block_n) < QLINEAR_GEMV_MIN_PROGRAMS:
        block_n //= 2
    quantized = scale is not None
    int4 = weight.dtype == torch.uint8
    dummy = x2d  # stands in for the pointers a flag leaves unread
    scale = scale.contiguous() if quantized else dummy
    _gemv_kernel[(rows, triton.cdiv(n_out, block_n))](
        x2d, weight, scale, zero.contiguous() if int4 else dummy,
        dummy if norm_weight is None else norm_weight.contiguous(), dummy if residual is None else residual, out,
        n_out, n_in, weight.shape[1], n_out if silu_mul else 0, float(eps),
        x2d.stride(0), weight.stride(0), scale.stride(0) if quantized else 0,
        0 if residual is None else residual.stride(0), out.stride(0), group_n, group_k,
        INT4=int4, GROUPED=quantized and weight.dtype != torch.int8, PER_ROW=weight.dtype == torch.int8,
        NORM=norm_weight is not None, SILU_MUL=silu_mul, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_within_group(block_k, group_k, n_in),
    )


def quantized_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                            group_n: int, group_k: int) -> torch.Tensor:
    """`quantized_linear` through the Triton kernels (any device Triton runs on, the interpreter included)."""
    n_in = x.shape[-1]
    check_quantized_weight(qweight, scale, zero, group_n, group_k, n_in)
    x2d = x.reshape(-1, n_in)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    rows, n_out = x2d.shape[0], qweight.shape[0]
    out = x2d.new_empty((rows, n_out))
    if rows == 0 or n_out == 0:
        return out.view(*x.shape[:-1], n_out)
    scale = scale.contiguous()
    int4 = qweight.dtype == torch.uint8
    args = (x2d, qweight, scale, zero.contiguous() if int4 else scale)  # the zero pointer is never read unless INT4
    strides = (x2d.stride(0), qweight.stride(0), scale.stride(0), out.stride(0), group_n, group_k)
    flags = dict(INT4=int4, PER_ROW=qweight.dtype == torch.int8)
    block_m, block_n, block_k = QLINEAR_BLOCKS["gemm"]
    block_k = block_within_group(block_k, group_k, n_in)
    if rows > DECODE_LINEAR_MAX_ROWS and block_k >= 16:
        grid = (triton.cdiv(rows, block_m), triton.cdiv(n_out, block_n))
        _quantized_gemm_kernel[grid](*args, out, rows, n_out, n_in, qweight.shape[1], *strides, **flags,
                                     FP32_DOT=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                                     BLOCK_K=block_k)
    else:
        _launch_gemv(x2d, qweight, scale, zero, group_n, group_k, out)
    return out.view(*x.shape[:-1], n_out)


def quantized_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                               zero: torch.Tensor | None, group_n: int, group_k: int) -> torch.Tensor:
    """Dequantize, then one fp32 matmul: what the kernel computes, without its summation order."""
    weight = dequantize(qweight, scale, zero, group_n, group_k, x.shape[-1])
    return (x.float() @ weight.T).to(x.dtype)


def triton_or_reference(triton_fn, reference_fn, x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    """`triton_fn(x, weight, *args)`, or `reference_fn` where Triton cannot build the kernel for this weight dtype
    (fallback.py's policy, per launcher and weight dtype)."""
    return triton_or_fallback(triton_fn.__name__, f"{weight.dtype} weights", triton_fn, reference_fn, x, weight,
                              *args, fallback="the torch reference (quantized weights dequantized on every call)")


@torch.library.custom_op("qwen3_accel::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     group_n: int, group_k: int) -> torch.Tensor:
    """x [..., K] @ dequantize(qweight).T -> [..., N], for the int8 / int4 / fp8 formats of this module."""
    if x.is_cuda:
        return triton_or_reference(quantized_linear_triton, quantized_linear_reference, x, qweight, scale, zero,
                                   group_n, group_k)
    return quantized_linear_reference(x, qweight, scale, zero, group_n, group_k)


@quantized_linear.register_fake
def _(x, qweight, scale, zero, group_n, group_k):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# ------------------------------------------------------------------------------ the decode step's fused GEMV
# Decode steps of up to DECODE_LINEAR_MAX_ROWS rows run their projections through `decode_linear` (option
# decode_linear="auto"): always for quantized weights, and for weights in the model dtype (where it replaces cuBLAS)
# in dense models up to this hidden size. 0 until a GPU run measures where our GEMV beats cuBLAS (bench-kernels
# `decode_layer_linears`, bench --decode-linear always): small models are launch-bound, so the bound is expected
# near 2048 (Qwen3-1.7B).
DECODE_LINEAR_DENSE_MAX_HIDDEN = 0


def _check_decode_linear(x, weight, scale, zero, group_n, group_k, norm_weight, residual, silu_mul) -> int:
    """Raise a ValueError naming what does not fit; returns the number of outputs."""
    n_in = x.shape[-1]
    if scale is None:
        if weight.shape[1] != n_in or weight.dtype != x.dtype:
            raise ValueError(f"a weight in the model dtype must be [N, {n_in}] {x.dtype}; got {weight.dtype} "
                             f"{list(weight.shape)}")
    else:
        check_quantized_weight(weight, scale, zero, group_n, group_k, n_in)
    n_out = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if silu_mul and (weight.shape[0] % 2 or (scale is not None and n_out % group_n)):
        raise ValueError(f"silu_mul needs gate and up halves of equal rows, each whole scale blocks of {group_n} rows; "
                         f"got {weight.shape[0]} rows")
    if norm_weight is not None and norm_weight.shape != (n_in,):
        raise ValueError(f"norm_weight must be [{n_in}]; got {list(norm_weight.shape)}")
    if residual is not None and residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(f"residual must be {[*x.shape[:-1], n_out]}; got {list(residual.shape)}")
    return n_out


def decode_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                         zero: torch.Tensor | None, group_n: int, group_k: int, norm_weight: torch.Tensor | None,
                         eps: float, residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """`decode_linear` through `_gemv_kernel` (any device Triton runs on, the interpreter included)."""
    n_out = _check_decode_linear(x, weight, scale, zero, group_n, group_k, norm_weight, residual, silu_mul)
    n_in = x.shape[-1]
    x2d = x.reshape(-1, n_in).contiguous()
    out = x2d.new_empty((x2d.shape[0], n_out))
    if out.numel():
        res2d = None if residual is None else residual.reshape(-1, n_out).contiguous()
        _launch_gemv(x2d, weight, scale, zero, group_n if scale is not None else 1,
                     group_k if scale is not None else n_in, out, norm_weight, eps, res2d, silu_mul)
    return out.view(*x.shape[:-1], n_out)


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                            zero: torch.Tensor | None, group_n: int, group_k: int, norm_weight: torch.Tensor | None,
                            eps: float, residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """HF's modules one after the other: RMSNorm, the projection, SiLU(gate) * up, the residual add."""
    _check_decode_linear(x, weight, scale, zero, group_n, group_k, norm_weight, residual, silu_mul)
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    y = F.linear(x, weight) if scale is None else quantized_linear_reference(x, weight, scale, zero, group_n, group_k)
    if silu_mul:
        y = silu_and_mul_reference(y)
    return y if residual is None else residual + y


@torch.library.custom_op("qwen3_accel::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                  group_n: int, group_k: int, norm_weight: torch.Tensor | None, eps: float,
                  residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """A decode-sized projection (x [..., K], a few rows) in one launch: optional RMSNorm of x first, weight in the
    model dtype (scale None) or quantized as in `quantized_linear`, optional SiLU(gate) * up of the two halves of
    the output and residual add; HF's roundings at each step."""
    args = (x, weight, scale, zero, group_n, group_k, norm_weight, eps, residual, silu_mul)
    if x.is_cuda:
        return triton_or_reference(decode_linear_triton, decode_linear_reference, *args)
    return decode_linear_reference(*args)


@decode_linear.register_fake
def _(x, weight, scale, zero, group_n, group_k, norm_weight, eps, residual, silu_mul):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2 if silu_mul else weight.shape[0]))
