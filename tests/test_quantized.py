"""Weight-only quantized projections: the kernel against dequantize-then-matmul, the quantizers, whole models in
each format (our forward and HF's) against HF eager on the dequantized weights, FP8 checkpoints as transformers
builds them, and the refusals.

transformers' own FP8 forward cannot run on the CPU (its kernels need a GPU and the `kernels` package), so the FP8
checkpoint model is compared with HF eager on its dequantized weights instead; the comparison with transformers' FP8
forward is a GPU-suite measurement.
"""

import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear

import qwen3_accel
from conftest import left_padded_batch
from qwen3_accel import quantize
from qwen3_accel.configs import build_model
from qwen3_accel.custom_ops import fallback, formats, moe
from qwen3_accel.custom_ops import linear as ql

GREEDY = dict(do_sample=False, pad_token_id=0)


def quantized(weight: torch.Tensor, fmt: str, fp8_block=(32, 64)):
    """(qweight, scale, zero, group_n, group_k) of `weight` in `fmt`."""
    if fmt == "int8":
        return (*formats.quantize_int8(weight), None, 1, weight.shape[1])
    if fmt == "int4":
        return (*formats.quantize_int4(weight), 1, formats.INT4_GROUP)
    return (*formats.quantize_fp8(weight, *fp8_block), None, *fp8_block)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("n_out,n_in", [(96, 64), (131, 200), (48, 257)])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_dequantized_matmul(fmt, n_out, n_in, rows, dtype):
    """Odd shapes (rows and columns not multiples of any block, an odd K for packed int4, partial scale groups),
    the GEMV path (1, 3 rows) and the tl.dot path (17 rows), interpreted."""
    g = torch.Generator().manual_seed(n_out * n_in + rows)
    weight = torch.randn(n_out, n_in, generator=g) * 0.05
    qweight, scale, zero, group_n, group_k = quantized(weight.to(dtype), fmt)
    x = torch.randn(2, rows, n_in, generator=g).to(dtype)
    expected = x.float() @ formats.dequantize(qweight, scale, zero, group_n, group_k, n_in).T
    actual = ql.quantized_linear_triton(x, qweight, scale, zero, group_n, group_k)
    assert actual.shape == (2, rows, n_out) and actual.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(ql.quantized_linear_reference(x, qweight, scale, zero, group_n, group_k).float(),
                               expected, rtol=tol, atol=tol)


def test_quantizers_error_bounds():
    """Each format reproduces the weight to within its step: int8 half a step of the row's max/127, int4 half a
    step of its group's range/15, fp8 e4m3's 3 mantissa bits (relative 2^-4) of its block's scale."""
    weight = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    weight[3] *= 50  # one loud row must not cost the others their precision
    for fmt in ("int8", "int4", "fp8"):
        qweight, scale, zero, group_n, group_k = quantized(weight, fmt, fp8_block=(32, 128))
        error = (formats.dequantize(qweight, scale, zero, group_n, group_k, 384) - weight).abs()
        if fmt == "int8":
            bound = weight.abs().amax(dim=1, keepdim=True) / 127 / 2
        elif fmt == "int4":
            groups = weight.view(64, 3, 128)
            bound = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(128, 1) * 0.51
        else:
            bound = weight.abs().view(2, 32, 3, 128).amax(dim=(1, 3)).repeat_interleave(32, 0).repeat_interleave(
                128, 1) * 2**-4
        assert (error <= bound + 1e-6).all(), fmt


