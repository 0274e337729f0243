"""GPUs for the processes a flow starts (sweep trials, distributed workers): each grows its GPU memory on
demand instead of mapping it all, and, where CUDA_VISIBLE_DEVICES lists several devices, slot i sees only
device i mod n. Without several listed devices (a CPU worker, one GPU, or GPUs not listed) only the growth
setting is added, which TensorFlow ignores on CPU.

A slot is a lock file in a folder of the machine ($PNEUMO_GPU_SLOTS_DIR), held while the trial runs: so trials
that run side by side get different slots whether they are threads of one sweep or flow runs that a
work-pool worker (`--limit 2` and up) or several workers started as processes of their own. The kernel
drops a lock when its holder dies, so a killed trial frees its slot."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import filelock

GROWTH = "TF_FORCE_GPU_ALLOW_GROWTH"
DEVICES = "CUDA_VISIBLE_DEVICES"
SLOTS_DIR = "PNEUMO_GPU_SLOTS_DIR"  # where the slots' lock files live; default: a folder of this user in TMPDIR


def gpu_env(slot: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables slot `slot` adds to `environ` (default: this process's): memory growth (unless set
    already) and, when several devices are listed, its own one."""
    environ = os.environ if environ is None else environ
    env = {GROWTH: environ.get(GROWTH, "true")}
    devices = [d.strip() for d in environ.get(DEVICES, "").split(",") if d.strip()]
    if len(devices) > 1:
        env[DEVICES] = devices[slot % len(devices)]
    return env


def slots_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(SLOTS_DIR) or Path(tempfile.gettempdir()) / f"pneumo-gpu-slots-{os.getuid()}")


@contextlib.contextmanager
def gpu_slot(folder: Path | None = None) -> Iterator[int]:
    """The lowest slot no other running trial on this machine holds (in any process), for as long as the
    trial runs."""
    folder = folder or slots_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        lock = filelock.FileLock(folder / f"slot-{slot}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)  # flock: a second holder fails, in this process or another
        except filelock.Timeout:
            continue
        try:
            yield slot
        finally:
            lock.release()
        return
