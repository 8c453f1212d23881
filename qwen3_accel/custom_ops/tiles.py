"""Triton tile helpers shared by the linear (linear.py) and MoE (moe.py) kernels: reading a block of stored weights
in any format of formats.py, applying its scales and zero points, the RMSNorm prologue and the SiLU·mul epilogue with
HF's roundings (the elementwise op in activation.py uses it too), and the host-side choice of BLOCK_K.
"""

import triton
import triton.language as tl

from .formats import largest_power_of_two_dividing


@triton.jit
def load_weight(row_ptrs, row_valid, k0, w_cols, BLOCK_K: tl.constexpr, INT4: tl.constexpr, DTYPE: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of the rows at `row_ptrs` [R, 1], as stored (no scale, no zero point), exactly in
    DTYPE: [R, BLOCK_K], 0 outside the valid rows and the w_cols stored columns. int4 (two values per byte, the
    even column in the low nibble; w_cols counts bytes): the bytes are read contiguously and their nibbles
    interleaved. The bound is the stored width, a kernel argument, so that Triton knows its divisibility and
    vectorizes the loads (ceil(K/2) computed in the kernel would not tell it)."""
    if INT4:
        j = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # alignment lost in the division
        packed = tl.load(row_ptrs + j[None, :], mask=row_valid[:, None] & (j < w_cols)[None, :], other=0)
        w = tl.interleave(packed & 0xF, packed >> 4).to(DTYPE)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        mask = row_valid[:, None] & (k < w_cols)[None, :]
        if row_ptrs.dtype.element_ty.is_fp8():
            # No `other=`: Triton cannot cast it to fp8; masked lanes are zeroed after the conversion instead.
            w = tl.where(mask, tl.load(row_ptrs + k[None, :], mask=mask).to(DTYPE), 0.0).to(DTYPE)
        else:
            w = tl.load(row_ptrs + k[None, :], mask=mask, other=0).to(DTYPE)
    return w  # one return at the end: Triton compiles what follows a return inside a constexpr `if` too


@triton.jit
def group_value(base_ptr, rows, row_valid, k0, row_stride, group_n, group_k):
    """The scale (or zero point) of each of `rows` in the group holding column k0, in fp32: [len(rows)]."""
    ptrs = base_ptr + (rows // group_n).to(tl.int64) * row_stride + k0 // group_k
    return tl.load(ptrs, mask=row_valid, other=0.0).to(tl.float32)


@triton.jit
def dequantized_rows(row_ptrs, rows, row_valid, k0, w_cols, scale_ptr, zero_ptr, scale_row_stride, group_n, group_k,
                     BLOCK_K: tl.constexpr, INT4: tl.constexpr, GROUPED: tl.constexpr):
    """A GEMV's weight block in fp32, [len(rows), BLOCK_K]: `row_ptrs` [len(rows), 1] point at the rows, columns
    k0 .. k0 + BLOCK_K lie in one scale group; with GROUPED its zero point (int4) and scale are applied."""
    w = load_weight(row_ptrs, row_valid, k0, w_cols, BLOCK_K, INT4, tl.float32)
    if GROUPED:
        if INT4:
            w -= group_value(zero_ptr, rows, row_valid, k0, scale_row_stride, group_n, group_k)[:, None]
        w *= group_value(scale_ptr, rows, row_valid, k0, scale_row_stride, group_n, group_k)[:, None]
    return w


@triton.jit
def scaled_partial(part, a, cols, col_valid, k0, scale_ptr, zero_ptr, scale_row_stride, group_n, group_k,
                   INT4: tl.constexpr):
    """A GEMM's partial product `part` = a @ q [M, len(cols)] over one scale group's columns (from k0), with the
    group's scale per output column; int4's zero point enters through the row sums of a:
    x.(q - z)s = s(x.q - z sum x)."""
    if INT4:
        zero = group_value(zero_ptr, cols, col_valid, k0, scale_row_stride, group_n, group_k)
        part -= tl.sum(a.to(tl.float32), axis=1)[:, None] * zero[None, :]
    return part * group_value(scale_ptr, cols, col_valid, k0, scale_row_stride, group_n, group_k)[None, :]


@triton.jit
def row_rstd(x_row, n_in, eps, BLOCK_K: tl.constexpr):
    """1 / RMS of the activation row x_row[0:n_in] in fp32, as HF's RMSNorm computes it (for a norm prologue)."""
    kk = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        a = tl.load(x_row + k0 + kk, mask=(k0 + kk) < n_in, other=0.0).to(tl.float32)
        squares += a * a
    return tl.rsqrt(tl.sum(squares, axis=0) / n_in + eps)


@triton.jit
def rms_normed(a, rstd, norm_ptr, k, k_valid, DTYPE: tl.constexpr):
    """Activations `a` (fp32) of columns k normalised and weighted with HF's two roundings to DTYPE, in fp32."""
    norm_weight = tl.load(norm_ptr + k, mask=k_valid, other=0.0).to(tl.float32)
    return ((a * rstd).to(DTYPE).to(tl.float32) * norm_weight).to(DTYPE).to(tl.float32)


@triton.jit
def hf_silu_mul(gate, up, DTYPE: tl.constexpr):
    """SiLU(gate) * up in fp32 with HF's roundings to DTYPE: each input (as HF's projections store them), then
    SiLU(gate) before the product."""
    gate = gate.to(DTYPE).to(tl.float32)
    up = up.to(DTYPE).to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32) * up


def block_within_group(block_k: int, group_k: int, k_dim: int) -> int:
    """The largest BLOCK_K <= block_k that never straddles a scale group along a K of k_dim (a power of two dividing
    group_k, or any block when one group spans K)."""
    if group_k >= k_dim:
        return block_k
    return min(block_k, largest_power_of_two_dividing(group_k))
