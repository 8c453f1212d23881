"""RMSNorm and residual-add + RMSNorm, with the numerics of HF's `Qwen3RMSNorm`.

HF rounds twice: the normalised row is cast to the input dtype, then multiplied by the weight
in that dtype. The kernels keep both roundings so bf16 outputs match HF bit for bit in most rows.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    x_row_stride, residual_row_stride, out_row_stride, residual_out_row_stride,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # x, residual, out, residual_out: [rows, n_cols]; one program per row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        x = x + r  # added in the input dtype, as HF's `residual + hidden_states`
        tl.store(residual_out_ptr + row * residual_out_row_stride + cols, x, mask=mask)
    input_dtype = x.dtype
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(variance + eps)).to(input_dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    # One row per program: 4 warps up to 2K columns, then one warp per 512 columns, capped at 16.
    return max(4, min(16, block // 512))


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    assert x.shape[-1] == weight.shape[0], f"hidden size {x.shape[-1]} != weight size {weight.shape[0]}"
    assert x.stride(-1) == 1 and weight.is_contiguous(), "rms_norm needs unit stride on the last dimension"
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)
    out = x2d.new_empty(x2d.shape)
    residual_out = x2d.new_empty(x2d.shape) if residual is not None else out
    r2d = residual.reshape(-1, n_cols) if residual is not None else x2d
    block = triton.next_power_of_2(n_cols)
    if x2d.shape[0] > 0:
        _rms_norm_kernel[(x2d.shape[0],)](
            x2d, r2d, weight, out, residual_out,
            x2d.stride(0), r2d.stride(0), out.stride(0), residual_out.stride(0),
            n_cols, float(eps),  # a Python float: the kernel sees fp32, never an fp64 tensor scalar
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
        )
    return out.view(x.shape), residual_out.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.shape == residual.shape and x.dtype == residual.dtype, "x and residual must match in shape and dtype"
    return _launch(x, residual, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly `Qwen3RMSNorm.forward`."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm_reference(residual_out, weight, eps), residual_out


@torch.library.custom_op("qwen3_accel::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton on CUDA, the HF-exact reference elsewhere."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("qwen3_accel::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual_out = x + residual; normed = rms_norm(residual_out)` in one pass over the row."""
    if x.is_cuda:
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_reference(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)
