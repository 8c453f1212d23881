"""Qwen3-MoE: everything the dense patches do (see qwen3.py), plus the sparse MoE blocks.

  Qwen3MoeSparseMoeBlock  gate (router)  -> router GEMM, then `moe_route` (fp32 softmax -> top-k -> renormalise)
                          experts        -> `fused_moe` over HF's own `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`
  Qwen3MoeMLP             (layers in `mlp_only_layers` or off `decoder_sparse_step`) -> the dense path

Expert weights are read in place: no copies, `state_dict()` unchanged.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from ..custom_ops import Kernels
from . import qwen3

prepare = qwen3.prepare


def mlp(kernels: Kernels, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A sparse MoE block through the fused kernels; dense MLP layers as in Qwen3."""
    if not isinstance(module, Qwen3MoeSparseMoeBlock):
        return qwen3.mlp(kernels, module, x)
    router = module.gate
    x2d = x.reshape(-1, x.shape[-1])
    router_logits = F.linear(x2d, router.weight)
    weights, ids = kernels.moe_route(router_logits, router.top_k, router.norm_topk_prob)
    experts = module.experts
    return kernels.fused_moe(x2d, experts.gate_up_proj, experts.down_proj, weights, ids).view(x.shape)
