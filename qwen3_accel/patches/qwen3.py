"""Dense Qwen3: what happens to each HF module, and the forward pass that uses the result.

At patch time (`prepare`), once:
  Qwen3Attention  q_proj, k_proj, v_proj  -> one GEMM over `qkv_weight`; the three `.weight`s become views of it
                  q_norm, k_norm + RoPE   -> `qk_norm_rope` op (cos/sin table built from HF's rotary module)
                  attention               -> `prefill_attention` / `decode_attention` over the static cache
  Qwen3MLP        gate_proj, up_proj      -> one GEMM over `gate_up_weight` (views again), then `silu_and_mul`
  Qwen3RMSNorm    input/post-attention/final norms -> `rms_norm`, or `fused_add_rms_norm` with the residual add
                  of the previous block folded in

The fused weights are non-persistent buffers, so `state_dict()` keys and values are exactly HF's.
HF's modules stay in place, so HF's own forward still runs for what the fast path does not cover.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM

from ..custom_ops import Kernels
from ..parallel import SingleDevice, local, shard_like

# Attention callback: (layer index, q [B, L, Hq, D], k [B, L, Hkv, D], v [B, L, Hkv, D]) -> [B, L, Hq * D].
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Feed-forward callback: (kernels, the layer's `mlp` module, x [B, L, H]) -> [B, L, H].
MlpFn = Callable[[Kernels, nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def model_shape(model: nn.Module) -> Shape:
    """The heads this process holds: all of them, or its shard's under tensor parallelism."""
    attn = model.model.layers[0].self_attn
    heads = [local(proj.weight).shape[0] // attn.head_dim for proj in (attn.q_proj, attn.k_proj)]
    return Shape(len(model.model.layers), *heads, attn.head_dim)


@dataclass
class FusedLinears:
    """Linears of one module whose weights (and biases) are views of one fused buffer each."""

    parent: nn.Module
    names: list[str]
    fused_name: str  # the buffers are `parent.<fused_name>_weight` / `_bias`
    rows: list[int]  # output rows of each linear, in order
    _pointers: list[int] = field(default_factory=list)  # data_ptr of every view, as fused

    @property
    def fused(self) -> torch.Tensor:
        return getattr(self.parent, f"{self.fused_name}_weight")

    def _params(self) -> list[torch.Tensor]:
        return [local(p) for name in self.names for attr in ("weight", "bias")
                if (p := getattr(getattr(self.parent, name), attr)) is not None]

    def in_sync(self) -> bool:
        """Whether every linear still uses its view (cheap: one pointer per parameter)."""
        return [p.data_ptr() for p in self._params()] == self._pointers

    def resync(self) -> None:
        """Copy replaced weights into the fused buffers and make them views again (addresses kept for graphs)."""
        for attr in ("weight", "bias"):
            fused = getattr(self.parent, f"{self.fused_name}_{attr}")
            offset = 0
            for name, rows in zip(self.names, self.rows):
                linear = getattr(self.parent, name)
                original = getattr(linear, attr)
                param = local(original) if original is not None else None
                if fused is None or param is None:
                    if fused is not None or param is not None:
                        raise ValueError(f"{name}.{attr} was added or removed after qwen3_accel.optimize")
                    continue
                view = fused[offset : offset + rows]
                if param.data_ptr() != view.data_ptr():
                    if param.shape != view.shape or param.dtype != view.dtype or param.device != view.device:
                        raise ValueError(
                            f"{name}.{attr} was replaced by a {param.dtype} tensor of shape {list(param.shape)} on "
                            f"{param.device}; the model's is {view.dtype}, {list(view.shape)}, on {view.device}"
                        )
                    with torch.no_grad():
                        view.copy_(param)
                    setattr(linear, attr, nn.Parameter(shard_like(view, original), requires_grad=param.requires_grad))
                offset += rows
        self._pointers = [p.data_ptr() for p in self._params()]


def _fuse_linears(parent: nn.Module, names: list[str], fused_name: str) -> FusedLinears:
    """Concatenate the weights (and biases) of `parent.<names>` into one buffer; the originals become views.

    Under tensor parallelism the buffer holds this rank's shards, and each parameter stays a DTensor (a view of
    its shard in the buffer), so `state_dict()` is still transformers' sharded one.
    """
    linears = [getattr(parent, name) for name in names]
    for attr in ("weight", "bias"):
        params = [getattr(linear, attr) for linear in linears]
        if all(p is None for p in params):
            parent.register_buffer(f"{fused_name}_{attr}", None, persistent=False)
            continue
        fused = torch.cat([local(p).detach() for p in params])
        offset = 0
        for linear, p in zip(linears, params):
            rows = local(p).shape[0]
            view = fused[offset : offset + rows]
            setattr(linear, attr, nn.Parameter(shard_like(view, p), requires_grad=p.requires_grad))
            offset += rows
        parent.register_buffer(f"{fused_name}_{attr}", fused, persistent=False)
        torch._dynamo.mark_static_address(fused)
    group = FusedLinears(parent, names, fused_name, [local(linear.weight).shape[0] for linear in linears])
    group._pointers = [p.data_ptr() for p in group._params()]
    return group


def prepare(model: Qwen3ForCausalLM) -> list[FusedLinears]:
    """Fuse q/k/v and (dense MLPs') gate/up of every layer, in place, without copying any weight twice."""
    groups = []
    for layer in model.model.layers:
        groups.append(_fuse_linears(layer.self_attn, ["q_proj", "k_proj", "v_proj"], "qkv"))
        if hasattr(layer.mlp, "gate_proj"):
            groups.append(_fuse_linears(layer.mlp, ["gate_proj", "up_proj"], "gate_up"))
    return groups


def mlp(kernels: Kernels, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen3MLP: one GEMM for gate/up, SiLU * up, down projection (a partial sum under tensor parallelism)."""
    return F.linear(kernels.silu_and_mul(F.linear(x, module.gate_up_weight)), local(module.down_proj.weight))


def row_parallel_linear(tp: SingleDevice, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear(x)` for a layer split by input columns: local partial products summed over ranks, bias once."""
    if tp.world_size == 1:
        return F.linear(x, linear.weight, linear.bias)
    out = tp.all_reduce(F.linear(x, local(linear.weight)))
    return out if linear.bias is None else out + local(linear.bias)


def rope_table(model: Qwen3ForCausalLM, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each frequency, then sin, from HF's own rotary module."""
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    positions = torch.arange(max_positions, device=device)[None]
    probe = torch.empty(0, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # [1, P, D] each, both halves identical
    half = cos.shape[-1] // 2
    table = torch.cat([cos[0, :, :half], sin[0, :, half:]], dim=-1).float().contiguous()
    torch._dynamo.mark_static_address(table)
    return table


def forward_hidden(
    model: Qwen3ForCausalLM,
    kernels: Kernels,
    cos_sin: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    attend: AttendFn,
    mlp_fn: MlpFn = mlp,
    tp: SingleDevice = SingleDevice(),
) -> torch.Tensor:
    """The decoder stack on embeddings `hidden` [B, L, H] at `positions` [B, L] -> final-normed [B, L, H].

    `mlp_fn(kernels, layer.mlp, x)` runs each layer's feed-forward block (dense here, MoE in qwen3_moe). Under
    tensor parallelism (`tp`) attention runs this rank's heads and the MLP its slice: both outputs are partial
    sums, reduced over the ranks.
    """
    batch, seq_len, _ = hidden.shape
    shape = model_shape(model)
    n_q, n_kv, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    flat_positions = positions.reshape(-1)
    residual = None
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        norm = layer.input_layernorm
        if residual is None:
            residual = hidden
            x = kernels.rms_norm(hidden, norm.weight, norm.variance_epsilon)
        else:
            x, residual = kernels.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)

        qkv = F.linear(x, attn.qkv_weight, attn.qkv_bias).view(batch * seq_len, n_q + 2 * n_kv, head_dim)
        q, k = kernels.qk_norm_rope(
            qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], attn.q_norm.weight, attn.k_norm.weight,
            cos_sin, flat_positions, attn.q_norm.variance_epsilon,
        )
        v = qkv[:, n_q + n_kv :]
        out = attend(
            i, q.view(batch, seq_len, n_q, head_dim), k.view(batch, seq_len, n_kv, head_dim),
            v.reshape(batch, seq_len, n_kv, head_dim),
        )
        hidden = row_parallel_linear(tp, out, attn.o_proj)

        norm = layer.post_attention_layernorm
        x, residual = kernels.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
        hidden = tp.all_reduce(mlp_fn(kernels, layer.mlp, x))

    norm = model.model.norm
    hidden, _ = kernels.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
    return hidden
