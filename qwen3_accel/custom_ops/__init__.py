"""Custom ops (namespace `torch.ops.qwen3_accel`) and the choice of which implementation a model calls.

Each op file holds the Triton kernel, its launcher, the torch reference (HF numerics) and the
`torch.library` registration. The registered ops run Triton on CUDA and the reference elsewhere;
`select_kernels` lets a caller force one side, e.g. Triton on CPU under `TRITON_INTERPRET=1`.
"""

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import activation, rms_norm, rope

KERNEL_MODES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Kernels:
    """The implementations one optimized model calls; chosen once, at `optimize` time."""

    mode: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    qk_norm_rope: Callable
    silu_and_mul: Callable


def select_kernels(mode: str, device: torch.device) -> Kernels:
    """`auto`: the registered ops (Triton on CUDA, torch elsewhere); `triton`/`torch`: force one side."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not supported; choose one of {KERNEL_MODES}")
    ops = torch.ops.qwen3_accel
    if mode == "torch":
        return Kernels(
            mode, rms_norm.rms_norm_reference, rms_norm.fused_add_rms_norm_reference,
            rope.qk_norm_rope_reference, activation.silu_and_mul_reference,
        )
    if mode == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"kernels='triton' on {device.type} runs Triton's interpreter: set TRITON_INTERPRET=1 "
                "in the environment before importing triton, or use kernels='auto'"
            )
        return Kernels(
            mode, rms_norm.rms_norm_triton, rms_norm.fused_add_rms_norm_triton,
            rope.qk_norm_rope_triton, activation.silu_and_mul_triton,
        )
    return Kernels(mode, ops.rms_norm, ops.fused_add_rms_norm, ops.qk_norm_rope, ops.silu_and_mul)
