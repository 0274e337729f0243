"""Benchmark: the project's Keras models trained on an accelerator through any Keras backend (prints figures).

    KERAS_BACKEND=jax python benchmarks/bench_gpu_keras.py [--archs compact_cnn,mobilenetv2,resnet50]
        [--size 224] [--batch 64] [--steps 20] [--policies float32,mixed_bfloat16,mixed_float16]

For machines with JAX or PyTorch and no TensorFlow, such as the GPU machines lent to this project. Each
model comes from ``pipeline.modeling.models.build_model`` with params.yaml's model settings (dropout,
the standardize layer; ``equalize`` needs TensorFlow and is left off). It is compiled as training
compiles it (Adam, binary cross-entropy; under mixed_float16 Keras scales the loss) and trained with
``train_on_batch`` on one synthetic batch that stays on the device. That is done for each dtype policy,
with XLA (``jit_compile=True``) and, for float32, without it. Printed: images/s and milliseconds per step
(median of the timed steps after warm-up; each step returns its loss to the host, so it is finished
when timed) and the first step (tracing and compiling).

Not measured here: the input pipeline. pneumo's tf.data pipeline needs TensorFlow, so how long the
accelerator would wait for input is not measured on such a machine. Compare the images/s printed here with
the input pipeline's rate that ``bench_training.py`` prints on the CPU that would feed it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.config import load_params  # noqa: E402
from pipeline.modeling.models import build_model  # noqa: E402


def device_name() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return f"jax {jax.__version__}, {jax.devices()[0].device_kind}"
    if backend == "torch":
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        return f"torch {torch.__version__}, {name}"
    return f"{backend}, {platform.processor() or platform.machine()}"


def step_times(arch: str, size: int, batch: int, steps: int, policy: str, jit: bool) -> tuple[float, list[float]]:
    """Seconds of the first step (tracing, compiling) and of each timed step after two warm-up steps."""
    keras.config.set_dtype_policy(policy)
    model_params = load_params(REPO / "params.yaml").model
    built = build_model(arch, size, 2, "none", model_params.dropout, model_params.standardize, False)
    model = built.model
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", jit_compile=jit)
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.uniform(0, 255, (batch, size, size, 1)).astype("float32"))
    y = keras.ops.convert_to_tensor(rng.integers(0, 2, (batch, 1)).astype("float32"))
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    for _ in range(2):
        model.train_on_batch(x, y)
    timed = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        timed.append(time.perf_counter() - start)
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    return first, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="compact_cnn,mobilenetv2,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--policies", default="float32,mixed_bfloat16,mixed_float16")
    args = parser.parse_args()
    print(f"Keras {keras.__version__} on {device_name()}; {args.size} px, batch {args.batch}, {args.steps} timed steps")
    print(f"{'model':12s} {'policy':15s} {'XLA':4s} {'img/s':>8s} {'ms/step':>8s} {'first step s':>13s}")
    for arch in args.archs.split(","):
        runs = [(p, True) for p in args.policies.split(",")] + [("float32", False)]
        for policy, jit in runs:
            first, timed = step_times(arch, args.size, args.batch, args.steps if jit else 5, policy, jit)
            median = statistics.median(timed)
            print(
                f"{arch:12s} {policy:15s} {'on' if jit else 'off':4s} {args.batch / median:8.0f} "
                f"{1000 * median:8.1f} {first:13.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
