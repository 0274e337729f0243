"""GPUs for the processes a flow starts (sweep trials, distributed workers): each grows its GPU memory on
demand instead of mapping it all, and, where CUDA_VISIBLE_DEVICES lists several devices, slot i sees only
device i mod n. Without several listed devices (a CPU worker, one GPU, or GPUs not listed) only the growth
setting is added, which TensorFlow ignores on CPU."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator, Mapping

GROWTH = "TF_FORCE_GPU_ALLOW_GROWTH"
DEVICES = "CUDA_VISIBLE_DEVICES"

_busy: set[int] = set()
_lock = threading.Lock()


def gpu_env(slot: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables slot `slot` adds to `environ` (default: this process's): memory growth (unless set
    already) and, when several devices are listed, its own one."""
    environ = os.environ if environ is None else environ
    env = {GROWTH: environ.get(GROWTH, "true")}
    devices = [d.strip() for d in environ.get(DEVICES, "").split(",") if d.strip()]
    if len(devices) > 1:
        env[DEVICES] = devices[slot % len(devices)]
    return env


@contextlib.contextmanager
def gpu_slot() -> Iterator[int]:
    """The lowest slot no other running trial of this process holds, for as long as the trial runs."""
    with _lock:
        slot = next(i for i in itertools.count() if i not in _busy)
        _busy.add(slot)
    try:
        yield slot
    finally:
        with _lock:
            _busy.discard(slot)
