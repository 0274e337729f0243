"""Benchmark: input pipeline, training throughput per model, cached-feature head epochs (prints figures).

    .venv/bin/python benchmarks/bench_training.py [--shared ../shared/data] [--size 128] [--images 1024]
        [--rounds 7] [--models '']

1. Input pipeline images/s: pneumo's training pipeline from files (the first epoch decodes, later
   epochs read the cache) against keras.utils.image_dataset_from_directory on the same files, and
   the shard reader (train.input: shards: TFRecords streamed, decoded every epoch: a split over
   train.memory_cache_mb). TF's one-time
   start-up is spent on a warm-up pass over 64 images first; then each round builds every pipeline
   afresh (outside the clock) and times its iterator from creation, the pipelines taking turns;
   printed: the median of `--rounds` rounds with the range, and the median of the per-round ratios
   to Keras (pairing rounds cancels the machine's slow drifts).
2. Training images/s per architecture (weights: none, batch 32, median of epochs 2-3 of one fit). TensorFlow's
   own CPU kernels instead of oneDNN's: prefix the command with ``TF_ENABLE_ONEDNN_OPTS=0``.
3. A frozen-backbone head epoch on cached features against a full forward pass per epoch.
4. Training on full-resolution X-rays (`--fullres-copies` copies of the 48 originals, in shards): the
   compact CNN's images/s with the decoded images kept in memory against decoding every epoch, the two
   taking turns for `--split-rounds` rounds.
Compare figures as ratios within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import pipeline` sets it (pipeline/core/tf_defaults.py)

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from pipeline.core.config import ARCHITECTURES, ShardsParams
from pipeline.modeling import inputs as dp
from pipeline.modeling import records
from pipeline.modeling.models import BACKBONES, build_model, set_backbone_trainable

REPO = Path(__file__).resolve().parents[1]


def sample(shared: Path, n: int, out: Path) -> dp.SplitData:
    """n training images (half per class) copied into a Kaggle-style folder for both loaders."""
    paths, labels = [], []
    for label_id, label in enumerate(("NORMAL", "PNEUMONIA")):
        (out / label).mkdir(parents=True)
        for f in sorted((shared / "chest_xray_224" / "train" / label).iterdir())[: n // 2]:
            shutil.copy2(f, out / label / f.name)
            paths.append(str(out / label / f.name))
            labels.append(label_id)
    sides = [max(Image.open(p).size) for p in paths]  # as the index records them
    return dp.SplitData("train", paths, np.array(labels), ("NORMAL", "PNEUMONIA"), long_sides=sides)


def sharded(data: dp.SplitData, root: Path, out: Path) -> dp.SplitData:
    """`data` packed into shards (as the shard stage does) and read back from them."""
    rows = []
    for path, label in zip(data.paths, data.labels, strict=True):
        raw = Path(path).read_bytes()
        rel = Path(path).relative_to(root).as_posix()
        rows.append(
            {
                "path": rel,
                "split": "train",
                "label": data.class_names[label],
                "subtype": "none",
                "width": 224,
                "height": 224,
                "patient_id": rel,
                "sha256": hashlib.sha256(raw).hexdigest(),
                "decodable": True,
            }
        )
    manifest = records.write_shards(pd.DataFrame(rows), root, ShardsParams(out=str(out)))
    keys = [r["path"] for r in rows]
    return dp.SplitData(**{**data.__dict__, "keys": keys, "shards": tuple(records.shard_files(out, manifest, "train"))})


def epoch_rates(ds: tf.data.Dataset, n: int, steps: int | None, epochs: int = 1) -> tuple[list[float], float]:
    """img/s of `epochs` consecutive epochs of `steps` batches read from one iterator, as fit reads them
    (the first includes creating the iterator), and the start-up: seconds from creating the iterator to
    its first batch. `steps` None: one pass to the end of a finite dataset."""
    start = time.perf_counter()
    it, rates = iter(ds), []
    first = next(it)
    startup = time.perf_counter() - start
    for epoch in range(epochs):
        left = (steps or 0) - (epoch == 0)  # the first epoch's first batch is read
        batches = it if steps is None else (next(it) for _ in range(left))
        for _ in batches:
            pass
        now = time.perf_counter()
        rates.append(n / (now - start))
        start = now
    del it, batches, first  # an endless pipeline reads ahead until its iterator is gone: stop it before the next
    gc.collect()
    time.sleep(0.2)
    return rates, startup


def whole_split(shared: Path) -> dp.SplitData:
    """Every training image of the 224 px copy, read where it lies."""
    folder = shared / "chest_xray_224" / "train"
    paths = sorted(str(p) for p in folder.glob("*/*"))
    labels = np.array([int(Path(p).parent.name == "PNEUMONIA") for p in paths])
    sides = [max(Image.open(p).size) for p in paths]  # as the index records them
    return dp.SplitData("train", paths, labels, ("NORMAL", "PNEUMONIA"), long_sides=sides)


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch of a fit (Keras waits for the epoch's last step before its end)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def epoch_seconds(model: keras.Model, batches: tf.data.Dataset, steps: int, epochs: int = 3) -> list[float]:
    """Seconds per epoch after the first (which traces the step function and fills the input cache)."""
    timer = EpochTimer()
    model.fit(batches, epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[timer])
    return timer.seconds[1:]


def spread(rates: list[float], base: list[float] | None = None) -> str:
    """Median img/s (range) and, against `base` (the same rounds), the median of the per-round ratios."""
    text = f"{statistics.median(rates):7.0f} img/s ({min(rates):.0f}-{max(rates):.0f})"
    if base:
        ratios = sorted(r / b for r, b in zip(rates, base, strict=True))
        text += f"  {statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"
    return text


def fullres_training(shared: Path, tmp: Path, size: int, copies: int, rounds: int) -> None:
    """Compact CNN images/s on `copies` x the full-resolution originals in shards: cached against streamed."""
    folder, paths, labels = tmp / "fullres", [], []
    for label_id, label in enumerate(("NORMAL", "PNEUMONIA")):
        (folder / label).mkdir(parents=True)
        for f in sorted((shared / "chest_xray_fullres_sample" / label).glob("*.jpeg")):
            for k in range(copies):
                copy = folder / label / f"copy{k}-{f.name}"
                shutil.copy2(f, copy)
                paths.append(str(copy))
                labels.append(label_id)
    sides = [max(Image.open(p).size) for p in paths]
    data = dp.SplitData("train", paths, np.array(labels), ("NORMAL", "PNEUMONIA"), long_sides=sides)
    streamed, n = sharded(data, folder, tmp / "fullres-shards"), len(data)
    steps = dp.steps_per_epoch(n, 32)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for cache in (False, True):
            model = build_model("compact_cnn", size, standardize=True).model
            model.compile(optimizer="adam", loss="binary_crossentropy")
            batches = dp.make_dataset(streamed, size, 32, training=True, seed=0, deterministic=False, cache=cache)
            rates[cache] += [n / s for s in epoch_seconds(model, batches, steps, epochs=4)]
    print(
        f"training the compact CNN on {n} full-resolution records (the 48 originals x {copies}, in shards) at "
        f"{size} px, epochs 2-4 of {rounds} fits each, img/s:"
    )
    print(f"  decoded every epoch (streamed)            {spread(rates[False])}")
    print(f"  decoded once, kept in memory              {spread(rates[True], rates[False])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--split-rounds", type=int, default=3, help="rounds over the whole 224 px train split")
    parser.add_argument("--models", default=",".join(ARCHITECTURES), help="architectures to train ('' for none)")
    parser.add_argument("--fullres-copies", type=int, default=10, help="copies of the 48 originals (0: skip 4.)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    data = sample(args.shared, args.images, tmp / "images")
    n, size = len(data), args.size
    print(
        f"{n} real 224px images resized to {size}px, batch 32, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}"
    )

    streamed = sharded(data, tmp / "images", tmp / "shards")
    steps = dp.steps_per_epoch(n, 32)
    warm = dp.SplitData("train", data.paths[:32] + data.paths[-32:], np.array([0] * 32 + [1] * 32), data.class_names)
    epoch_rates(dp.make_dataset(warm, size, 32, training=True, seed=1), 64, 2)  # thread pools, tracing

    def keras_folder(folder: Path = tmp / "images") -> tf.data.Dataset:
        return keras.utils.image_dataset_from_directory(
            folder, image_size=(size, size), batch_size=32, color_mode="grayscale", seed=0, verbose=False
        ).prefetch(tf.data.AUTOTUNE)

    def pneumo(split: dp.SplitData, cache: bool = True) -> tf.data.Dataset:  # deterministic=False: one worker
        return dp.make_dataset(split, size, 32, training=True, seed=0, deterministic=False, cache=cache)

    baseline, first, cached, stream, startups = [], [], [], [], ([], [])
    for _ in range(args.rounds):
        pipelines = (keras_folder(), pneumo(data))
        rates, start = epoch_rates(pipelines[0], n, None)
        baseline += rates
        startups[0].append(start)
        (a, b), start = epoch_rates(pipelines[1], n, steps, 2)
        first.append(a)
        cached.append(b)
        startups[1].append(start)
        stream += epoch_rates(pneumo(streamed, cache=False), n, steps)[0]
    print(f"input pipeline, median of {args.rounds} rounds (range); ratio to Keras in the same round, median (range):")
    print(f"  keras.utils.image_dataset_from_directory  {spread(baseline)}")
    print(f"  pneumo first epoch (decode, fill cache)   {spread(first, baseline)}")
    print(f"  pneumo later epochs (cached, reshuffled)  {spread(cached, baseline)}")
    print(f"  shard reader, every epoch                 {spread(stream, baseline)}")
    k_ms, p_ms = (1000 * statistics.median(s) for s in startups)
    print(f"  start-up, iterator creation to first batch: Keras {k_ms:.0f} ms, pneumo {p_ms:.0f} ms")

    whole = whole_split(args.shared)
    if args.split_rounds and len(whole):
        base, ours = [], []
        for _ in range(args.split_rounds):
            base += epoch_rates(keras_folder(args.shared / "chest_xray_224" / "train"), len(whole), None)[0]
            ours += epoch_rates(pneumo(whole), len(whole), dp.steps_per_epoch(len(whole), 32))[0]
        print(f"first pass over the whole 224 px train split ({len(whole)} images), {args.split_rounds} rounds:")
        print(f"  keras.utils.image_dataset_from_directory  {spread(base)}")
        print(f"  pneumo first epoch (decode, fill cache)   {spread(ours, base)}")

    if args.fullres_copies:
        fullres_training(args.shared, tmp, size, args.fullres_copies, max(args.split_rounds, 1))
    if not args.models:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    batches = dp.make_dataset(data, size, 32, training=True, seed=0)
    for arch in args.models.split(","):
        if arch in BACKBONES and size < BACKBONES[arch].min_size:
            continue
        built = build_model(arch, size)
        built.model.compile(optimizer="adam", loss="binary_crossentropy")
        secs = epoch_seconds(built.model, batches, steps)
        print(
            f"training {arch:15s} {n / statistics.median(secs):7.1f} img/s (epochs 2-3 of one fit: "
            f"{', '.join(f'{s:.1f}' for s in secs)} s for {n} images, all layers trainable)"
        )

    arch = "mobilenetv2" if "mobilenetv2" in args.models else args.models.split(",")[-1]
    built = build_model(arch, size)
    set_backbone_trainable(built, 0)
    model = built.model
    model.compile(optimizer="adam", loss="binary_crossentropy")
    full = statistics.median(epoch_seconds(model, batches, steps))
    extractor = keras.Model(model.input, model.get_layer("gap").output)
    start = time.perf_counter()
    feats = extractor.predict(dp.make_dataset(data, size, 32, cache=False), verbose=0)
    extract = time.perf_counter() - start
    inputs = keras.Input(feats.shape[1:])
    head = keras.Model(inputs, model.get_layer("prediction")(model.get_layer("head_dropout")(inputs)))
    head.compile(optimizer="adam", loss="binary_crossentropy")
    head.fit(feats, data.labels.astype("float32"), batch_size=32, epochs=1, verbose=0)
    start = time.perf_counter()
    head.fit(feats, data.labels.astype("float32"), batch_size=32, epochs=5, verbose=0)
    head_epoch = (time.perf_counter() - start) / 5
    print(
        f"frozen {arch}: full forward epoch {full:.2f} s | feature extraction once {extract:.2f} s | "
        f"head epoch on cached features {head_epoch:.3f} s ({full / head_epoch:.0f}x faster per epoch; "
        f"10 head epochs: {10 * full:.1f} s -> {extract + 10 * head_epoch:.1f} s)"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
