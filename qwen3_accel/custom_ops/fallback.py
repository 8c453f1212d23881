"""One policy for a Triton kernel that cannot be built on this GPU (e.g. no e4m3 conversion on an older one, or a
configuration over its shared memory): the op runs its fallback instead of failing the request, with one warning
per (kernel, configuration) naming the cause, and never tries that kernel again in this process. Under
`QWEN3_ACCEL_STRICT_COMPILE=1` (the test suite sets it) the build error is raised instead.
"""

import logging
import os
from collections.abc import Callable
from typing import TypeVar

from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

logger = logging.getLogger(__name__)

STRICT_ENV = "QWEN3_ACCEL_STRICT_COMPILE"  # the name qwen3_accel.graphs reads (custom_ops cannot import it)

# Why Triton could not build a kernel in a configuration, by (kernel, configuration), for this process.
unbuildable: dict[tuple[str, str], str] = {}

T = TypeVar("T")


def triton_or_fallback(kernel: str, config: str, triton_fn: Callable[..., T], fallback_fn: Callable[..., T], *args,
                       fallback: str) -> T:
    """`triton_fn(*args)`, or `fallback_fn(*args)` (described by `fallback` in the warning) once Triton could not
    build `kernel` for `config`."""
    key = (kernel, config)
    if key not in unbuildable:
        try:
            return triton_fn(*args)
        except (CompilationError, OutOfResources) as error:
            if os.environ.get(STRICT_ENV) == "1":
                raise
            unbuildable[key] = f"{type(error).__name__}: {error}"
            logger.warning("qwen3_accel: Triton cannot build %s for %s on this GPU (%s); %s from now on (slower, "
                           "never a failed request)", kernel, config, unbuildable[key], fallback)
    return fallback_fn(*args)
