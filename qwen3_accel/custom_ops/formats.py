"""The weight-only quantization formats the linear and MoE kernels read: constants, quantizers (torch, run once at
optimize time), `dequantize` (what a quantized weight stands for) and the check of a quantized weight's tensors.

Three formats, told apart by the weight's dtype:

  int8     `torch.int8 [N, K]`, symmetric, one scale per output row: `scale [N, 1]`.
  int4     `torch.uint8 [N, ceil(K/2)]`, two values per byte (even k in the low nibble), asymmetric in groups along
           K: `w = (q - zero) * scale`, `scale [N, ceil(K/G)]` (the model dtype), `zero` uint8 of the same shape.
  fp8      `torch.float8_e4m3fn [N, K]`, one scale per `group_n x group_k` block: `scale [ceil(N/gn), ceil(K/gk)]`
           fp32. This is transformers' fine-grained FP8 format (Qwen's FP8 checkpoints: 128x128 blocks, the scale
           stored as `weight_scale_inv` and multiplied).

In general `w[n, k] = (q[n, k] - zero[n // group_n, k // group_k]) * scale[n // group_n, k // group_k]`. MoE experts
stack one such matrix per expert: `[E, N, K]` values, `[E, ...]` scales and zero points.
"""

import torch
import triton

FP8_DTYPE = torch.float8_e4m3fn
QUANTIZED_DTYPES = (torch.int8, torch.uint8, FP8_DTYPE)
FORMAT_OF_DTYPE = {torch.int8: "int8", torch.uint8: "int4", FP8_DTYPE: "fp8"}
INT4_GROUP = 128  # along K, as AWQ/GPTQ checkpoints and torchao use
FP8_BLOCK = 128  # rows and columns of one fp8 scale block, as in Qwen's FP8 checkpoints


def largest_power_of_two_dividing(n: int) -> int:
    """The largest power of two that divides n (n > 0): the widest block that tiles n without straddling."""
    return n & -n


def check_quantized_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                           group_n: int, group_k: int, n_in: int) -> None:
    """Raise a ValueError naming what does not fit the formats above."""
    if qweight.dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"quantized weights are int8, packed int4 (uint8) or float8_e4m3fn; got {qweight.dtype}")
    n_out = qweight.shape[0]
    stored_in = (n_in + 1) // 2 if qweight.dtype == torch.uint8 else n_in
    expected_scale = (triton.cdiv(n_out, group_n), triton.cdiv(n_in, group_k))
    if qweight.shape[1] != stored_in or tuple(scale.shape) != expected_scale:
        raise ValueError(
            f"a {FORMAT_OF_DTYPE[qweight.dtype]} weight for {n_in} inputs in groups of {group_n}x{group_k} needs "
            f"values [{n_out}, {stored_in}] and scales {list(expected_scale)}; got {list(qweight.shape)} and "
            f"{list(scale.shape)}"
        )
    if (zero is not None) != (qweight.dtype == torch.uint8) or (zero is not None and zero.shape != scale.shape):
        raise ValueError("int4 weights need a uint8 zero point per scale; the other formats take none")
    if qweight.dtype == torch.int8 and (group_n != 1 or group_k < n_in):
        raise ValueError(f"int8 weights take one scale per output row; got groups of {group_n}x{group_k}")


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_n: int, group_k: int,
               n_in: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [..., N, K=n_in] the quantized one stands for (one matrix, or a stack of experts' [E, N, K]), in
    `dtype` (computed in fp32)."""
    if qweight.dtype == torch.uint8:
        q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).flatten(-2)[..., :n_in].float()
    else:
        q = qweight.float()
    n_out = qweight.shape[-2]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(group_n, -2)[..., :n_out, :].repeat_interleave(group_k, -1)[..., :n_in]

    if zero is not None:
        q = q - expand(zero)
    return (q * expand(scale)).to(dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 [N, K], scale fp32 [N, 1])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def _grouped(weight: torch.Tensor, group_n: int, group_k: int) -> torch.Tensor:
    """[N, K] zero-padded to whole groups and viewed as [N/gn, gn, K/gk, gk] (fp32)."""
    n_out, n_in = weight.shape
    pad_n, pad_k = -n_out % group_n, -n_in % group_k
    w = torch.nn.functional.pad(weight.float(), (0, pad_k, 0, pad_n))
    return w.view((n_out + pad_n) // group_n, group_n, (n_in + pad_k) // group_k, group_k)


def _ungrouped(grouped: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    return grouped.flatten(2).flatten(0, 1)[:n_out, :n_in]


def quantize_int4(weight: torch.Tensor, group_k: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of `group_k` along K: (packed uint8 [N, ceil(K/2)], scale [N, ceil(K/G)] in the
    weight's dtype, zero uint8 [N, ceil(K/G)]). The scale is rounded to its storage dtype before the values are."""
    n_out, n_in = weight.shape
    groups = _grouped(weight, 1, group_k)
    low, high = groups.amin(dim=(1, 3), keepdim=True), groups.amax(dim=(1, 3), keepdim=True)
    scale = ((high - low) / 15.0).clamp(min=1e-8).to(weight.dtype).float()
    zero = torch.round(-low / scale).clamp(0, 15)
    q = _ungrouped(torch.round(groups / scale + zero).clamp(0, 15).expand_as(groups), n_out, n_in).to(torch.uint8)
    if n_in % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale[:, 0, :, 0].to(weight.dtype), zero[:, 0, :, 0].to(torch.uint8)


def quantize_fp8(weight: torch.Tensor, block_n: int = FP8_BLOCK, block_k: int = FP8_BLOCK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one fp32 scale per block_n x block_k block (transformers' fine-grained FP8):
    (q float8_e4m3fn [N, K], scale fp32 [ceil(N/bn), ceil(K/bk)])."""
    n_out, n_in = weight.shape
    groups = _grouped(weight, block_n, block_k)
    amax = groups.abs().amax(dim=(1, 3), keepdim=True)
    scale = (amax / torch.finfo(FP8_DTYPE).max).clamp(min=torch.finfo(torch.float32).tiny)
    q = _ungrouped((groups / scale).expand_as(groups), n_out, n_in).to(FP8_DTYPE)
    return q.contiguous(), scale[:, 0, :, 0].contiguous()
