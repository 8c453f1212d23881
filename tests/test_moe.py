"""Qwen3-MoE: routing, alignment, the grouped GEMMs and the decode GEMVs against references; tiny MoE models
against HF."""

import pytest
import torch
from torch._dynamo.utils import counters
from triton.runtime.errors import OutOfResources

import qwen3_accel
from conftest import generate_without_recompiles, left_padded_batch
from qwen3_accel.configs import build_model, get_config
from qwen3_accel.custom_ops import fallback, moe
from qwen3_accel.custom_ops.moe import (
    align_slots, align_slots_reference, fused_moe_gemv, fused_moe_grouped, fused_moe_reference, fused_moe_triton,
    moe_route_reference, moe_route_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = dict(do_sample=False, pad_token_id=0)


def _routing(n_tokens, n_experts, top_k, seed):
    """Routes where expert 0 receives every token and the last expert none (when there are spare experts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int32)
    for t in range(n_tokens):
        others = torch.randperm(n_experts - 2, generator=g)[: top_k - 1] + 1 if top_k > 1 else torch.empty(0)
        ids[t] = torch.cat([torch.zeros(1), others]).to(torch.int32)[torch.randperm(top_k, generator=g)]
    weights = torch.rand(n_tokens, top_k, generator=g) + 0.1
    return (weights / weights.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("n_experts,top_k,n_tokens", [(8, 1, 7), (8, 2, 64), (128, 8, 1), (128, 8, 7), (128, 2, 64)])
def test_route_matches_reference(n_experts, top_k, n_tokens):
    logits = torch.randn(n_tokens, n_experts, device=DEVICE)
    for renormalize in (True, False):
        weights, ids = moe_route_triton(logits, top_k, renormalize)
        ref_weights, ref_ids = moe_route_reference(logits, top_k, renormalize)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_tokens,n_experts,top_k,block_m", [(1, 128, 8, 16), (7, 16, 4, 4), (16, 128, 8, 16),
                                                               (3, 8, 2, 64)])
def test_single_launch_alignment_matches_reference(n_tokens, n_experts, top_k, block_m):
    _, ids = _routing(n_tokens, n_experts, top_k, seed=n_tokens)
    for ours, ref in zip(align_slots(ids, n_experts, block_m), align_slots_reference(ids, n_experts, block_m)):
        assert torch.equal(ours, ref)


def test_align_slots_groups_every_slot_once():
    _, ids = _routing(7, 16, 4, seed=0)
    sorted_slots, block_expert, n_padded = align_slots_reference(ids, 16, block_m=4)
    n_slots = ids.numel()
    used = sorted_slots[: int(n_padded)]
    real = used[used < n_slots]
    assert sorted(real.tolist()) == list(range(n_slots))
    assert int(n_padded) % 4 == 0 and (sorted_slots[int(n_padded):] == n_slots).all()
    flat = ids.reshape(-1)
    for block in range(int(n_padded) // 4):
        rows = sorted_slots[block * 4 : block * 4 + 4]
        rows = rows[rows < n_slots].long()
        assert (flat[rows] == block_expert[block]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens", [1, 7, 64])
@pytest.mark.parametrize("n_experts,top_k", [(8, 1), (8, 2), (8, 8), (128, 1), (128, 2), (128, 8)])
def test_fused_moe_matches_reference(n_experts, top_k, n_tokens, dtype):
    if top_k == n_experts:
        pytest.skip("needs a spare expert that receives no tokens")
    hidden, inter = 64, 48
    g = torch.Generator().manual_seed(n_tokens * 1000 + n_experts + top_k)
    x = torch.randn(n_tokens, hidden, generator=g).to(DEVICE, dtype)
    gate_up = (0.2 * torch.randn(n_experts, 2 * inter, hidden, generator=g)).to(DEVICE, dtype)
    down = (0.2 * torch.randn(n_experts, hidden, inter, generator=g)).to(DEVICE, dtype)
    weights, ids = _routing(n_tokens, n_experts, top_k, seed=n_tokens)
    out = fused_moe_triton(x, gate_up, down, weights, ids)
    expected = fused_moe_reference(x, gate_up, down, weights, ids)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens,top_k", [(1, 1), (1, 8), (3, 2), (17, 3)])
@pytest.mark.parametrize("path", [fused_moe_gemv, fused_moe_grouped])
def test_both_moe_paths_match_reference_on_odd_shapes(path, n_tokens, top_k, dtype):
    """The decode GEMVs and the grouped GEMMs, each forced, on shapes that are not powers of two."""
    n_experts, hidden, inter = 12, 72, 40
    g = torch.Generator().manual_seed(n_tokens * 100 + top_k)
    x = torch.randn(n_tokens, hidden, generator=g).to(DEVICE, dtype)
    gate_up = (0.2 * torch.randn(n_experts, 2 * inter, hidden, generator=g)).to(DEVICE, dtype)
    down = (0.2 * torch.randn(n_experts, hidden, inter, generator=g)).to(DEVICE, dtype)
    weights, ids = _routing(n_tokens, n_experts, top_k, seed=n_tokens + top_k)
    out = path(x, gate_up, down, weights, ids)
    expected = fused_moe_reference(x, gate_up, down, weights, ids)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens", [1, 3, 17])
def test_moe_with_norm_before_and_residual_after(n_tokens, dtype):
    """The fused decode step's MoE call: the post-attention RMSNorm folded into the gate/up GEMVs and the residual
    add into the down GEMVs' epilogue (17 tokens: the grouped path, wrapped), against HF's RMSNorm, the expert loop
    and the add."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    n_experts, hidden, inter, top_k = 12, 72, 40, 3
    g = torch.Generator().manual_seed(n_tokens)
    stream = (3 * torch.randn(n_tokens, hidden, generator=g)).to(DEVICE, dtype)
    norm = Qwen3MoeRMSNorm(hidden, eps=1e-6).to(DEVICE, dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    gate_up = (0.2 * torch.randn(n_experts, 2 * inter, hidden, generator=g)).to(DEVICE, dtype)
    down = (0.2 * torch.randn(n_experts, hidden, inter, generator=g)).to(DEVICE, dtype)
    weights, ids = _routing(n_tokens, n_experts, top_k, seed=n_tokens)
    with torch.no_grad():
        expected = stream + fused_moe_reference(norm(stream), gate_up, down, weights, ids)
        folded = dict(norm_weight=norm.weight, eps=1e-6, residual=stream)
        torch.testing.assert_close(fused_moe_reference(stream, gate_up, down, weights, ids, **folded), expected,
                                   rtol=0, atol=0)
        out = fused_moe_triton(stream, gate_up, down, weights, ids, **folded)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tol)


def test_gemv_path_that_cannot_build_falls_back_to_grouped(monkeypatch, caplog):
    """A GPU where Triton cannot build the GEMVs (simulated: the launcher raises Triton's out-of-resources error)
    still gets correct results, from the grouped GEMMs, with one warning naming the kernel, the experts' dtype and
    the cause, and stops trying the GEMVs; under QWEN3_ACCEL_STRICT_COMPILE=1 the error is raised instead."""
    calls = []

    def cannot_build(*args):
        calls.append(args)
        raise OutOfResources(1 << 20, 1 << 16, "shared memory")

    monkeypatch.setattr(moe, "fused_moe_gemv", cannot_build)
    monkeypatch.setattr(fallback, "unbuildable", {})
    x = torch.randn(2, 64).to(DEVICE)
    gate_up, down = 0.2 * torch.randn(8, 96, 64).to(DEVICE), 0.2 * torch.randn(8, 64, 48).to(DEVICE)
    weights, ids = _routing(2, 8, 2, seed=0)
    monkeypatch.setenv("QWEN3_ACCEL_STRICT_COMPILE", "1")
    with pytest.raises(OutOfResources):
        fused_moe_triton(x, gate_up, down, weights, ids)
    monkeypatch.delenv("QWEN3_ACCEL_STRICT_COMPILE")
    for _ in range(2):
        torch.testing.assert_close(fused_moe_triton(x, gate_up, down, weights, ids),
                                   fused_moe_reference(x, gate_up, down, weights, ids), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and "OutOfResources" in fallback.unbuildable[("fused_moe_gemv", "torch.float32 experts")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "Triton cannot build fused_moe_gemv for torch.float32 experts on this GPU (OutOfResources" in warnings[0]
    assert "the grouped GEMMs" in warnings[0]


def test_moe_op_registration():
    weights, ids = _routing(3, 8, 2, seed=1)
    x = torch.randn(3, 32, device=DEVICE)
    args = (x, torch.randn(8, 48, 32, device=DEVICE), torch.randn(8, 32, 24, device=DEVICE), weights, ids)
    torch.library.opcheck(torch.ops.qwen3_accel.fused_moe, args, test_utils=("test_schema", "test_faketensor"))
    folded = dict(norm_weight=torch.rand(32, device=DEVICE), eps=1e-6, residual=torch.randn(3, 32, device=DEVICE))
    torch.library.opcheck(torch.ops.qwen3_accel.fused_moe, args, folded,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.qwen3_accel.moe_route, (torch.randn(3, 8, device=DEVICE), 2, True),
                          test_utils=("test_schema", "test_faketensor"))


def _moe_pair(norm_topk_prob, **optimize_kwargs):
    config = get_config("tiny-moe", norm_topk_prob=norm_topk_prob, mlp_only_layers=[1])
    reference = build_model(config, device=DEVICE)
    optimized = build_model(config, device=DEVICE, seed=1)
    optimized.load_state_dict(reference.state_dict())
    return reference, qwen3_accel.optimize(optimized, **optimize_kwargs)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_tiny_moe_greedy_matches_hf(norm_topk_prob, kernels):
    """Left-padded batches over consecutive calls; layer 1 is a dense MLP inside the MoE model."""
    reference, optimized = _moe_pair(norm_topk_prob, compile=False, kernels=kernels)
    assert type(reference.model.layers[1].mlp).__name__ == "Qwen3MoeMLP"
    for call in range(2):
        ids, mask = left_padded_batch([9 + 3 * call, 4, 7], 512, seed=call)
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        kwargs = dict(attention_mask=mask, max_new_tokens=8, **GREEDY)
        assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_router_logits_requests_use_hf_forward():
    reference, optimized = _moe_pair(True, compile=False)
    ids, _ = left_padded_batch([6], 512)
    ids = ids.to(DEVICE)
    with torch.no_grad():
        ours = optimized(ids, output_router_logits=True)
        theirs = reference(ids, output_router_logits=True)
    assert len(ours.router_logits) == len(theirs.router_logits) == 1
    torch.testing.assert_close(ours.router_logits[0], theirs.router_logits[0])


def test_moe_decode_is_one_graph_with_no_recompiles():
    torch._dynamo.reset()
    counters.clear()
    reference, optimized = _moe_pair(True, compile=True, max_batch_size=2, max_cache_len=64)
    assert generate_without_recompiles(reference, optimized, [([9, 5], 6), ([14, 3], 9)], DEVICE) == 1
