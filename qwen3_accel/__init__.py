"""qwen3_accel: serving-engine decode speed for Hugging Face Qwen3 models, behind the Transformers API."""

from . import compat  # raises on an unsupported torch / transformers before anything else is imported
from . import custom_ops  # registers torch.ops.qwen3_accel.*
from .auto import AutoModelForCausalLM, patch_transformers, unpatch_transformers
from .cache import Qwen3StaticCache
from .optimize import OptimizeOptions, optimize

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLM", "OptimizeOptions", "Qwen3StaticCache", "optimize", "patch_transformers",
    "unpatch_transformers", "custom_ops", "__version__",
]
