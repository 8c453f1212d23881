"""Dense Qwen3: what happens to each HF module, and the forward pass that uses the result.

At patch time (`prepare`), once:
  Qwen3Attention  q_proj, k_proj, v_proj  -> one GEMM over `qkv_weight`; the three `.weight`s become views of it
                  q_norm, k_norm + RoPE   -> `qk_norm_rope` op (cos/sin table built from HF's rotary module)
                  attention               -> `prefill_attention` / `decode_attention` over the static cache
  Qwen3MLP        gate_proj, up_proj      -> one GEMM over `gate_up_weight` (views again), then `silu_and_mul`
  Qwen3RMSNorm    input/post-attention/final norms -> `rms_norm`, or `fused_add_rms_norm` with the residual add
                  of the previous block folded in

The fused weights are non-persistent buffers, so `state_dict()` keys and values are exactly HF's.
HF's modules stay in place, so HF's own forward still runs for what the fast path does not cover; its attention
then runs `attention_forward`, registered in transformers' `AttentionInterface` as "qwen3_accel" (our decode
attention kernel for one-token steps over HF's cache).
Quantized projections (see quantize.py) fuse the same way: values, scales (and zero points) each concatenated
along the output rows, run by the `quantized_linear` op.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, Qwen3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..custom_ops import Kernels
from ..custom_ops.linear import DECODE_LINEAR_DENSE_MAX_HIDDEN, DECODE_LINEAR_MAX_ROWS
from ..parallel import SingleDevice, local, shard_like
from ..quantize import LinearFormat, linear_format

# Attention callback: (layer index, q [B, L, Hq, D], k [B, L, Hkv, D], v [B, L, Hkv, D]) -> [B, L, Hq * D]; with
# a `DecodeSlot`, k and v are the layer's whole cache [rows, len, Hkv, D], the new tokens already in it.
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Feed-forward callback: (kernels, the layer's `mlp` module, x [B, L, H]) -> [B, L, H].
MlpFn = Callable[[Kernels, nn.Module, torch.Tensor], torch.Tensor]
# Fused decode feed-forward callback: (kernels, `mlp` module, its RMSNorm, residual stream [B, 1, H]) -> the stream
# after the block, the norm and the residual add folded into its kernels.
DecodeMlpFn = Callable[[Kernels, nn.Module, nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class DecodeSlot:
    """Where a decode step's keys and values go: row b of each layer's cache, at slot `write_pos[0]`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    write_pos: torch.Tensor


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


def model_shape(model: nn.Module) -> Shape:
    """The heads this process holds: all of them, or its shard's under tensor parallelism."""
    attn = model.model.layers[0].self_attn
    heads = [local(proj.weight).shape[0] // attn.head_dim for proj in (attn.q_proj, attn.k_proj)]
    return Shape(len(model.model.layers), *heads, attn.head_dim)


@dataclass
class FusedLinears:
    """Linears of one module whose tensors are views of one fused buffer each: the weight, the bias, and for
    quantized projections the scales (and zero points), all concatenated along the output rows."""

    parent: nn.Module
    names: list[str]
    fused_name: str  # the buffers are `parent.<fused_name>_<suffix>`, e.g. `qkv_weight`, `qkv_scale`
    suffixes: dict[str, str]  # module attribute -> buffer suffix: weight, bias, (scale, zero)
    rows: dict[str, list[int]]  # module attribute -> rows of each linear's tensor, in order
    dtype: torch.dtype  # of the fused weight: a cast of the model is caught by comparing it
    _pointers: list[int] = field(default_factory=list)  # data_ptr of every view, as fused

    @property
    def fused(self) -> torch.Tensor:
        return getattr(self.parent, f"{self.fused_name}_weight")

    def _params(self) -> list[torch.Tensor]:
        return [local(p) for name in self.names for attr in self.suffixes
                if (p := getattr(getattr(self.parent, name), attr)) is not None]

    def in_sync(self) -> bool:
        """Whether every linear still uses its view (cheap: one pointer per parameter)."""
        return [p.data_ptr() for p in self._params()] == self._pointers

    def resync(self) -> None:
        """Copy replaced tensors into the fused buffers and make them views again (addresses kept for graphs)."""
        for attr, suffix in self.suffixes.items():
            fused = getattr(self.parent, f"{self.fused_name}_{suffix}")
            offset = 0
            for name, rows in zip(self.names, self.rows[attr]):
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


def _group_format(parent: nn.Module, names: list[str]) -> LinearFormat | None:
    """The one format of the linears `parent.<names>`; fp8 blocks must not straddle two of them."""
    formats = {linear_format(getattr(parent, name)) for name in names}
    if len(formats) != 1:
        raise ValueError(f"{type(parent).__name__}.{'/'.join(names)} mix weight formats: {formats}")
    fmt = formats.pop()
    for name in names:
        rows = getattr(parent, name).weight.shape[0]
        if fmt is not None and rows % fmt.group_n:
            raise ValueError(
                f"{name} has {rows} output rows, not a multiple of its {fmt.group_n}-row scale blocks, so it cannot "
                f"share a fused weight with {'/'.join(n for n in names if n != name)}"
            )
    return fmt


def _fuse_linears(parent: nn.Module, names: list[str], fused_name: str) -> FusedLinears:
    """Concatenate the tensors of `parent.<names>` into one buffer each; the originals become views.

    Under tensor parallelism the buffer holds this rank's shards, and each parameter stays a DTensor (a view of
    its shard in the buffer), so `state_dict()` is still transformers' sharded one.
    """
    fmt = _group_format(parent, names)
    suffixes = {"weight": "weight", "bias": "bias"}
    if fmt is not None:
        suffixes.update({fmt.scale: "scale", **({fmt.zero: "zero"} if fmt.zero else {})})
    setattr(parent, f"{fused_name}_format", fmt)
    linears = [getattr(parent, name) for name in names]
    rows = {}
    for attr, suffix in suffixes.items():
        params = [getattr(linear, attr) for linear in linears]
        rows[attr] = [local(p).shape[0] if p is not None else 0 for p in params]
        if all(p is None for p in params):
            parent.register_buffer(f"{fused_name}_{suffix}", None, persistent=False)
            continue
        fused = torch.cat([local(p).detach() for p in params])
        offset = 0
        for linear, p in zip(linears, params):
            n = local(p).shape[0]
            view = shard_like(fused[offset : offset + n], p)
            setattr(linear, attr, nn.Parameter(view, requires_grad=p.requires_grad))
            offset += n
        parent.register_buffer(f"{fused_name}_{suffix}", fused, persistent=False)
        torch._dynamo.mark_static_address(fused)
    group = FusedLinears(parent, names, fused_name, suffixes, rows, getattr(parent, f"{fused_name}_weight").dtype)
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


Operands = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, int]  # weight, scale, zero, groups


