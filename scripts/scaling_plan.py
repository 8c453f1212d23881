"""The arithmetic behind docs/SCALING.md: memory, bytes read and all-reduce traffic per GPU per decode step of a
Qwen3 model under tensor parallelism, and the decode speed they imply. Shapes come from qwen3_accel.configs (a
meta-device model: nothing is allocated).

    python scripts/scaling_plan.py --model Qwen3-32B --ranks 2 --bandwidth 2950 --efficiency 0.74
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from qwen3_accel.configs import MODEL_NAMES, get_config


def plan(name: str, ranks: int, batch: int, context: int, bandwidth: float, efficiency: float,
         all_reduce_us: float, bytes_per_weight: int = 2) -> dict[str, float]:
    config = get_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    embed = config.vocab_size * config.hidden_size
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    replicated = sum(p.numel() for n, p in params.items() if "norm" in n or n.endswith("mlp.gate.weight"))
    total = sum(p.numel() for p in params.values())
    sharded = total - replicated  # every projection, the experts, the LM head and (transformers >= 5.24) the embedding
    n_experts = getattr(config, "num_experts", 0)
    touched = n_experts * (1 - (1 - config.num_experts_per_tok / n_experts) ** batch) if n_experts else 0
    read = sharded - embed - (experts * (1 - touched / n_experts) if n_experts else 0)  # embedding: rows only
    kv_heads_per_rank = config.num_key_value_heads / ranks
    kv_per_token = 2 * config.num_hidden_layers * config.head_dim * bytes_per_weight * max(kv_heads_per_rank, 1)
    weights_gb = (sharded / ranks + replicated) * bytes_per_weight / 1e9
    read_gb = (read / ranks + replicated) * bytes_per_weight / 1e9 + kv_per_token * batch * context / 1e9
    bound_ms = read_gb / bandwidth * 1e3
    reduces = 2 * config.num_hidden_layers  # after o_proj and after the MLP / MoE block, every layer
    reduce_bytes = batch * config.hidden_size * bytes_per_weight
    comm_ms = reduces * all_reduce_us / 1e3 if ranks > 1 else 0.0
    step_ms = bound_ms / efficiency + comm_ms
    return dict(weights_gb=weights_gb, kv_kb_per_token=kv_per_token / 1e3, read_gb=read_gb, bound_ms=bound_ms,
                bound_tok_s=batch / bound_ms * 1e3, all_reduces=reduces, all_reduce_kb=reduce_bytes / 1e3,
                comm_ms=comm_ms, expected_tok_s=batch / step_ms * 1e3, kv_heads_per_rank=kv_heads_per_rank,
                experts_touched=touched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen3-32B", choices=MODEL_NAMES, help="a shape from qwen3_accel.configs")
    parser.add_argument("--ranks", type=int, default=2, help="tensor-parallel ranks (GPUs)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes to plan for")
    parser.add_argument("--context", type=int, default=1024, help="tokens of context per sequence in the KV cache")
    parser.add_argument("--bandwidth", type=float, default=2950, help="measured copy bandwidth per GPU, GB/s")
    parser.add_argument("--efficiency", type=float, default=0.74,
                        help="share of the bandwidth roofline our decode step reaches on one GPU (measured)")
    parser.add_argument("--all-reduce-us", type=float, default=8.0,
                        help="latency of one small all-reduce inside a CUDA graph, microseconds")
    args = parser.parse_args()
    for batch in args.batch:
        result = plan(args.model, args.ranks, batch, args.context, args.bandwidth, args.efficiency, args.all_reduce_us)
        print(f"{args.model} over {args.ranks} GPU(s), batch {batch}, context {args.context}: "
              + ", ".join(f"{k} {v:.3g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
