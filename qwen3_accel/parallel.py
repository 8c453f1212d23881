"""Tensor parallelism: our kernels on the shards transformers made (`from_pretrained(..., tp_plan="auto")`).

Transformers shards a Qwen3 over a 1-D device mesh with DTensor parameters: q/k/v, gate/up, the experts' packed
gate/up and the LM head by output rows; o_proj, down_proj and the experts' down projection by input columns; the
embedding (transformers >= 5.24) by vocabulary rows; norms and the router replicated. Each rank then runs our
forward on its local shards: its own query and KV heads (its own slice of the KV cache), its slice of every MLP
and expert, and the collectives below, written with torch's functional collectives so that the compiled decode
step stays one graph per rank.

`describe(model)` recognises that layout (or none: a single-device model) and refuses anything else, naming what
is supported. The same checks run on every rank, so every rank raises the same error.
"""

import hashlib
import re
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard


# Concatenation over ranks along dim 0 (the only dim either release supports); renamed in torch 2.14.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class SingleDevice:
    """The model is whole on this process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def check_same_request(self, *values: Any) -> None:
        """One process, one request: nothing to compare."""

    def share_random_state(self, device: torch.device) -> None:
        """One process, one random stream: nothing to share."""


class TensorParallel(SingleDevice):
    """One rank of a tensor-parallel group: sums partial outputs, gathers logits, shares sampled tokens.

    vocab_sharded / head_sharded: the embedding / LM head is split by vocabulary rows (the embedding is from
    transformers 5.24 on; before, it is replicated).
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, vocab_sharded: bool, head_sharded: bool):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.vocab_sharded, self.head_sharded = vocab_sharded, head_sharded

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' partial outputs (after o_proj, down_proj, the experts, a sharded embedding)."""
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", self.group))

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of the last dimension, in rank order (the LM head's vocabulary slices)."""
        if not self.head_sharded:
            return x
        gathered = funcol.wait_tensor(_all_gather_dim0(x.movedim(-1, 0).contiguous(), 0, self.group))
        return gathered.movedim(0, -1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank: sampled tokens, so that all ranks decode the same sequence."""
        return funcol.wait_tensor(funcol.broadcast(x, 0, self.group))

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup on this rank's vocabulary rows (zeros elsewhere), summed over ranks."""
        if not self.vocab_sharded:
            return F.embedding(ids, weight)
        rows = weight.shape[0]
        local = ids - self.rank * rows
        inside = (local >= 0) & (local < rows)
        out = F.embedding(local.clamp(0, rows - 1), weight) * inside.unsqueeze(-1).to(weight.dtype)
        return self.all_reduce(out)

    def check_same_request(self, *values: Any) -> None:
        """Raise on every rank when the ranks were given different requests (they would hang or diverge).

        `values`: what must agree (tensors are compared by shape and content); one host all-gather of a hash.
        """
        digest = hashlib.sha256(repr(_fingerprint(values)).encode()).hexdigest()
        digests: list[str | None] = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self.group)
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ValueError(
                f"tensor-parallel ranks were given different requests (ranks {differ} differ from rank 0): every "
                "rank must call generate()/forward() with the same inputs and settings"
            )

    def share_random_state(self, device: torch.device) -> None:
        """Set every rank's random generators (CPU, and `device`'s) to rank 0's: HF's loop then samples the same
        tokens on every rank, rank 0's draws, as a single process seeded like rank 0 would."""
        states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]
        dist.broadcast_object_list(states, group=self.group, group_src=0)
        torch.set_rng_state(states[0])
        if device.type == "cuda":
            torch.cuda.set_rng_state(states[1], device)


def _fingerprint(values: tuple) -> tuple:
    """The values, with tensors as shape and content hash."""
    return tuple(
        (tuple(v.shape), hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest())
        if isinstance(v, torch.Tensor) else v
        for v in values
    )


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the tensor itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


# Placements transformers' Qwen3 / Qwen3-MoE tp_plan produces, by parameter name (layer numbers as `*`).
_SHARDED_ROWS = re.compile(r"(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")
_SHARDED_COLUMNS = re.compile(r"(self_attn\.o_proj|mlp\.down_proj)\.weight$")


