"""Loading the model a command runs: a named shape of `qwen3_accel.configs` (random weights) or a checkpoint, on one
process or sharded over the ranks of a `torchrun` job (transformers' tensor-parallel plan)."""

import os

import torch


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints and writes."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype):
    """A named shape from `qwen3_accel.configs` (random weights) or a checkpoint path / hub id.

    Under `torchrun` (WORLD_SIZE > 1) the model is sharded over the ranks by transformers' tensor-parallel plan;
    a named shape is first written once, by rank 0, to a temporary folder of this machine (one node only).
    """
    from .configs import MODEL_NAMES, build_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _load_sharded(name_or_path, device, dtype)
    if name_or_path in MODEL_NAMES:
        return build_model(name_or_path, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, device_map=str(device)).eval()


def _load_sharded(name_or_path: str, device: torch.device, dtype: torch.dtype):
    """`load_model` under torchrun: joins (or starts) the process group, then loads this rank's shards."""
    import hashlib
    import tempfile

    from .configs import MODEL_NAMES, build_model, get_config
    from .parallel import load_tensor_parallel

    dist = torch.distributed
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if name_or_path in MODEL_NAMES:
        shape = hashlib.sha256(get_config(name_or_path).to_json_string().encode()).hexdigest()[:12]
        folder = os.path.join(tempfile.gettempdir(), f"qwen3_accel-{name_or_path}-{str(dtype).split('.')[-1]}-{shape}")
        if dist.get_rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
            build_model(name_or_path, dtype=dtype).save_pretrained(folder)
        dist.barrier()
        name_or_path = folder
    return load_tensor_parallel(name_or_path, dtype=dtype).eval()
