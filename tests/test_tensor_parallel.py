"""Tensor parallelism on the CPU: two ranks (torchrun, gloo) on checkpoints that transformers shards with its own
tp_plan. Each case runs tests/tp_worker.py on both ranks; see there for what each checks."""

import os
import subprocess
import sys

import pytest
import torch

from qwen3_accel.configs import build_model, get_config

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def run_ranks(case: str, path: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, case,
         path],
        capture_output=True, text=True, env=env, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "rank 0 ok" in output and "rank 1 ok" in output, output[-6000:]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    paths = {}
    for name, config in (("tiny", get_config("tiny")), ("tiny-moe", get_config("tiny-moe")),
                         ("tiny-tied", get_config("tiny-tied")),
                         ("one-kv-head", get_config("tiny", num_key_value_heads=1))):
        paths[name] = str(root / name)
        build_model(config, dtype=torch.float32, seed=4).save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-tied"])
def test_sharded_model_gives_the_unsharded_tokens(checkpoints, name):
    run_ranks("tokens", checkpoints[name])


def test_ranks_with_different_requests_all_raise(checkpoints):
    run_ranks("mismatch", checkpoints["tiny"])


def test_kv_heads_split_across_ranks_and_foreign_plans_are_refused(checkpoints):
    run_ranks("refused", f"{checkpoints['one-kv-head']},{checkpoints['tiny']}")


def test_cli_generate_under_torchrun_prints_once_and_matches_one_process():
    command = ["-m", "qwen3_accel.cli", "generate", "--model", "tiny-moe", "--device", "cpu", "--dtype", "float32",
               "--no-compile", "--max-new-tokens", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *command], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-4000:]
    tokens = one.stdout.strip().splitlines()[-1]
    assert tokens.startswith("[") and len(tokens.split(",")) == 6
    assert [line for line in two.stdout.splitlines() if line.startswith("[")] == [tokens]  # rank 0 only