def dequantized_reference(model: nn.Module, source: nn.Module) -> nn.Module:
    """`source` (an unoptimized HF model of the same shape) with every quantized projection of `model` dequantized
    into its weights: HF eager on exactly the weights the quantized model stands for."""
    state = source.state_dict()
    for name, module in model.named_modules():
        fmt = quantize.linear_format(module)
        experts = quantize.experts_format(module)
        if experts is not None:
            for attr in ("gate_up_proj", "down_proj"):
                scale, zero = getattr(module, f"{attr}_scale_inv"), getattr(module, f"{attr}_zero", None)
                n_in = module.down_proj.shape[1] if attr == "gate_up_proj" else module.gate_up_proj.shape[1] // 2
                state[f"{name}.{attr}"] = formats.dequantize(getattr(module, attr), scale, zero,
                                                             experts.group_n, experts.group_k, n_in)
        if fmt is not None:
            zero = getattr(module, fmt.zero) if fmt.zero else None
            state[f"{name}.weight"] = formats.dequantize(module.weight, getattr(module, fmt.scale), zero,
                                                         fmt.group_n, fmt.group_k, module.in_features)
    source.load_state_dict(state)
    return source


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_optimize_quantizes_and_matches_dequantized_model(fmt, kernels):
    """optimize(weights=fmt): greedy tokens equal HF eager's on the dequantized weights (fp32), through our forward
    (fast loop and HF's loop on our cache) and HF's own forward (output_hidden_states); the unquantized projection
    weights are released and the weights take the bytes the format says."""
    model = build_model("tiny", seed=1)
    dense_bytes = sum(m.weight.numel() for _, _, m in quantize.projections(model)) * 4
    qwen3_accel.optimize(model, weights=fmt, kernels=kernels, compile=False)
    reference = dequantized_reference(model, build_model("tiny", seed=1))
    projections = [m for _, _, m in quantize.projections(model)]
    assert all(quantize.linear_format(m) is not None for m in projections)
    assert isinstance(projections[0], FP8Linear if fmt == "fp8" else quantize.QuantizedLinear)

    ids, mask = left_padded_batch([5, 9], reference.config.vocab_size, seed=3)
    for kwargs in (dict(max_new_tokens=10), dict(max_new_tokens=6, repetition_penalty=1.3)):
        expected = reference.generate(ids, attention_mask=mask, **GREEDY, **kwargs)
        assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY, **kwargs), expected), kwargs
    real = mask.bool()  # logits at padding positions are not compared
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        hf = model(ids, attention_mask=mask, output_hidden_states=True).logits[real]  # HF's forward, our op
        torch.testing.assert_close(ours, reference(ids, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hf, ours, rtol=1e-4, atol=1e-4)

    storages = {}
    for module in projections:
        for tensor in module.parameters():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    def format_bytes(m: nn.Module) -> float:  # values as the format says, plus one scale (and zero) per group
        n_out, n_in = m.weight.shape[0], m.in_features
        fmt_ = quantize.linear_format(m)
        groups = -(-n_out // fmt_.group_n) * -(-n_in // fmt_.group_k)
        values = n_out * n_in * (0.5 if fmt == "int4" else 1)
        return values + groups * (getattr(m, fmt_.scale).element_size() + (1 if fmt_.zero else 0))

    assert sum(storages.values()) == sum(format_bytes(m) for m in projections)  # nothing else kept
    assert sum(storages.values()) < dense_bytes / 3


def fp8_checkpoint_model(name: str, block=(32, 32), seed=2) -> tuple[nn.Module, dict]:
    """A model built the way transformers loads a fine-grained FP8 checkpoint: its own `replace_with_fp8_linear`
    (FP8Linear modules on the meta device), then the checkpoint's tensors (e4m3 weights + fp32 block scales,
    quantized here from a random model) assigned. Returns it and the checkpoint."""
    source = build_model(name, seed=seed)
    config = FineGrainedFP8Config(weight_block_size=block, modules_to_not_convert=["lm_head"])
    model = build_model(name, seed=seed)
    replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"], quantization_config=config, pre_quantized=True)
    checkpoint = source.state_dict()
    for name_, module in model.named_modules():
        if isinstance(module, FP8Linear):
            qweight, scale = formats.quantize_fp8(checkpoint[f"{name_}.weight"], *block)
            checkpoint[f"{name_}.weight"], checkpoint[f"{name_}.weight_scale_inv"] = qweight, scale
        elif quantize.experts_format(module) is not None:
            for attr in ("gate_up_proj", "down_proj"):
                per_expert = [formats.quantize_fp8(w, *block) for w in checkpoint[f"{name_}.{attr}"]]
                checkpoint[f"{name_}.{attr}"] = torch.stack([q for q, _ in per_expert])
                checkpoint[f"{name_}.{attr}_scale_inv"] = torch.stack([scale for _, scale in per_expert])
    model.load_state_dict(checkpoint, assign=True)
    model.config.quantization_config = config
    return model, checkpoint


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_fp8_checkpoint_runs_on_its_own_tensors(name):
    """A transformers-built FP8 model (dense, or MoE with FP8Experts): optimize accepts it, runs its e4m3 weights and
    block scales in place (the state_dict is still the checkpoint, value for value) and matches HF eager on the
    dequantized weights, through our forward and HF's."""
    model, checkpoint = fp8_checkpoint_model(name)
    qwen3_accel.optimize(model, compile=False)
    reference = dequantized_reference(model, build_model(name, seed=2))
    state = model.state_dict()
    assert state.keys() == checkpoint.keys()
    assert all(torch.equal(state[k].view(torch.uint8) if state[k].dtype == formats.FP8_DTYPE else state[k],
                           v.view(torch.uint8) if v.dtype == formats.FP8_DTYPE else v) for k, v in checkpoint.items())
    attn = model.model.layers[0].self_attn
    qkv = model.qwen3_accel.runner.weights.layers[0].attention.qkv
    assert attn.q_proj.weight.data_ptr() == qkv.weight.data_ptr()  # fused in place, no copy
    assert attn.k_proj.weight_scale_inv.data_ptr() == qkv.scale[4:].data_ptr()  # q: 128 rows = 4 blocks

    ids, mask = left_padded_batch([6, 3], reference.config.vocab_size, seed=4)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY), expected)
    real = mask.bool()
    with torch.no_grad():  # HF's forward on FP8Linear modules runs our op (transformers' needs a GPU kernel)
        hf = model(ids, attention_mask=mask, output_hidden_states=True).logits[real]
    torch.testing.assert_close(hf, reference(ids, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-4)


def test_fp8_weights_save_as_a_transformers_fp8_checkpoint(tmp_path):
    """optimize(weights='fp8') writes transformers' format: from_pretrained reads it back as FP8 (on the CPU
    transformers dequantizes it), with the weights our quantized model stands for."""
    model = qwen3_accel.optimize(build_model("tiny", seed=5), weights="fp8", compile=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "fp8" and saved["weight_block_size"] == [64, 128]  # tiny: k_proj has 64 rows
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # dequantized: no GPU here
    q_proj = model.model.layers[1].self_attn.q_proj
    expected = formats.dequantize(q_proj.weight, q_proj.weight_scale_inv, None, *q_proj.block_size,
                                  q_proj.in_features)
    torch.testing.assert_close(loaded.model.layers[1].self_attn.q_proj.weight, expected)  # the scales were applied
    qwen3_accel.optimize(loaded, compile=False)  # the dequantized load is a plain model


def test_replaced_quantized_weights_are_used():
    """load_state_dict of another int8 model's tensors reaches the fused buffers: outputs become that model's."""
    first = qwen3_accel.optimize(build_model("tiny", seed=6), weights="int8", compile=False)
    second = qwen3_accel.optimize(build_model("tiny", seed=7), weights="int8", compile=False)
    ids = torch.randint(1, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = second.generate(ids, max_new_tokens=8, **GREEDY)
    first.load_state_dict(second.state_dict())
    assert torch.equal(first.generate(ids, max_new_tokens=8, **GREEDY), expected)


def test_unsupported_quantized_models_are_refused_before_any_change():
    with pytest.raises(ValueError, match="weights='int2' is not supported; choose one of"):
        qwen3_accel.optimize(build_model("tiny"), weights="int2")

    fp8_router, _ = fp8_checkpoint_model("tiny-moe")
    router = fp8_router.model.layers[0].mlp.gate
    router.weight = nn.Parameter(router.weight.detach().to(formats.FP8_DTYPE), requires_grad=False)
    with pytest.raises(TypeError, match=r"mlp.gate.weight \(torch.float8_e4m3fn.*it runs quantized decoder-layer"):
        qwen3_accel.optimize(fp8_router)

    model, _ = fp8_checkpoint_model("tiny")
    with pytest.raises(ValueError, match="already quantized"):
        qwen3_accel.optimize(model, weights="int4")
    model.config.quantization_config = FineGrainedFP8Config(activation_scheme="static")
    with pytest.raises(TypeError, match="activation_scheme 'dynamic'"):
        qwen3_accel.optimize(model)
    assert not hasattr(model, "qwen3_accel")


def test_compiled_decode_step_runs_the_quantized_op():
    """The quantized op traces into the compiled step (fullgraph, no eager fallback): same tokens as eager."""
    from torch._dynamo.utils import counters

    ids = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    eager = qwen3_accel.optimize(build_model("tiny", seed=3), weights="int4", compile=False)
    compiled = qwen3_accel.optimize(build_model("tiny", seed=3), weights="int4")
    counters.clear()
    expected = eager.generate(ids, max_new_tokens=8, **GREEDY)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, **GREEDY), expected)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1


def test_deepcopy_and_pickle_of_a_quantized_model():
    """Copies re-fuse their own quantized tensors (views again) and give the same tokens."""
    import copy
    import io

    ids = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    for fmt in ("int4", "fp8"):
        model = qwen3_accel.optimize(build_model("tiny", seed=3), weights=fmt, compile=False)
        expected = model.generate(ids, max_new_tokens=8, **GREEDY)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert torch.equal(twin.generate(ids, max_new_tokens=8, **GREEDY), expected), fmt
            attn = twin.model.layers[0].self_attn
            qkv = twin.qwen3_accel.runner.weights.layers[0].attention.qkv.weight
            assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
            assert qkv.data_ptr() != model.qwen3_accel.runner.weights.layers[0].attention.qkv.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [(32, 32), (16, 64), (128, 128), "int8", "int4"])
