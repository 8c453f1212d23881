"""The weights our forward reads, gathered once at `optimize` time into small typed structures.

`build_weights(model)` walks the HF model once and returns a `DecoderWeights`: per layer its norms, the fused
q/k/v projection, o_proj, and a dense MLP (fused gate/up, down) or a sparse MoE block (router, experts). Each
projection is a `Linear`: the tensors the linear ops take (weight, and for quantized projections scale, zero point
and scale-group shape), this process's shard under tensor parallelism.

Nothing is copied and nothing is added to HF's modules. A fused projection is one new tensor (q, k and v
concatenated along the output rows, each scale and zero point too) and HF's parameters become views of its rows;
every other tensor is HF's own. So `state_dict()` is exactly HF's, HF's forward reads the same memory as ours,
and a `load_state_dict` reaches both. Each tensor is recorded with the parameters it is made of (`Binding`):
a parameter the user replaced since (`module.weight = nn.Parameter(...)`) is copied into our tensor at the next
sequence, and becomes a view of it again, so compiled graphs keep their addresses.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from .parallel import local, shard_like
from .quantize import experts_format, experts_scale_names, linear_format


@dataclass(frozen=True)
class Shape:
    """The heads this process holds: all of them, or its shard's under tensor parallelism."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Linear:
    """A projection as the linear ops take it: y = x @ dequantize(weight).T + bias.

    In the model dtype `scale` is None (group_k = in_features); quantized, `weight` holds int8 / packed int4 / fp8
    values and `scale` (and for int4 `zero`) one value per group_n x group_k block (see custom_ops/linear.py)."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_n: int = 1
    group_k: int = 0
    bias: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None


@dataclass(frozen=True)
class Norm:
    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class AttentionWeights:
    qkv: Linear  # rows: the query heads, then the key heads, then the value heads
    o_proj: Linear
    q_norm: Norm
    k_norm: Norm


@dataclass(frozen=True)
class DenseMlpWeights:
    gate_up: Linear  # rows: gate, then up
    down: Linear


@dataclass(frozen=True)
class MoeMlpWeights:
    """A sparse MoE block: the router, then every expert's packed gate/up [E, 2I, H] and down [E, H, I] as HF holds
    them, with `fused_moe`'s trailing scale arguments for quantized experts."""

    router: Linear
    top_k: int
    norm_topk_prob: bool
    gate_up: torch.Tensor
    down: torch.Tensor
    scales: tuple = ()


@dataclass(frozen=True)
class LayerWeights:
    input_norm: Norm
    attention: AttentionWeights
    post_attention_norm: Norm
    mlp: DenseMlpWeights | MoeMlpWeights


@dataclass
class Binding:
    """One tensor our forward reads and the HF parameters it is made of: `parts[i]` is rows
    `rows[i]` of `tensor` (one part, all rows, for a tensor that is HF's own)."""

    tensor: torch.Tensor
    parts: list[tuple[nn.Module, str, str]]  # (module, attribute, name in error messages)
    rows: list[int]
    pointers: list[int] = field(default_factory=list)  # data_ptr of each part, as bound

    def current(self) -> list[torch.Tensor]:
        return [local(getattr(module, attr)) for module, attr, _ in self.parts]

    def in_sync(self) -> bool:
        """Whether every part is still the view it was made (one pointer per parameter: cheap)."""
        return [p.data_ptr() for p in self.current()] == self.pointers

    def moved(self) -> bool:
        """Whether the model was moved or cast since (its first part no longer matches our tensor's)."""
        first = self.current()[0]
        return first.device != self.tensor.device or first.dtype != self.tensor.dtype

    def resync(self) -> None:
        """Copy replaced parameters into our tensor and make them views of it again (same addresses for graphs)."""
        offset = 0
        for (module, attr, name), rows in zip(self.parts, self.rows):
            original = getattr(module, attr)
            param, view = local(original), self.tensor[offset : offset + rows]
            if param.data_ptr() != view.data_ptr():
                if param.shape != view.shape or param.dtype != view.dtype or param.device != view.device:
                    raise ValueError(
                        f"{name} was replaced by a {param.dtype} tensor of shape {list(param.shape)} on "
                        f"{param.device}; the model's is {view.dtype}, {list(view.shape)}, on {view.device}"
                    )
                with torch.no_grad():
                    view.copy_(param)
                setattr(module, attr, nn.Parameter(shard_like(view, original), requires_grad=param.requires_grad))
            offset += rows
        self.pointers = [p.data_ptr() for p in self.current()]


