"""Weight-only quantized projections: which modules hold them, how to read them, and quantizing at optimize time.

Two module classes hold quantized projections of a decoder layer (q/k/v/o, gate/up/down), and one MoE experts:

- transformers' own `FP8Linear` (fine-grained FP8: e4m3 `weight` and an fp32 `weight_scale_inv` per block), as
  transformers loads Qwen's FP8 checkpoints, and as `optimize(model, weights="fp8")` makes them (with
  `config.quantization_config` set, so `save_pretrained` writes a checkpoint transformers loads as FP8);
- `QuantizedLinear` (this module) for `weights="int8"` (per output row) and `weights="int4"` (asymmetric, groups of
  128 along the input);
- transformers' `FP8Experts` (fp8 `gate_up_proj` / `down_proj` with `*_scale_inv` block scales) or our int8 / int4
  `QuantizedExperts`, run by `fused_moe`.

The formats are custom_ops/formats.py's. The projections run `torch.ops.qwen3_accel.quantized_linear`
(custom_ops/linear.py), the experts `fused_moe` with their scales, in our forward and in HF's: an FP8Linear's
`forward` is replaced per instance by ours, since transformers' needs the `kernels` package and a kernel downloaded
from the Hub. Embeddings, norms, the router and the LM head stay in the model dtype.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear

from .custom_ops.formats import (
    FP8_BLOCK,
    FP8_DTYPE,
    INT4_GROUP,
    largest_power_of_two_dividing,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

WEIGHT_FORMATS = ("int8", "int4", "fp8")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class LinearFormat:
    """Where a projection's quantized tensors live on its module, and the shape of one scale group."""

    scale: str  # attribute holding the scales
    zero: str | None  # attribute holding the zero points (int4)
    group_n: int
    group_k: int


