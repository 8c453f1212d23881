"""lm-eval model type `qwen3_accel`: lm-eval's `HFLM`, with the model it loads optimized.

Importing this module registers the type, so `--model qwen3_accel` works in lm-eval's own CLI
(`qwen3-accel lm-eval ...` imports it first) and in `lm_eval.simple_evaluate(model="qwen3_accel", ...)`.
`optimize` options go through `--model_args` beside HFLM's own: `pretrained=PATH,dtype=bfloat16,compile=False`.
"""

from dataclasses import fields
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..optimize import SUPPORTED_CLASSES, OptimizeOptions, optimize

OPTION_NAMES = tuple(f.name for f in fields(OptimizeOptions))


@register_model("qwen3_accel")
class Qwen3AccelLM(HFLM):
    """`HFLM` whose Qwen3 / Qwen3-MoE model runs through qwen3_accel (other architectures run as HFLM runs them)."""

    def __init__(self, *args: Any, **kwargs: Any):
        options = OptimizeOptions(**{name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs})
        super().__init__(*args, **kwargs)
        if isinstance(self._model, SUPPORTED_CLASSES):
            optimize(self._model, options)
