"""Benchmark: what each in-model preprocessing layer costs against the model it sits in (prints figures).

    .venv/bin/python benchmarks/bench_preprocess_layers.py [--shared ../shared/data] [--size 128] [--rounds 7]

Real images of the shared 224 px set, resized to ``--size``, in batches of 32. Each round times, in
turn, every layer alone (``model.trim_margins``, ``lung_crop``, ``equalize``, ``clahe``, ``standardize``) and the
default compact CNN's forward pass and training step, each a compiled ``tf.function`` warmed up
first. Printed: the median img/s over the rounds, and each layer's time as a share of one training
step (the median of the per-round ratios, which cancels the machine's slow drifts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.modeling.clahe import ContrastLimitedEqualization
from pipeline.modeling.lung_crop import LungFieldCrop
from pipeline.modeling.models import EqualizeHistogram, StandardizeIntensity, TrimDarkMargins, build_model

BATCH = 32


def _images(shared: Path, size: int) -> tf.Tensor:
    files = sorted((shared / "chest_xray_224" / "train").glob("*/*.jpeg"))[::37][:BATCH]
    if len(files) < BATCH:
        raise SystemExit(f"error: {shared / 'chest_xray_224' / 'train'}: fewer than {BATCH} images")
    pixels = [np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR)) for f in files]
    return tf.constant(np.stack(pixels)[..., None].astype(np.float32))


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, ``repeats`` calls after one untimed."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    x = _images(args.shared, args.size)
    y = tf.ones((BATCH, 1))
    layers = {
        "trim_margins": TrimDarkMargins(),
        "lung_crop": LungFieldCrop(),
        "equalize": EqualizeHistogram(),
        "clahe (2.0, 8 x 8)": ContrastLimitedEqualization(2.0, 8),
        "standardize": StandardizeIntensity(),
    }
    model = build_model("compact_cnn", args.size, standardize=True).model
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    calls: dict[str, Callable[[tf.Tensor], object]] = {name: tf.function(layer) for name, layer in layers.items()}
    calls["compact_cnn forward"] = tf.function(lambda t: model(t, training=False))
    calls["compact_cnn train step"] = lambda _t: model.train_on_batch(x, y)

    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            seconds[name].append(_timed(lambda fn=fn: fn(x), args.repeats))

    step = seconds["compact_cnn train step"]
    print(f"{args.size} px, batch {BATCH}, {args.rounds} rounds of {args.repeats} calls; median over rounds")
    print(f"{'':24s} {'img/s':>10s} {'share of a train step':>22s}")
    for name, times in seconds.items():
        share = statistics.median(t / s for t, s in zip(times, step, strict=True))
        print(f"{name:24s} {BATCH / statistics.median(times):10.0f} {share:21.1%}")


if __name__ == "__main__":
    main()