def linear_operands(module: nn.Module) -> Operands:
    """A projection's weight as the linear ops take it: (weight, scale, zero, group_n, group_k); no scale in the
    model dtype."""
    fmt = linear_format(module)
    if fmt is None:
        return local(module.weight), None, None, 1, module.weight.shape[1]
    return module.weight, getattr(module, fmt.scale), getattr(module, fmt.zero) if fmt.zero else None, \
        fmt.group_n, fmt.group_k


def fused_operands(parent: nn.Module, fused_name: str) -> Operands:
    """The fused projection `parent.<fused_name>_*` (see _fuse_linears) as the linear ops take it."""
    weight, fmt = getattr(parent, f"{fused_name}_weight"), getattr(parent, f"{fused_name}_format")
    if fmt is None:
        return weight, None, None, 1, weight.shape[1]
    zero = getattr(parent, f"{fused_name}_zero") if fmt.zero else None
    return weight, getattr(parent, f"{fused_name}_scale"), zero, fmt.group_n, fmt.group_k


def _linear(kernels: Kernels, x: torch.Tensor, operands: Operands, bias: torch.Tensor | None) -> torch.Tensor:
    weight, scale, zero, group_n, group_k = operands
    if scale is None:
        return F.linear(x, weight, bias)
    out = kernels.quantized_linear(x, weight, scale, zero, group_n, group_k)
    return out if bias is None else out + bias