@dataclass(frozen=True)
class DecoderWeights:
    """Everything our forward reads, and the bindings that keep it equal to HF's parameters."""

    shape: Shape
    embed: torch.Tensor  # [vocab (this rank's rows), H]
    layers: list[LayerWeights]
    final_norm: Norm
    lm_head: Linear
    bindings: list[Binding]
    fused: list[Binding]  # the bindings of the fused projections (q/k/v, gate/up): where a cast shows first

    def check_not_moved(self) -> None:
        """A model moved or cast since `optimize` is an error (a few attribute reads per layer)."""
        if any(binding.moved() for binding in self.fused):
            raise RuntimeError(
                "the model's weights were moved or converted after qwen3_accel.optimize (e.g. .to(), .half()), so "
                "the fused projections no longer share memory with them; move or cast the model first, then optimize"
            )

    def sync(self) -> bool:
        """Copy every parameter replaced since the last look into our tensors; whether any was."""
        stale = [binding for binding in self.bindings if not binding.in_sync()]
        for binding in stale:
            binding.resync()
        return bool(stale)


class _Builder:
    """Collects the bindings while `build_weights` walks the model."""

    def __init__(self):
        self.bindings: list[Binding] = []
        self.fused: list[Binding] = []

    def own(self, module: nn.Module, attr: str, name: str) -> torch.Tensor | None:
        """HF's tensor `module.<attr>` as it is (this rank's shard), recorded; None if the module has none."""
        param = getattr(module, attr, None)
        if param is None:
            return None
        tensor = local(param).detach()
        self.bindings.append(Binding(tensor, [(module, attr, name)], [tensor.shape[0]], [tensor.data_ptr()]))
        torch._dynamo.mark_static_address(tensor)  # a graph input at a fixed address, never copied per replay
        return tensor

    def fuse(self, modules: list[nn.Module], attr: str, names: list[str]) -> torch.Tensor | None:
        """The tensors `module.<attr>` of `modules` concatenated along rows; HF's parameters become its views."""
        params = [getattr(module, attr) for module in modules]
        if all(p is None for p in params):
            return None
        if any(p is None for p in params):
            raise ValueError(f"{'/'.join(names)} cannot be fused: only some have a {attr}")
        fused = torch.cat([local(p).detach() for p in params])
        rows, offset = [], 0
        for module, p in zip(modules, params):
            n = local(p).shape[0]
            view = shard_like(fused[offset : offset + n], p)
            setattr(module, attr, nn.Parameter(view, requires_grad=p.requires_grad))
            rows.append(n)
            offset += n
        torch._dynamo.mark_static_address(fused)
        parts = [(module, attr, f"{name}.{attr}") for module, name in zip(modules, names)]
        binding = Binding(fused, parts, rows)
        binding.pointers = [p.data_ptr() for p in binding.current()]
        self.bindings.append(binding)
        if attr == "weight":
            self.fused.append(binding)
        return fused

    def linear(self, module: nn.Module, name: str) -> Linear:
        fmt = linear_format(module)
        weight = self.own(module, "weight", f"{name}.weight")
        bias = self.own(module, "bias", f"{name}.bias")
        if fmt is None:
            return Linear(weight, group_k=weight.shape[1], bias=bias)
        return Linear(weight, self.own(module, fmt.scale, f"{name}.{fmt.scale}"),
                      self.own(module, fmt.zero, f"{name}.{fmt.zero}") if fmt.zero else None,
                      fmt.group_n, fmt.group_k, bias)

    def fused_linear(self, parent: nn.Module, names: list[str], where: str) -> Linear:
        """`parent.<names>` as one projection (q/k/v, gate/up); fp8 scale blocks must not straddle two of them."""
        modules = [getattr(parent, name) for name in names]
        formats = {linear_format(module) for module in modules}
        if len(formats) != 1:
            raise ValueError(f"{type(parent).__name__}.{'/'.join(names)} mix weight formats: {formats}")
        fmt = formats.pop()
        full_names = [f"{where}.{name}" for name in names]
        for module, name in zip(modules, names):
            rows = module.weight.shape[0]
            if fmt is not None and rows % fmt.group_n:
                raise ValueError(
                    f"{name} has {rows} output rows, not a multiple of its {fmt.group_n}-row scale blocks, so it "
                    f"cannot share a fused weight with {'/'.join(n for n in names if n != name)}"
                )
        weight = self.fuse(modules, "weight", full_names)
        bias = self.fuse(modules, "bias", full_names)
        if fmt is None:
            return Linear(weight, group_k=weight.shape[1], bias=bias)
        zero = self.fuse(modules, fmt.zero, full_names) if fmt.zero else None
        return Linear(weight, self.fuse(modules, fmt.scale, full_names), zero, fmt.group_n, fmt.group_k, bias)

    def norm(self, module: nn.Module, name: str) -> Norm:
        return Norm(self.own(module, "weight", f"{name}.weight"), module.variance_epsilon)

    def mlp(self, module: nn.Module, name: str) -> DenseMlpWeights | MoeMlpWeights:
        if not isinstance(module, Qwen3MoeSparseMoeBlock):
            return DenseMlpWeights(self.fused_linear(module, ["gate_proj", "up_proj"], name),
                                   self.linear(module.down_proj, f"{name}.down_proj"))
        router, experts = module.gate, module.experts
        fmt = experts_format(experts)
        where = f"{name}.experts"
        tensors = [self.own(experts, name, f"{where}.{name}") for name in experts_scale_names(experts)]
        scales = (*tensors[:2], fmt.group_n, fmt.group_k, *tensors[2:]) if tensors else ()
        return MoeMlpWeights(self.linear(router, f"{name}.gate"), router.top_k, router.norm_topk_prob,
                             self.own(experts, "gate_up_proj", f"{where}.gate_up_proj"),
                             self.own(experts, "down_proj", f"{where}.down_proj"), scales)