@pytest.mark.parametrize("path", [moe.fused_moe_gemv, moe.fused_moe_grouped])
def test_fused_moe_with_quantized_experts(dtype, group, path):
    """fp8 experts with block scales (blocks larger than, equal to and inside the matrices; odd hidden size), int8
    experts with a scale per row and packed int4 experts (groups of 32 with zero points), through both fused paths,
    interpreted, against HF's expert loop on the dequantized experts."""
    g = torch.Generator().manual_seed(7 if isinstance(group, str) else sum(group))
    n_experts, hidden, inter, top_k = 8, 96, 64, 2

    def experts(rows, cols):
        weights = [torch.randn(rows, cols, generator=g) * 0.05 for _ in range(n_experts)]
        per_expert = [formats.quantize_int8(w) if group == "int8" else formats.quantize_int4(w, 32) if group == "int4"
                      else formats.quantize_fp8(w, *group) for w in weights]
        return [torch.stack([p[i] for p in per_expert]) for i in range(len(per_expert[0]))]

    gate_up, down = experts(2 * inter, hidden), experts(hidden, inter)
    groups = {"int8": (1, hidden), "int4": (1, 32)}.get(group, group)
    scales = (gate_up[1], down[1], *groups, *((gate_up[2], down[2]) if group == "int4" else ()))
    gate_up, down = gate_up[0], down[0]
    for tokens in (1, 3, 9):
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        weights = torch.rand(tokens, top_k, generator=g)
        ids = torch.randint(0, n_experts, (tokens, top_k), generator=g, dtype=torch.int32)
        expected = moe.fused_moe_reference(x, gate_up, down, weights, ids, *scales)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(path(x, gate_up, down, weights, ids, *scales), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_moe_quantized_weights_match_dequantized_model(fmt, kernels):
    """optimize(tiny-moe, weights=fmt): experts become transformers' FP8Experts (fp8 + block scales) or our int8 /
    int4 QuantizedExperts; greedy tokens equal HF eager's on the dequantized weights, through our forward and HF's."""
    model = qwen3_accel.optimize(build_model("tiny-moe", seed=1), weights=fmt, kernels=kernels, compile=False)
    reference = dequantized_reference(model, build_model("tiny-moe", seed=1))
    experts = model.model.layers[0].mlp.experts
    values = {"fp8": formats.FP8_DTYPE, "int8": torch.int8, "int4": torch.uint8}[fmt]
    assert experts.gate_up_proj.dtype == values and experts.down_proj.dtype == values
    assert quantize.experts_format(experts).group_n == {"fp8": 32, "int8": 1, "int4": 1}[fmt]
    ids, mask = left_padded_batch([5, 8], reference.config.vocab_size, seed=3)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY), expected)
    real = mask.bool()
    with torch.no_grad():
        hf = model(ids, attention_mask=mask, output_hidden_states=True).logits[real]  # HF's forward, our experts
    torch.testing.assert_close(hf, reference(ids, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-4)


def test_kernel_that_cannot_build_falls_back_to_dequantize_then_matmul(monkeypatch, caplog):
    """A GPU where Triton cannot build the kernel (simulated: the launcher raises Triton's compilation error, as for
    e4m3 on a GPU without it) gets correct results from the reference, one warning naming the kernel, its weight
    dtype and the cause, and no further attempts; under QWEN3_ACCEL_STRICT_COMPILE=1 the error is raised instead."""
    from triton.compiler.errors import CompilationError

    calls = []

    def cannot_build(*args):
        calls.append(args)
        raise CompilationError("kernel.py", None, "fp8e4nv not supported in this architecture")

    monkeypatch.setattr(fallback, "unbuildable", {})
    packed = quantized(torch.randn(40, 64), "fp8", fp8_block=(32, 32))
    x = torch.randn(3, 64)
    monkeypatch.setenv("QWEN3_ACCEL_STRICT_COMPILE", "1")
    with pytest.raises(CompilationError):
        ql.triton_or_reference(cannot_build, ql.quantized_linear_reference, x, *packed)
    assert not fallback.unbuildable
    monkeypatch.delenv("QWEN3_ACCEL_STRICT_COMPILE")
    for _ in range(2):
        torch.testing.assert_close(ql.triton_or_reference(cannot_build, ql.quantized_linear_reference, x, *packed),
                                   ql.quantized_linear_reference(x, *packed))
    assert len(calls) == 2
    assert "CompilationError" in fallback.unbuildable[("cannot_build", "torch.float8_e4m3fn weights")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "Triton cannot build cannot_build for torch.float8_e4m3fn weights on this GPU (CompilationError" in warnings[0]
    assert "the torch reference" in warnings[0]
    # Other weight dtypes still try their kernel.
    int8 = quantized(torch.randn(40, 64), "int8")
    ql.triton_or_reference(cannot_build, ql.quantized_linear_reference, x, *int8)
    assert len(calls) == 3


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_op_registrations(fmt):
    """Schema and fake (meta) implementations of both ops with quantized arguments, as torch.compile uses them.
    (opcheck's schema check compares inputs with arithmetic CPU fp8 lacks: fp8 gets the fake-tensor check only.)"""
    packed = quantized(torch.randn(40, 64), fmt, fp8_block=(32, 32))
    checks = ("test_faketensor",) if fmt == "fp8" else ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.qwen3_accel.quantized_linear, (torch.randn(3, 64), *packed), test_utils=checks)
    if fmt == "fp8":
        gate_up = [formats.quantize_fp8(torch.randn(64, 32), 32, 32) for _ in range(4)]
        down = [formats.quantize_fp8(torch.randn(32, 32), 32, 32) for _ in range(4)]
        stack = lambda pairs, i: torch.stack([p[i] for p in pairs])  # noqa: E731
        args = (torch.randn(3, 32), stack(gate_up, 0), stack(down, 0), torch.rand(3, 2),
                torch.randint(0, 4, (3, 2), dtype=torch.int32), stack(gate_up, 1), stack(down, 1), 32, 32)
        torch.library.opcheck(torch.ops.qwen3_accel.fused_moe, args, test_utils=checks)


def test_int8_and_int4_models_refuse_save_pretrained(tmp_path):
    """Our int8/int4 tensors are not a format transformers loads (it would read the integers as weights, silently
    wrong): save_pretrained says so instead of writing such a checkpoint."""
    for fmt in ("int8", "int4"):
        model = qwen3_accel.optimize(build_model("tiny", seed=5), weights=fmt, compile=False)
        with pytest.raises(ValueError, match="transformers cannot load.*weights='fp8'"):
            model.save_pretrained(tmp_path)
        assert not any(tmp_path.iterdir())
