"""Qwen3-MoE: everything the dense patches do (see qwen3.py), plus the sparse MoE blocks.

  Qwen3MoeSparseMoeBlock  gate (router)  -> router GEMM, then `moe_route` (fp32 softmax -> top-k -> renormalise)
                          experts        -> `fused_moe` over HF's own `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`
  Qwen3MoeMLP             (layers in `mlp_only_layers` or off `decoder_sparse_step`) -> the dense path

Expert weights are read in place: no copies, `state_dict()` unchanged. FP8 experts (transformers' FP8Experts, as
loaded from an FP8 checkpoint or made by `optimize(weights="fp8")`) are read with their block scales.

HF's own forward (which still runs for requests our forward hands it: output_attentions / output_hidden_states /
output_router_logits, labels, gradients, caches other than ours and HF's DynamicCache) also gets the fused experts:
they are registered in transformers' `ExpertsInterface` as `"qwen3_accel"` and selected on the optimized model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
from transformers.integrations.moe import ExpertsInterface
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from ..custom_ops import Kernels
from ..custom_ops.moe import fused_moe_reference
from ..parallel import local
from ..quantize import experts_format
from . import qwen3

EXPERTS_IMPLEMENTATION = "qwen3_accel"


def expert_scales(experts: nn.Module) -> tuple:
    """The trailing `fused_moe` arguments for these experts: scales, groups (and int4 zero points), or nothing."""
    fmt = experts_format(experts)
    if fmt is None:
        return ()
    zeros = (experts.gate_up_proj_zero, experts.down_proj_zero) if fmt.zero else ()
    return (experts.gate_up_proj_scale_inv, experts.down_proj_scale_inv, fmt.group_n, fmt.group_k, *zeros)


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


def prepare(model: nn.Module) -> list[qwen3.FusedLinears]:
    """The dense fusions, and our experts selected for HF's own forward."""
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return qwen3.prepare(model)


def mlp(kernels: Kernels, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A sparse MoE block through the fused kernels (this rank's slice of every expert under tensor parallelism,
    a partial sum); dense MLP layers as in Qwen3."""
    if not isinstance(module, Qwen3MoeSparseMoeBlock):
        return qwen3.mlp(kernels, module, x)
    router = module.gate
    x2d = x.reshape(-1, x.shape[-1])
    router_logits = F.linear(x2d, router.weight)
    weights, ids = kernels.moe_route(router_logits, router.top_k, router.norm_topk_prob)
    experts = module.experts
    return kernels.fused_moe(x2d, local(experts.gate_up_proj), local(experts.down_proj), weights, ids,
                             *expert_scales(experts)).view(x.shape)


def decode_mlp(kernels: Kernels, module: nn.Module, norm: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """A sparse MoE block in a fused decode step: the router GEMV with the norm folded in, routing, then the experts
    with the norm folded into their gate/up GEMVs and the residual add into the down GEMVs; dense layers as in
    Qwen3."""
    if not isinstance(module, Qwen3MoeSparseMoeBlock):
        return qwen3.decode_mlp(kernels, module, norm, stream)
    router, experts = module.gate, module.experts
    x2d = stream.reshape(-1, stream.shape[-1])
    logits = kernels.decode_linear(x2d, *qwen3.linear_operands(router), norm.weight, norm.variance_epsilon, None,
                                   False)
    weights, ids = kernels.moe_route(logits, router.top_k, router.norm_topk_prob)
    return kernels.fused_moe(x2d, local(experts.gate_up_proj), local(experts.down_proj), weights, ids,
                             *expert_scales(experts), norm_weight=norm.weight, eps=norm.variance_epsilon,
                             residual=x2d).view(stream.shape)