def linear(kernels: Kernels, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`module(x)` for a projection in the model dtype (this rank's shard) or quantized."""
    return _linear(kernels, x, linear_operands(module), None if module.bias is None else local(module.bias))


def fused_linear(kernels: Kernels, x: torch.Tensor, parent: nn.Module, fused_name: str) -> torch.Tensor:
    """x through the fused projection `parent.<fused_name>_*`."""
    return _linear(kernels, x, fused_operands(parent, fused_name), getattr(parent, f"{fused_name}_bias"))


DECODE_LINEAR_MODES = ("auto", "always", "never")


def fuses_decode_linears(model: nn.Module, rows: int, tp: SingleDevice, mode: str = "auto") -> bool:
    """Whether a forward of `rows` tokens (a decode step, or a few tokens over HF's cache) runs its projections
    through `decode_linear`, with the RMSNorms, SiLU·mul and residual adds folded in (7 launches per dense layer
    instead of 10): up to DECODE_LINEAR_MAX_ROWS rows, one device, no biases. With mode "auto": quantized projections always (they run our GEMV either way), projections
    in the model dtype (where it replaces cuBLAS) in models up to DECODE_LINEAR_DENSE_MAX_HIDDEN."""
    attn = model.model.layers[0].self_attn
    if mode == "never" or tp.world_size > 1 or rows > DECODE_LINEAR_MAX_ROWS:
        return False
    if attn.qkv_bias is not None or attn.o_proj.bias is not None:
        return False
    return mode == "always" or attn.qkv_format is not None or model.config.hidden_size <= DECODE_LINEAR_DENSE_MAX_HIDDEN


def fuses_decode_head(model: nn.Module, mode: str = "auto") -> bool:
    """Whether a fused decode step (see `fuses_decode_linears`) also folds the final RMSNorm into the LM head's
    GEMV. The LM head stays in the model dtype, so it follows the rule for such projections: mode "always", or
    "auto" in models up to DECODE_LINEAR_DENSE_MAX_HIDDEN."""
    if mode == "never" or model.lm_head.bias is not None:
        return False
    return mode == "always" or model.config.hidden_size <= DECODE_LINEAR_DENSE_MAX_HIDDEN


def decode_logits(kernels: Kernels, model: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm + LM head in one `decode_linear` launch, on the residual stream of a fused decode step."""
    norm, weight = model.model.norm, local(model.lm_head.weight)
    return kernels.decode_linear(stream, weight, None, None, 1, weight.shape[1], norm.weight, norm.variance_epsilon,
                                 None, False)


def mlp(kernels: Kernels, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen3MLP: one GEMM for gate/up, SiLU * up, down projection (a partial sum under tensor parallelism)."""
    return linear(kernels, kernels.silu_and_mul(fused_linear(kernels, x, module, "gate_up")), module.down_proj)


def decode_mlp(kernels: Kernels, module: nn.Module, norm: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """Qwen3MLP in a fused decode step: norm + gate/up + SiLU·mul, then down + residual: two launches."""
    act = kernels.decode_linear(stream, *fused_operands(module, "gate_up"), norm.weight, norm.variance_epsilon,
                                None, True)
    return kernels.decode_linear(act, *linear_operands(module.down_proj), None, 0.0, stream, False)


def row_parallel_linear(kernels: Kernels, tp: SingleDevice, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`module(x)` for a layer split by input columns: local partial products summed over ranks, bias once."""
    if tp.world_size == 1:
        return linear(kernels, x, module)
    out = tp.all_reduce(F.linear(x, local(module.weight)))
    return out if module.bias is None else out + local(module.bias)


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
    decode_slot: DecodeSlot | None = None,
    fused_mlp: DecodeMlpFn | None = None,
    final_norm: bool = True,
) -> torch.Tensor:
    """The decoder stack on embeddings `hidden` [B, L, H] at `positions` [B, L] -> final-normed [B, L, H].

    `mlp_fn(kernels, layer.mlp, x)` runs each layer's feed-forward block (dense here, MoE in qwen3_moe). With
    `decode_slot` (one token per row) the QK-norm + RoPE kernel writes the keys and values into the cache itself.
    With `fused_mlp` (a few tokens: see `fuses_decode_linears`) the attention projections run through
    `decode_linear` and each feed-forward block through `fused_mlp`, every RMSNorm and residual add folded in.
    With `fused_mlp` and `final_norm=False`, the residual stream is returned before the final RMSNorm (for
    `decode_logits`, which folds it into the LM head).
    Under tensor parallelism (`tp`) attention runs this rank's heads and the MLP its slice: both outputs are
    partial sums, reduced over the ranks.
    """
    batch, seq_len, _ = hidden.shape
    shape = model_shape(model)
    n_q, n_kv, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    flat_positions = positions.reshape(-1)
    fused = fused_mlp is not None
    if not (final_norm or fused):
        raise ValueError("final_norm=False needs the fused decode path (fused_mlp)")
    residual = None  # unfused: the residual stream, one add behind `hidden`; fused: `hidden` is the stream
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        norm = layer.input_layernorm
        if fused:
            qkv = kernels.decode_linear(hidden, *fused_operands(attn, "qkv"), norm.weight, norm.variance_epsilon,
                                        None, False)
        else:
            if residual is None:
                residual = hidden
                x = kernels.rms_norm(hidden, norm.weight, norm.variance_epsilon)
            else:
                x, residual = kernels.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
            qkv = fused_linear(kernels, x, attn, "qkv")

        qkv = qkv.view(batch * seq_len, n_q + 2 * n_kv, head_dim)
        q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
        norm_rope = (attn.q_norm.weight, attn.k_norm.weight, cos_sin, flat_positions, attn.q_norm.variance_epsilon)
        if decode_slot is None:
            q, k = kernels.qk_norm_rope(q, k, *norm_rope)
            k, v = k.view(batch, seq_len, n_kv, head_dim), v.reshape(batch, seq_len, n_kv, head_dim)
        else:
            q = kernels.qk_norm_rope_store_kv(q, k, v, *norm_rope, decode_slot.keys[i], decode_slot.values[i],
                                              decode_slot.write_pos)
            k, v = decode_slot.keys[i], decode_slot.values[i]
        out = attend(i, q.view(batch, seq_len, n_q, head_dim), k, v)

        norm = layer.post_attention_layernorm
        if fused:
            hidden = kernels.decode_linear(out, *linear_operands(attn.o_proj), None, 0.0, hidden, False)
            hidden = fused_mlp(kernels, layer.mlp, norm, hidden)
        else:
            hidden = row_parallel_linear(kernels, tp, out, attn.o_proj)
            x, residual = kernels.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
            hidden = tp.all_reduce(mlp_fn(kernels, layer.mlp, x))

    norm = model.model.norm
    if fused:
        return kernels.rms_norm(hidden, norm.weight, norm.variance_epsilon) if final_norm else hidden
    hidden, _ = kernels.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
    return hidden
