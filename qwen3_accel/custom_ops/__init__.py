"""Custom ops (namespace `torch.ops.qwen3_accel`) and the choice of which implementation a model calls.

Each op file holds the Triton kernel, its launcher, the torch reference (HF numerics) and the
`torch.library` registration. The registered ops run Triton on CUDA and the reference elsewhere;
`select_kernels` lets a caller force one side, e.g. Triton on CPU under `TRITON_INTERPRET=1`.
"""

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import activation, attention, linear, moe, paged_attention, rms_norm, rope

KERNEL_MODES = ("auto", "triton", "torch")
ATTENTION_BACKENDS = ("auto", "triton", "sdpa")


@dataclass(frozen=True)
class Kernels:
    """The implementations one optimized model calls; chosen once, at `optimize` time."""

    mode: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    qk_norm_rope: Callable
    qk_norm_rope_store_kv: Callable
    silu_and_mul: Callable
    decode_attention: Callable
    moe_route: Callable
    fused_moe: Callable
    quantized_linear: Callable
    decode_linear: Callable
    paged_store_kv: Callable  # the continuous-batching engine's paged cache (serving/)
    paged_decode_attention: Callable
    paged_prefill_attention: Callable


def _check_interpreter(what: str, device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{what} on {device.type} runs Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
            "before importing triton, or leave it on 'auto'"
        )


def _decode_attention(backend: str, kernels: str, device: torch.device) -> Callable:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r} is not supported; choose one of {ATTENTION_BACKENDS}")
    if backend == "sdpa" or (backend == "auto" and kernels == "torch"):
        return attention.decode_attention_reference
    if backend == "triton" or kernels == "triton":
        _check_interpreter("attention='triton'", device)
        return torch.ops.qwen3_accel.decode_attention if device.type == "cuda" else attention.decode_attention_triton
    return torch.ops.qwen3_accel.decode_attention


def select_kernels(mode: str, device: torch.device, attention_backend: str = "auto") -> Kernels:
    """`auto`: the registered ops (Triton on CUDA, torch elsewhere); `triton`/`torch`: force one side.

    `attention_backend` picks decode attention on its own: `triton` (split-KV kernel), `sdpa` (masked SDPA over
    the whole cache) or `auto` (follows `mode`).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not supported; choose one of {KERNEL_MODES}")
    decode_attention = _decode_attention(attention_backend, mode, device)
    ops = torch.ops.qwen3_accel
    if mode == "torch":
        return Kernels(
            mode, rms_norm.rms_norm_reference, rms_norm.fused_add_rms_norm_reference,
            rope.qk_norm_rope_reference, rope.qk_norm_rope_store_kv_reference, activation.silu_and_mul_reference,
            decode_attention, moe.moe_route_reference, moe.fused_moe_reference,
            linear.quantized_linear_reference, linear.decode_linear_reference, paged_attention.paged_store_kv_reference,
            paged_attention.paged_decode_attention_reference, paged_attention.paged_prefill_attention_reference,
        )
    if mode == "triton" and device.type != "cuda":
        _check_interpreter("kernels='triton'", device)
        return Kernels(
            mode, rms_norm.rms_norm_triton, rms_norm.fused_add_rms_norm_triton,
            rope.qk_norm_rope_triton, rope.qk_norm_rope_store_kv_triton, activation.silu_and_mul_triton,
            decode_attention, moe.moe_route_triton, moe.fused_moe_triton, linear.quantized_linear_triton,
            linear.decode_linear_triton, paged_attention.paged_store_kv_triton,
            paged_attention.paged_decode_attention_triton, paged_attention.paged_prefill_attention_triton,
        )
    return Kernels(
        mode, ops.rms_norm, ops.fused_add_rms_norm, ops.qk_norm_rope, ops.qk_norm_rope_store_kv, ops.silu_and_mul,
        decode_attention, ops.moe_route, ops.fused_moe, ops.quantized_linear, ops.decode_linear, ops.paged_store_kv,
        ops.paged_decode_attention, ops.paged_prefill_attention,
    )