def _expected(name: str) -> str:
    if _SHARDED_ROWS.search(name):
        return "rows"
    if _SHARDED_COLUMNS.search(name):
        return "columns"
    if name.endswith("mlp.experts.gate_up_proj"):
        return "packed rows"
    if name.endswith("mlp.experts.down_proj"):
        return "expert columns"
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "rows or replicated"
    return "replicated"


def _placement_matches(expected: str, placement) -> bool:
    if expected == "rows":
        return placement == Shard(0)
    if expected == "columns":
        return placement == Shard(1)
    if expected == "packed rows":  # gate and up each split by rows, then packed: a strided shard of dim 1
        return getattr(placement, "dim", None) == 1 and getattr(placement, "split_factor", 1) == 2
    if expected == "expert columns":
        return placement == Shard(2)
    if expected == "rows or replicated":
        return placement in (Shard(0), Replicate())
    return placement == Replicate()


def describe(model: torch.nn.Module) -> SingleDevice:
    """`SingleDevice()` for a whole model; a `TensorParallel` for transformers' tensor-parallel shards of one.

    Raises ValueError (the same on every rank) for any other sharding: several mesh dimensions (FSDP, expert or
    pipeline parallel), a placement transformers' Qwen3 plan does not make, a world size that does not divide
    the attention heads, KV heads or the sharded dimensions evenly.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    sharded = {name: p for name, p in params.items() if isinstance(p, DTensor)}
    if not sharded:
        return SingleDevice()
    meshes = {p.device_mesh for p in sharded.values()}
    mesh = next(iter(meshes))
    if len(meshes) != 1 or mesh.ndim != 1:
        raise ValueError(
            "qwen3_accel supports tensor parallelism over one mesh dimension (from_pretrained(..., tp_plan='auto')); "
            f"this model's parameters live on {len(meshes)} mesh(es) of {mesh.ndim} dimension(s) (FSDP, expert or "
            "pipeline parallelism are not supported)"
        )
    world = mesh.size()
    wrong = []
    for name, p in params.items():
        placement = p.placements[0] if isinstance(p, DTensor) else Replicate()
        expected = _expected(name)
        if not _placement_matches(expected, placement):
            wrong.append(f"{name}: {placement} (expected {expected})")
    if wrong:
        raise ValueError(
            "qwen3_accel recognises the tensor-parallel layout of transformers' Qwen3 tp_plan ('auto') only; "
            f"unexpected placements: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}"
        )
    config = model.config
    for what, count in (("num_attention_heads", config.num_attention_heads),
                        ("num_key_value_heads", config.num_key_value_heads)):
        if count % world:
            raise ValueError(
                f"tensor parallelism over {world} ranks needs {what} ({count}) divisible by the world size: "
                "transformers' plan would give a rank part of a head. Use a number of ranks that divides it "
                "(see docs/SCALING.md)"
            )
    uneven = [name for name, p in sharded.items() if p.shape[_shard_dim(p)] % (world * _split(p))]
    if uneven:
        raise ValueError(
            f"tensor parallelism over {world} ranks splits {uneven[:3]} unevenly; qwen3_accel needs every sharded "
            "dimension divisible by the world size"
        )
    def rows_sharded(name: str) -> bool:
        return isinstance(params[name], DTensor) and params[name].placements[0] == Shard(0)

    return TensorParallel(mesh.get_group(), mesh.get_local_rank(), world, rows_sharded("model.embed_tokens.weight"),
                          rows_sharded("lm_head.weight"))


def load_tensor_parallel(name_or_path: str, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` sharded by transformers' own plan over every rank of this
    `torchrun` job (`DistributedConfig(tp_plan="auto")`); it starts torch.distributed when it is not running yet."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    return AutoModelForCausalLM.from_pretrained(
        name_or_path, distributed_config=DistributedConfig(tp_plan="auto"), **kwargs
    )


def _shard_dim(p: DTensor) -> int:
    return getattr(p.placements[0], "dim", 0)


def _split(p: DTensor) -> int:
    return getattr(p.placements[0], "split_factor", 1)


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (a local shard) as a DTensor with `like`'s mesh, placement and global shape; plain if `like` is."""
    if not isinstance(like, DTensor):
        return tensor
    return DTensor.from_local(
        tensor, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


__all__ = ["SingleDevice", "TensorParallel", "describe", "load_tensor_parallel", "local", "shard_like"]
