"""Benchmark: the training step on this machine's accelerator (or CPU), by precision and XLA (prints figures).

    .venv/bin/python benchmarks/bench_accelerator.py [--shared ../shared/data] [--images 1024] [--size 128]
        [--batch 32] [--steps 24] [--configs float32:off,float32:on,mixed_float16:off,mixed_float16:on]

For each configuration (Keras dtype policy : XLA jit_compile) it trains the configured model
(``params.yaml``'s architecture, standardize/equalize layers) for ``--steps`` steps, three ways:

- end to end: the project's training input pipeline (decode, resize, shuffle, augment, class weights) on
  real images, as ``pneumo train`` feeds the model;
- compute only: the same number of steps on one batch already in memory (no decode, no augmentation);
- input only: the input pipeline alone, the model idle.

It prints images/s for each, and the fraction of the end-to-end time the accelerator waits for input,
``1 - compute / end_to_end`` (0 = the input pipeline keeps up). Compare rows as ratios within one run.
On a CPU-only machine mixed_float16 runs in emulation: its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import pipeline` sets it (pipeline/core/tf_defaults.py)

import keras
import tensorflow as tf
from bench_training import sample  # this script's folder is on sys.path: the same image sample

from pipeline.core.config import load_params
from pipeline.modeling import inputs as dp
from pipeline.modeling.models import build_from_params
from pipeline.modeling.training import _compile

REPO = Path(__file__).resolve().parents[1]


def device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({os.cpu_count()} cores), no GPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} x {details.get('device_name', 'GPU')}"


def timed_fit(model: keras.Model, ds: tf.data.Dataset, steps: int) -> float:
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=None, help="input size (default: params.yaml model.image_size)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--configs", default="float32:off,float32:on,mixed_float16:off,mixed_float16:on")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    mp, tp = params.model, params.train
    size = args.size or mp.image_size
    tmp = Path(tempfile.mkdtemp(prefix="bench_accel_"))
    data = sample(args.shared, args.images, tmp / "images")
    weights = dp.class_weights(data.labels, 2)

    def pipeline() -> tf.data.Dataset:
        return dp.make_dataset(
            data, size, args.batch, training=True, augment=tp.augment, seed=tp.seed, weights=weights
        ).repeat()

    print(
        f"{device_name()}, TF {tf.__version__}, Keras {keras.__version__}: {mp.architecture} at {size}px, "
        f"batch {args.batch}, {args.steps} steps per figure, {len(data)} real images"
    )
    ds = pipeline()
    for _ in ds.take(dp.steps_per_epoch(len(data), args.batch) + 1):  # one full pass fills the decode cache
        pass
    batch = next(iter(ds))
    start = time.perf_counter()
    for _ in ds.take(args.steps):
        pass
    input_rate = args.steps * args.batch / (time.perf_counter() - start)
    print(f"input pipeline alone (cached decode, augmentation each step): {input_rate:8.1f} img/s")
    print(f"{'policy':14s} {'XLA':4s} {'end to end':>12s} {'compute only':>13s} {'waits for input':>16s}")
    for config in args.configs.split(","):
        policy, xla = config.split(":")
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(tp.seed)
        built = build_from_params(mp, image_size=size, weights="none")
        _compile(built.model, tp.learning_rate, 2, tp)
        built.model.compile(
            optimizer=built.model.optimizer, loss=built.model.loss, jit_compile=xla == "on"
        )  # the project's optimizer and loss, with XLA set explicitly
        in_memory = tf.data.Dataset.from_tensors(batch).repeat()
        timed_fit(built.model, in_memory, 3)  # warm-up: tracing and (XLA) compilation for both inputs
        timed_fit(built.model, ds, 3)
        compute = timed_fit(built.model, in_memory, args.steps)
        end_to_end = timed_fit(built.model, ds, args.steps)
        n = args.steps * args.batch
        wait = max(0.0, 1.0 - compute / end_to_end)
        print(f"{policy:14s} {xla:4s} {n / end_to_end:8.1f} img/s {n / compute:9.1f} img/s {wait:15.0%}")
    keras.mixed_precision.set_global_policy("float32")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
