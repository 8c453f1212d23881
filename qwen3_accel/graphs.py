"""A bounded, known set of compiled decode steps per optimized model.

Dynamo keeps compiled graphs, and counts recompiles against `recompile_limit` (8), per *code object*, shared by
every caller in the process: one `torch.compile(fn)` reused by several models or many request settings would hit
the limit and, with `fullgraph=True`, raise. So each graph key of each model gets its own copy of the step
function's code: it is compiled once, on its first call, and never shares a cache entry. The keys are chosen so
that everything that varies per request is a device tensor (see fast_generate.py), which bounds the set.
"""

import collections
import contextlib
import logging
import os
import types
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from .custom_ops.fallback import STRICT_ENV

logger = logging.getLogger(__name__)

# STRICT_ENV=1 (the test suite sets it) makes any compile or replay failure raise instead of running the key
# eagerly: a test of the compiled path must not pass on the eager fallback. Kernels Triton cannot build follow it too.


def strict() -> bool:
    return os.environ.get(STRICT_ENV) == "1"


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Outside inference mode and without gradients (leaving inference mode turns them back on), whatever mode the
    caller is in: where persistent tensors are made (an inference tensor cannot be updated in place outside
    inference mode, so every later call made without it would fail) and where compiled steps run (inference mode
    is part of Dynamo's guards: calls from inside and outside it would compile each key twice)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _own_code(fn: Callable) -> Callable:
    """`fn` (a function or bound method) with a fresh code object, so Dynamo caches it apart.

    (Not a functools.partial: torch.compile wraps those in one shared wrapper function, whose code object all
    partials would share again.)
    """
    if isinstance(fn, types.MethodType):
        return types.MethodType(_own_code(fn.__func__), fn.__self__)
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledSteps:
    """`fn` compiled with mode="reduce-overhead" (CUDA graphs), one compilation per key; eager when disabled.

    A key whose compilation or replay fails runs eagerly from then on, with a warning naming the key and the
    cause: a request never fails because a graph could not be built (under `QWEN3_ACCEL_STRICT_COMPILE=1` it
    raises instead).
    """

    def __init__(self, fn: Callable, enabled: bool):
        self.fn = fn
        self.enabled = enabled
        self.compiled: dict[Hashable, Callable] = {}
        self.eager_keys: set[Hashable] = set()
        self.calls: collections.Counter = collections.Counter()  # compiled calls per key (tests see replays)

    def __call__(self, key: Hashable, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or key in self.eager_keys:
            return self.fn(*args, **kwargs)
        step = self.compiled.get(key)
        if step is None:
            step = torch.compile(_own_code(self.fn), mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.compiled[key] = step
        torch.compiler.cudagraph_mark_step_begin()
        self.calls[key] += 1
        try:
            with outside_inference_mode():  # one set of guards whatever the caller's mode; ordinary output tensors
                return step(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compile or replay failure: run this key eagerly instead
            if strict():
                raise
            logger.warning("qwen3_accel: the compiled step for graph key %s failed (%s: %s); that key runs eagerly "
                           "from now on (same results, without the CUDA graph's speed)", key, type(error).__name__,
                           error)
            del self.compiled[key]
            self.eager_keys.add(key)
            return self.fn(*args, **kwargs)

    def clear(self) -> None:
        """Drop every graph (their inputs, e.g. the cache tensors, were re-allocated)."""
        self.compiled.clear()
        self.eager_keys.clear()
        self.calls.clear()

    def __len__(self) -> int:
        return len(self.compiled)
