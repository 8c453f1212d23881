"""Attention over the static KV cache.

Cache layout, per layer: keys and values `[max_batch, max_len, kv_heads, head_dim]` (flash-attn's
layout), plus one `kv_valid [max_batch, max_len]` bool mask shared by all layers that says which slots
hold a real token of each sequence (left padding and unwritten slots are False).

Both paths here use torch's SDPA. Decode reads the whole cache and masks it; a split-KV kernel that
reads only the valid range plugs in at `decode_attention`.
"""

import torch
import torch.nn.functional as F


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of `L` new queries over `S >= L` keys whose last `L` are the new tokens.

    q: [B, L, Hq, D]; k, v: [B, S, Hkv, D]; key_valid: [B, S] bool or None (no padding) -> [B, L, Hq * D].
    """
    batch, q_len, n_heads, head_dim = q.shape
    offset = k.shape[1] - q_len
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_valid is None and offset == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(q_len, device=q.device)[:, None] + offset
        key_pos = torch.arange(k.shape[1], device=q.device)[None, :]
        mask = (key_pos <= query_pos)[None, None]  # [1, 1, L, S]
        if key_valid is not None:
            # A padded query would see no key at all; letting it see itself keeps its row finite.
            mask = (mask & key_valid[:, None, None, :]) | (key_pos == query_pos)[None, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, q_len, n_heads * head_dim)


def decode_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kv_valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence over its valid cache slots.

    q: [B, Hq, D]; key_cache, value_cache: [B, T, Hkv, D]; kv_valid: [B, T] bool -> [B, Hq * D].
    """
    batch, n_heads, head_dim = q.shape
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], key_cache.transpose(1, 2), value_cache.transpose(1, 2),
        attn_mask=kv_valid[:, None, None, :], scale=scale, enable_gqa=True,
    )
    return out.reshape(batch, n_heads * head_dim)
