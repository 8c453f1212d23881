"""SiLU(gate) * up over the output of the fused gate/up projection."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tiles import hf_silu_mul


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, in_row_stride, out_row_stride, n_cols, BLOCK: tl.constexpr):
    # gate_up: [rows, 2 * n_cols] (gate first), out: [rows, n_cols]. Grid: (rows, cdiv(n_cols, BLOCK)).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * in_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * in_row_stride + n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_row_stride + cols, hf_silu_mul(gate, up, gate.dtype).to(gate.dtype), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    assert gate_up.shape[-1] % 2 == 0 and gate_up.stride(-1) == 1, "gate_up must be [..., 2 * I] with unit stride"
    n_cols = gate_up.shape[-1] // 2
    x2d = gate_up.reshape(-1, 2 * n_cols)
    out = x2d.new_empty((x2d.shape[0], n_cols))
    block = 1024  # 8 bytes/element in, 2 out: 1K columns per program keeps rows of 3K-25K in a few programs
    if x2d.shape[0] > 0:
        _silu_and_mul_kernel[(x2d.shape[0], triton.cdiv(n_cols, block))](
            x2d, out, x2d.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], n_cols)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """HF's `act_fn(gate_proj(x)) * up_proj(x)` on the fused projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@torch.library.custom_op("qwen3_accel::silu_and_mul", mutates_args=())
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [..., 2I] (gate first) -> [..., I]."""
    if gate_up.is_cuda:
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up).contiguous()


@silu_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
