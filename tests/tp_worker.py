"""One rank of the tensor-parallel checks in test_tensor_parallel.py; run under `torchrun --nproc-per-node 2`.

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py CASE CHECKPOINT_DIR

CASE `tokens`: transformers shards the checkpoint (tp_plan="auto", gloo on the CPU); the optimized shards must give
the tokens of the same checkpoint unsharded in one process (fp32), through the fast loop and HF's loop, compiled
and eager, with every rank agreeing on sampled tokens; beam search and HF's own forward on the shards too.
CASE `mismatch`: ranks that send different prompts get a clear error on every rank. CASE `refused` (two
comma-separated checkpoints): KV heads that do not divide over the ranks, and a plan other than transformers' Qwen3
one, are refused on every rank with nothing patched.
Each rank prints `rank R ok` at the end.
"""

import sys

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, DistributedConfig

import qwen3_accel
from qwen3_accel.parallel import load_tensor_parallel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import left_padded_batch  # noqa: E402


def check_tokens(path: str, rank: int) -> None:
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = reference.config.vocab_size
    ids, mask = left_padded_batch([7, 4], vocab, seed=3)
    greedy = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    penalty = dict(greedy, repetition_penalty=1.3)  # not in the fast loop: HF's loop over our cache and step
    expected = {name: reference.generate(ids, **kwargs) for name, kwargs in (("greedy", greedy), ("hf", penalty))}
    for compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = qwen3_accel.optimize(load_tensor_parallel(path, dtype=torch.float32).eval(), compile=compile)
        acc = model.qwen3_accel
        shape = acc.runner.weights.shape
        assert acc.tp.world_size == 2 and shape.num_kv_heads == reference.config.num_key_value_heads // 2
        for name, kwargs in (("greedy", greedy), ("hf", penalty)):
            actual = model.generate(ids, **kwargs)
            assert torch.equal(actual, expected[name]), f"compile={compile} {name}: {actual} != {expected[name]}"
        with torch.no_grad():  # scoring (no cache): the logits themselves
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            want = reference(ids, attention_mask=mask, use_cache=False).logits
        real = mask.bool()  # padding positions attend to nothing real: HF's values there are arbitrary
        torch.testing.assert_close(logits[real], want[real], rtol=1e-5, atol=1e-5)
        if not compile:  # HF's loop on HF's cache (beam search) and HF's own forward (hidden states) on the shards
            beams = dict(greedy, num_beams=2)
            assert torch.equal(model.generate(ids, **beams), reference.generate(ids, **beams)), "beam search"
            with torch.no_grad():
                hf_path = model(ids, attention_mask=mask, output_hidden_states=True).logits
            torch.testing.assert_close(hf_path[real], want[real], rtol=1e-5, atol=1e-5)
        torch.manual_seed(1234 + rank)  # different seeds per rank: the ranks must still agree (rank 0's draws)
        sampling = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
        for loop, kwargs in (("fast", sampling), ("hf", dict(sampling, repetition_penalty=1.2))):
            sampled = model.generate(ids, **kwargs)
            gathered = [torch.empty_like(sampled) for _ in range(2)]
            dist.all_gather(gathered, sampled)
            assert torch.equal(gathered[0], gathered[1]), f"ranks sampled different tokens in the {loop} loop"
        if compile:
            runner = acc.runner
            assert not runner.fast_steps.eager_keys and not runner.decode_steps.eager_keys, "a step fell back to eager"
            assert len(runner.fast_steps) == 2 and len(runner.decode_steps) == 1
            assert not counters["graph_break"], dict(counters["graph_break"])


def check_mismatch(path: str, rank: int) -> None:
    model = qwen3_accel.optimize(load_tensor_parallel(path, dtype=torch.float32).eval(), compile=False)
    ids = torch.tensor([[5, 6, 7 + rank]])
    for call in (lambda: model.generate(ids, max_new_tokens=3, do_sample=False), lambda: model(ids)):
        try:
            call()
        except ValueError as error:
            assert "ranks were given different requests" in str(error), error
        else:
            raise AssertionError("different prompts on the ranks were not refused")


def check_refused(paths: str, rank: int) -> None:
    one_kv_head, plain = paths.split(",")
    mlp_transposed = {"model.layers.*.mlp.gate_proj": "rowwise", "model.layers.*.mlp.up_proj": "rowwise",
                      "model.layers.*.mlp.down_proj": "colwise"}
    cases = [
        (load_tensor_parallel(one_kv_head, dtype=torch.float32), "num_key_value_heads"),
        (AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32,
                                              distributed_config=DistributedConfig(tp_plan=mlp_transposed)),
         "unexpected placements"),
    ]
    for model, message in cases:
        try:
            qwen3_accel.optimize(model)
        except ValueError as error:
            assert message in str(error), error
        else:
            raise AssertionError(f"not refused: expected an error about {message}")
        assert not hasattr(model, "qwen3_accel") and "forward" not in vars(model)  # nothing half-patched


def main() -> None:
    case, path = sys.argv[1:3]
    check = {"tokens": check_tokens, "mismatch": check_mismatch, "refused": check_refused}[case]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    check(path, rank)
    dist.barrier()
    print(f"rank {rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