class QuantizedLinear(nn.Module):
    """A linear layer with int8 or packed int4 weights (the formats of `custom_ops.formats`)."""

    def __init__(self, in_features: int, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_n: int, group_k: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.group_n, self.group_k = group_n, group_k
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.weight_zero = None if zero is None else nn.Parameter(zero, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantizedLinear":
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if fmt == "int8":
            qweight, scale = quantize_int8(weight)
            return cls(linear.in_features, qweight, scale, None, 1, linear.in_features, bias)
        qweight, scale, zero = quantize_int4(weight, INT4_GROUP)
        return cls(linear.in_features, qweight, scale, zero, 1, INT4_GROUP, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_forward(self, x)

    def extra_repr(self) -> str:
        fmt = "int8" if self.weight.dtype == torch.int8 else f"int4, groups of {self.group_k}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"


class QuantizedExperts(nn.Module):
    """Qwen3-MoE experts in int8 (one fp32 scale per output row of each expert's matrix) or int4 (packed, asymmetric,
    groups of 128 along the input, as QuantizedLinear), run by `fused_moe`. The scales are named as in transformers'
    FP8Experts (`*_scale_inv`, multiplied), so one code path reads both."""

    def __init__(self, experts: nn.Module, fmt: str):
        super().__init__()
        self.fmt = fmt
        for attr in ("gate_up_proj", "down_proj"):
            matrices = getattr(experts, attr).detach()
            per_expert = [quantize_int8(w) if fmt == "int8" else quantize_int4(w, INT4_GROUP) for w in matrices]
            parts = [torch.stack([p[i] for p in per_expert]) for i in range(len(per_expert[0]))]
            del per_expert, matrices
            setattr(experts, attr, None)  # release the unquantized matrix before the next one is quantized
            setattr(self, attr, nn.Parameter(parts[0], requires_grad=False))
            setattr(self, f"{attr}_scale_inv", nn.Parameter(parts[1], requires_grad=False))
            if fmt == "int4":
                setattr(self, f"{attr}_zero", nn.Parameter(parts[2], requires_grad=False))
        in_features = (self.gate_up_proj.shape[2], self.down_proj.shape[2])
        # int8: one group spans every row; int4: groups of 128 (the stored columns are half the inputs)
        self.group_k = max(in_features) if fmt == "int8" else INT4_GROUP

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        zeros = (self.gate_up_proj_zero, self.down_proj_zero) if self.fmt == "int4" else ()
        return torch.ops.qwen3_accel.fused_moe(
            hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
            self.gate_up_proj_scale_inv, self.down_proj_scale_inv, 1, self.group_k, *zeros,
        )

    def extra_repr(self) -> str:
        return f"experts={self.gate_up_proj.shape[0]}, {self.fmt}, groups of 1x{self.group_k}"


def linear_format(module: nn.Module) -> LinearFormat | None:
    """How `module`'s weight is quantized; None for a plain linear in the model dtype."""
    if isinstance(module, QuantizedLinear):
        return LinearFormat("weight_scale", "weight_zero" if module.weight_zero is not None else None,
                            module.group_n, module.group_k)
    if isinstance(module, FP8Linear) and module.weight.dtype == FP8_DTYPE and module.block_size is not None:
        block_n, block_k = module.block_size
        return LinearFormat("weight_scale_inv", None, block_n, block_k)
    return None


def quantized_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a quantized projection through our registered op (what HF's own forward runs)."""
    fmt = linear_format(module)
    zero = getattr(module, fmt.zero) if fmt.zero else None
    out = torch.ops.qwen3_accel.quantized_linear(x, module.weight, getattr(module, fmt.scale), zero, fmt.group_n,
                                                 fmt.group_k)
    return out if module.bias is None else out + module.bias


def experts_format(experts: nn.Module) -> LinearFormat | None:
    """How MoE experts are quantized (our int8 QuantizedExperts, or transformers' FP8Experts: fp8 values, fp32
    block scales); None if not."""
    if isinstance(experts, QuantizedExperts):
        return LinearFormat("gate_up_proj_scale_inv", "gate_up_proj_zero" if experts.fmt == "int4" else None, 1,
                            experts.group_k)
    scale = getattr(experts, "gate_up_proj_scale_inv", None)
    if scale is None or experts.gate_up_proj.dtype != FP8_DTYPE or experts.block_size is None:
        return None
    block_n, block_k = experts.block_size
    return LinearFormat("gate_up_proj_scale_inv", None, block_n, block_k)


def experts_scale_names(experts: nn.Module) -> list[str]:
    """The attributes holding quantized experts' scales (and int4 zero points), in `fused_moe`'s argument order
    (gate_up_scale, down_scale, then after the groups gate_up_zero, down_zero); empty if not quantized."""
    fmt = experts_format(experts)
    if fmt is None:
        return []
    zeros = ["gate_up_proj_zero", "down_proj_zero"] if fmt.zero else []
    return ["gate_up_proj_scale_inv", "down_proj_scale_inv", *zeros]


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder-layer projections and MoE experts of `model` that hold quantized weights."""
    experts = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    return [m for _, _, m in projections(model) if linear_format(m) is not None] + [
        m for m in experts if experts_format(m) is not None]


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_modules(model))


def projections(model: nn.Module):
    """(parent module, attribute name, module) of every decoder-layer projection the model has."""
    for layer in model.model.layers:
        for path in PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            if hasattr(parent, name):
                yield parent, name, getattr(parent, name)


def check_quantized(model: nn.Module) -> None:
    """Raise (before anything changes) for quantized weights our forward cannot run, naming what it runs."""
    supported = ("quantized decoder-layer projections (q/k/v/o, gate/up/down) as transformers' fine-grained "
                 "FP8Linear with fp32 block scales or qwen3_accel's int8/int4 QuantizedLinear, and MoE experts as "
                 "transformers' FP8Experts")
    config = getattr(model.config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    if config is not None and not config.get("dequantize", False):
        method = config.get("quant_method")
        method = str(getattr(method, "value", method))
        if method != "fp8":
            raise TypeError(
                f"qwen3_accel.optimize runs unquantized weights (fp32, fp16, bf16) and transformers' fine-grained "
                f"FP8 (quant_method 'fp8'); this model was loaded with quantization method {method!r}. Load the "
                "unquantized checkpoint and pass weights='int8', 'int4' or 'fp8' to optimize instead"
            )
        if config.get("activation_scheme", "dynamic") != "dynamic":
            raise TypeError(
                f"qwen3_accel.optimize runs FP8 checkpoints with activation_scheme 'dynamic' (Qwen's); this one has "
                f"{config.get('activation_scheme')!r}"
            )
    ours = {id(module) for module in quantized_modules(model)}
    for name, module in model.named_modules():
        if id(module) in ours:
            scales = [t for attr, t in module.named_parameters(recurse=False) if attr.endswith("scale_inv")]
            static = getattr(module, "activation_scheme", "dynamic") != "dynamic"
            if static or any(t.dtype != torch.float32 for t in scales) or not getattr(module, "has_gate", True):
                raise TypeError(f"{name} is FP8 with scales in {scales[0].dtype}, activation scheme "
                                f"{getattr(module, 'activation_scheme', None)!r}; qwen3_accel runs {supported}")
            continue
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, tensor in tensors:
            if tensor.dtype.itemsize == 1 or tensor.dtype == torch.int32:
                raise TypeError(f"qwen3_accel.optimize cannot run {name}.{attr} ({tensor.dtype}, in "
                                f"{type(module).__name__}); it runs {supported}")


def check_weights_option(model: nn.Module, weights: str | None) -> None:
    """Raise for an `optimize(weights=...)` this version cannot do on `model`, before anything changes."""
    if weights is None:
        return
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r} is not supported; choose one of {WEIGHT_FORMATS} or None")
    if is_quantized(model):
        raise ValueError(f"weights={weights!r}: this model's projections are already quantized; optimize it without "
                         "`weights` to run them as they are")


def _fp8_block_rows(model: nn.Module) -> int:
    """Rows of one fp8 scale block: 128 (Qwen's checkpoints), or the largest power of two below it that divides
    every projection's rows (and each half of the experts' gate/up), so that fused and packed matrices never have
    a block straddling two of their parts."""
    rows = [linear.out_features for _, _, linear in projections(model)]
    rows += [layer.mlp.experts.down_proj.shape[-1] for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    return min([FP8_BLOCK] + [largest_power_of_two_dividing(n) for n in rows])


def _quantize_fp8(model: nn.Module, block_n: int) -> None:
    """transformers' own FP8 modules (FP8Linear, FP8Experts) in place of the projections and experts, holding our
    quantization of their weights: the layout transformers builds when it loads an FP8 checkpoint.

    Each weight is replaced by its fp8 values as soon as they exist, so memory peaks at the model plus one weight
    (a 30B MoE in bf16 and its fp8 copy would not fit one GPU together)."""
    config = FineGrainedFP8Config(weight_block_size=(block_n, FP8_BLOCK), modules_to_not_convert=["lm_head"])
    tensors = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            qweight, tensors[f"{name}.weight_scale_inv"] = quantize_fp8(module.weight.detach(), block_n, FP8_BLOCK)
            module.weight = tensors[f"{name}.weight"] = nn.Parameter(qweight, requires_grad=False)
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()
        elif name.endswith(".experts") and hasattr(module, "gate_up_proj"):
            for attr in ("gate_up_proj", "down_proj"):
                per_expert = [quantize_fp8(w, block_n, FP8_BLOCK) for w in getattr(module, attr).detach()]
                tensors[f"{name}.{attr}_scale_inv"] = torch.stack([scale for _, scale in per_expert])
                qweight = nn.Parameter(torch.stack([q for q, _ in per_expert]), requires_grad=False)
                del per_expert
                setattr(module, attr, qweight)
                tensors[f"{name}.{attr}"] = qweight
    replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"], quantization_config=config, pre_quantized=True)
    model.load_state_dict(tensors, strict=False, assign=True)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"quantizing to fp8 left {name} without a value (a layout transformers changed?)")
    model.config.quantization_config = config


def _refuse_to_save(*args, **kwargs) -> None:
    raise ValueError(
        "this model's projections were quantized to int8/int4 by qwen3_accel.optimize(weights=...), a format "
        "transformers cannot load (it would read the integers as weights); save the unquantized model and quantize "
        "when loading it, or use weights='fp8', which saves as transformers' FP8 checkpoint format"
    )


def quantize_model(model: nn.Module, fmt: str) -> None:
    """Replace every decoder-layer projection still in the model dtype by its `fmt` version, in place.

    The unquantized weights are released (that is the point). fp8 also sets `config.quantization_config` to
    transformers' FineGrainedFP8Config, so the model saves as an FP8 checkpoint transformers can load. int8/int4
    are our formats, which transformers would load as plain weights (the integers read as values, silently wrong):
    their `save_pretrained` raises instead.
    """
    check_weights_option(model, fmt)
    if fmt == "fp8":
        _quantize_fp8(model, _fp8_block_rows(model))
        return
    for parent, name, linear in list(projections(model)):
        setattr(parent, name, QuantizedLinear.from_linear(linear, fmt))
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = QuantizedExperts(layer.mlp.experts, fmt)
    model.save_pretrained = _refuse_to_save


def use_our_fp8_forward(model: nn.Module) -> None:
    """Make HF's own forward run transformers' FP8Linear modules through our op."""
    for module in model.modules():
        if isinstance(module, FP8Linear) and linear_format(module) is not None:
            module.forward = functools.partial(quantized_forward, module)  # a partial pickles; a bound method not