def model_shape(model: nn.Module) -> Shape:
    attn = model.model.layers[0].self_attn
    heads = [local(proj.weight).shape[0] // attn.head_dim for proj in (attn.q_proj, attn.k_proj)]
    return Shape(len(model.model.layers), *heads, attn.head_dim)


def build_weights(model: nn.Module) -> DecoderWeights:
    """Fuse q/k/v and (dense MLPs') gate/up of every layer, in place, without copying any weight twice, and gather
    every tensor our forward reads."""
    shape = model_shape(model)  # before fusing: the projections' own rows
    builder = _Builder()
    layers = []
    for i, layer in enumerate(model.model.layers):
        where = f"model.layers.{i}"
        attn = layer.self_attn
        attention = AttentionWeights(
            builder.fused_linear(attn, ["q_proj", "k_proj", "v_proj"], f"{where}.self_attn"),
            builder.linear(attn.o_proj, f"{where}.self_attn.o_proj"),
            builder.norm(attn.q_norm, f"{where}.self_attn.q_norm"),
            builder.norm(attn.k_norm, f"{where}.self_attn.k_norm"),
        )
        layers.append(LayerWeights(builder.norm(layer.input_layernorm, f"{where}.input_layernorm"), attention,
                                   builder.norm(layer.post_attention_layernorm, f"{where}.post_attention_layernorm"),
                                   builder.mlp(layer.mlp, f"{where}.mlp")))
    embed = builder.own(model.model.embed_tokens, "weight", "model.embed_tokens.weight")
    final_norm = builder.norm(model.model.norm, "model.norm")
    lm_head = builder.linear(model.lm_head, "lm_head")
    return DecoderWeights(shape, embed, layers, final_norm, lm_head, builder.bindings, builder.fused)


def mlp_weights(module: nn.Module) -> DenseMlpWeights | MoeMlpWeights:
    """The feed-forward block `module` (a dense MLP, fused in place, or a sparse MoE block) alone, e.g. to time it."""
    return _Builder().mlp(module, "mlp")
