"""Dense Qwen3: what HF's own forward runs on an optimized model.

Our forward (runner.py, decoder.py) replaces HF's modules' work with our ops; HF's modules stay in place, sharing
their weights with ours (weights.py), so HF's own forward still runs for the requests ours hands it. Its attention
then runs `attention_forward`, registered in transformers' `AttentionInterface` as "qwen3_accel": our decode
attention kernel for one-token steps over HF's cache, HF's SDPA for everything else.
"""

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_IMPLEMENTATION = "qwen3_accel"


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (query [B, Hq, L, D], key/value [B, Hkv, S, D] from HF's cache) for the
    requests our forward hands to HF's: one query per sequence runs `decode_attention` over HF's cache in place;
    prompts, gradients, dropout, attention weights and float masks run HF's SDPA."""
    batch, n_heads, q_len, head_dim = query.shape
    mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
    boolean_mask = mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1)
    gradients = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if (q_len != 1 or dropout or kwargs.get("output_attentions") or gradients or not boolean_mask
            or head_dim & (head_dim - 1) or key.stride() != value.stride()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    slots = key.shape[-2]
    if mask is None:
        kv_valid = torch.ones((1, slots), dtype=torch.bool, device=query.device).expand(batch, -1)
    else:
        kv_valid = mask[:, 0, -1].expand(batch, -1).contiguous()
    seq_start = torch.zeros(batch, dtype=torch.int32, device=query.device)
    seq_end = torch.full((1,), slots, dtype=torch.long, device=query.device)
    scale = scaling if scaling is not None else head_dim**-0.5
    out = torch.ops.qwen3_accel.decode_attention(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2),
                                                 kv_valid, seq_start, seq_end, scale)
    return out[:, None], None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


def prepare(model: nn.Module, our_attention: bool) -> None:
    """Select our attention for HF's own forward (unless the user chose an implementation other than HF's default
    SDPA, or asked for SDPA / the torch references: `our_attention` False)."""
    if our_attention and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
