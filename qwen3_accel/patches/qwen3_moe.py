"""Qwen3-MoE: what HF's own forward runs on an optimized model, beyond the dense model's (qwen3.py).

Our forward runs each sparse MoE block as router GEMM -> `moe_route` -> `fused_moe` over HF's own expert weights
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, read in place; FP8 or int8/int4 experts with their scales):
see decoder.py. HF's own forward (which still runs for requests our forward hands it: output_attentions /
output_hidden_states / output_router_logits, labels, gradients, caches other than ours and HF's DynamicCache) also
gets the fused experts: they are registered in transformers' `ExpertsInterface` as `"qwen3_accel"` and selected on the optimized model.
"""

import torch
import torch.nn as nn
from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
from transformers.integrations.moe import ExpertsInterface

from ..custom_ops.moe import fused_moe_reference
from ..parallel import local
from ..quantize import experts_format, experts_scale_names
from . import qwen3

EXPERTS_IMPLEMENTATION = "qwen3_accel"


def expert_scales(experts: nn.Module) -> tuple:
    """The trailing `fused_moe` arguments for these experts: scales, groups (and int4 zero points), or nothing."""
    names = experts_scale_names(experts)
    if not names:
        return ()
    fmt = experts_format(experts)
    tensors = [getattr(experts, name) for name in names]
    return (*tensors[:2], fmt.group_n, fmt.group_k, *tensors[2:])


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """`Qwen3MoeExperts.forward` (or transformers' FP8Experts') through `fused_moe`; the torch reference
    (differentiable) when gradients are on."""
    args = (hidden_states, local(experts.gate_up_proj), local(experts.down_proj), top_k_weights, top_k_index,
            *expert_scales(experts))
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:3]):
        return fused_moe_reference(*args)
    return torch.ops.qwen3_accel.fused_moe(*args)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
FP8ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)


def prepare(model: nn.Module, our_attention: bool) -> None:
    """The dense model's choice of attention, and our fused experts for HF's own forward."""
    qwen3.prepare(model, our_attention)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
