"""Optimize Qwen3 models where other code loads them.

`patch_transformers(**options)` makes every later `from_pretrained` of `AutoModelForCausalLM`, `Qwen3ForCausalLM`
and `Qwen3MoeForCausalLM` return an optimized model when it loads a Qwen3 (other architectures are returned as
loaded); `unpatch_transformers()` restores transformers. `AutoModelForCausalLM` here is the import-swap drop-in:
`from qwen3_accel import AutoModelForCausalLM` does the same for one import, without touching transformers.
"""

from typing import Any

import transformers

from .optimize import SUPPORTED_CLASSES, OptimizeOptions, optimize

PATCHED_CLASSES = (transformers.AutoModelForCausalLM, transformers.Qwen3ForCausalLM, transformers.Qwen3MoeForCausalLM)


def _optimize_if_qwen3(model: Any, options: OptimizeOptions) -> Any:
    return optimize(model, options) if isinstance(model, SUPPORTED_CLASSES) else model


class _OptimizingLoader:
    """A `from_pretrained` that runs the class's own and optimizes the result (one per patched class)."""

    def __init__(self, original: Any, options: OptimizeOptions):
        self.original, self.options = original, options

    def __get__(self, instance: Any, owner: type):
        loader = self.original.__get__(instance, owner)  # the class's own from_pretrained, bound as usual

        def from_pretrained(*args: Any, **kwargs: Any):
            return _optimize_if_qwen3(loader(*args, **kwargs), self.options)

        from_pretrained.__doc__ = loader.__doc__
        return from_pretrained


def _original_from_pretrained(cls: type) -> Any:
    """The `from_pretrained` descriptor a class would use without our patch (inherited or its own)."""
    for klass in cls.__mro__:
        entry = klass.__dict__.get("from_pretrained")
        if entry is not None and not isinstance(entry, _OptimizingLoader):
            return entry
    raise AttributeError(f"{cls.__name__} has no from_pretrained")


def patch_transformers(**options: Any) -> None:
    """Make `from_pretrained` of transformers' causal-LM auto class and Qwen3 classes return optimized Qwen3 models.

    Keyword arguments are `OptimizeOptions` fields. Calling it again replaces the options.
    """
    opts = OptimizeOptions(**options)
    for cls in PATCHED_CLASSES:
        cls.from_pretrained = _OptimizingLoader(_original_from_pretrained(cls), opts)


def unpatch_transformers() -> None:
    """Undo `patch_transformers` (a no-op when nothing is patched)."""
    for cls in PATCHED_CLASSES:
        if isinstance(cls.__dict__.get("from_pretrained"), _OptimizingLoader):
            delattr(cls, "from_pretrained")


def is_patched() -> bool:
    return any(isinstance(cls.__dict__.get("from_pretrained"), _OptimizingLoader) for cls in PATCHED_CLASSES)


class AutoModelForCausalLM:
    """`transformers.AutoModelForCausalLM`, with Qwen3 models optimized as they are loaded or built.

    Options for `optimize` go in `qwen3_accel_options={...}`; every other argument is transformers'.
    """

    @classmethod
    def from_pretrained(cls, *args: Any, qwen3_accel_options: dict[str, Any] | None = None, **kwargs: Any):
        model = _original_from_pretrained(transformers.AutoModelForCausalLM).__get__(
            None, transformers.AutoModelForCausalLM
        )(*args, **kwargs)
        return _optimize_if_qwen3(model, OptimizeOptions(**(qwen3_accel_options or {})))

    @classmethod
    def from_config(cls, config: Any, qwen3_accel_options: dict[str, Any] | None = None, **kwargs: Any):
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        return _optimize_if_qwen3(model, OptimizeOptions(**(qwen3_accel_options or {})))
