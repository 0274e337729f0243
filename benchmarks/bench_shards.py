"""Benchmark: a JPEG folder against TFRecord shards, for one training epoch and for `dvc push` (prints a table).

    .venv/bin/python benchmarks/bench_shards.py [--images 50000] [--px 96] [--size 32] [--keep DIR]

1. Builds N small synthetic X-rays (the project's renderer draws 256 base images, each image is one of
   them with its own noise, so every file's bytes differ), their index rows, and their shards.
2. One epoch of the compact CNN at --size px, in a subprocess per form so the peak RSS is that form's:
   `files` (the JPEG folder decoded once into the in-memory cache, as training does when the split fits
   train.memory_cache_mb) against `shards` (streamed: bounded shuffle buffer, no cache, as a split over the
   limit is read). Images/s over the epoch, first pass included.
3. `dvc add` + `dvc push` of each form to a local remote, in a temporary git + DVC repository.
Compare figures within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import pipeline` sets it (pipeline/core/tf_defaults.py)

REPO = Path(__file__).resolve().parents[1]
LABELS = ("NORMAL", "PNEUMONIA")


def build_images(root: Path, n: int, px: int):
    """N synthetic JPEGs under root/train/{NORMAL,PNEUMONIA}/ and their index rows (a DataFrame)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from pipeline.data.synthetic import SyntheticImage, render

    bases = {
        label: [render(SyntheticImage("train", label, sub, f"b{i}.jpeg", i, 7), px) for i in range(128)]
        for label, sub in (("NORMAL", "none"), ("PNEUMONIA", "bacteria"))
    }
    rng = np.random.default_rng(0)
    rows = []
    for label in LABELS:
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = LABELS[i % 2]
        noise = rng.integers(-4, 5, (px, px), dtype=np.int16)
        arr = np.clip(bases[label][(i // 2) % 128].astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "L").save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        rel = f"train/{label}/img{i:06d}.jpeg"
        (root / rel).write_bytes(data)
        rows.append(
            {
                "path": rel,
                "official_split": "train",
                "split": "train",
                "label": label,
                "subtype": "none" if label == "NORMAL" else "bacteria",
                "patient_id": f"train/p{i // 3}",
                "width": px,
                "height": px,
                "mode": "L",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "decodable": True,
                "error": "",
            }
        )
    return pd.DataFrame(rows)


def worker(form: str, work: Path, size: int, batch: int) -> None:
    """One training epoch on `form` (files | shards); prints one JSON line with img/s and peak RSS."""
    import keras
    import pandas as pd
    import tensorflow as tf

    from pipeline.modeling import inputs as dp
    from pipeline.modeling import records
    from pipeline.modeling.models import build_model

    keras.utils.set_random_seed(0)
    index = pd.read_parquet(work / "index.parquet")
    data = dp.split_data(index, "train", work / "repo" / "data" / "raw", "binary")
    if form == "shards":
        out = work / "repo" / "data" / "shards"
        manifest = records.load_manifest(out)
        data = dp.SplitData(**{**data.__dict__, "shards": tuple(records.shard_files(out, manifest, "train"))})
    # The two ends of train.memory_cache_mb: files decoded once and cached, shards streamed (decoded every epoch)
    ds = dp.make_dataset(data, size, batch, training=True, seed=0, cache=form == "files")
    model = build_model("compact_cnn", size).model
    model.compile(optimizer="adam", loss="binary_crossentropy")
    zeros = tf.zeros((batch, size, size, 1))
    model.fit(tf.data.Dataset.from_tensors((zeros, tf.zeros((batch,)))).repeat(2), verbose=0)  # tracing
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # TF, the model, the index
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=dp.steps_per_epoch(len(data), batch), verbose=0)  # endless batches
    secs = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "form": form,
                "images": len(data),
                "seconds": secs,
                "img_s": len(data) / secs,
                "peak_mb": peak_mb,
                "epoch_growth_mb": peak_mb - before_mb,
            }
        )
    )


def sh(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--px", type=int, default=96, help="side of the generated JPEGs")
    parser.add_argument(
        "--size",
        type=int,
        default=32,
        help="model input size (small, so the input pipeline, not the CPU-bound model, is timed)",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images-per-shard", type=int, default=1024)
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder, removed)")
    parser.add_argument("--worker", choices=["files", "shards"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.size, args.batch)
        return

    from pipeline.core.config import ShardsParams
    from pipeline.modeling import records

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_shards_"))
    repo = work / "repo"
    raw, shards = repo / "data" / "raw", repo / "data" / "shards"
    start = time.perf_counter()
    index = build_images(raw, args.images, args.px)
    index.to_parquet(work / "index.parquet")
    made = time.perf_counter() - start
    start = time.perf_counter()
    records.write_shards(index, raw, ShardsParams(out=str(shards), images_per_shard=args.images_per_shard))
    packed = time.perf_counter() - start
    raw_mb = sum(f.stat().st_size for f in raw.rglob("*.jpeg")) / 2**20
    shard_files = sorted(shards.glob("*.tfrecord"))
    shard_mb = sum(f.stat().st_size for f in shard_files) / 2**20
    print(
        f"{args.images} synthetic {args.px}px JPEGs ({raw_mb:.0f} MB) made in {made:.0f} s; "
        f"{len(shard_files)} shards ({shard_mb:.0f} MB) written in {packed:.0f} s; "
        f"{os.cpu_count()} CPU cores",
        flush=True,
    )

    epochs = {}
    for form in ("files", "shards"):
        cmd = [sys.executable, __file__, "--worker", form, "--work", str(work), "--size", str(args.size)]
        cmd += ["--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode:
            sys.exit(f"{form} worker failed:\n{proc.stderr[-3000:]}")
        epochs[form] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"epoch on {form}: {epochs[form]}", flush=True)

    dvc = str(Path(sys.executable).parent / "dvc")
    remote = work / "remote"
    sh(["git", "init", "-q"], repo)
    sh([dvc, "init", "-q"], repo)
    sh([dvc, "remote", "add", "-d", "local", str(remote)], repo)
    pushes = {}
    for form, folder in (("files", "data/raw"), ("shards", "data/shards")):
        add = sh([dvc, "add", folder], repo)
        push = sh([dvc, "push", f"{folder}.dvc"], repo)
        pushes[form] = (add, push)
        print(f"dvc {form}: add {add:.1f} s, push {push:.1f} s", flush=True)

    n = args.images
    columns = f"epoch img/s (compact CNN, {args.size} px) | peak RSS MB | RSS growth in the epoch MB"
    print(f"\n| form | files | MB | {columns} | dvc add s | dvc push s |")
    print("|---|---|---|---|---|---|---|---|")
    for form, count, mb in (("JPEG folder", n, raw_mb), ("shards", len(shard_files) + 1, shard_mb)):
        key = "files" if form == "JPEG folder" else "shards"
        e, (add, push) = epochs[key], pushes[key]
        epoch = f"{e['img_s']:.0f} | {e['peak_mb']:.0f} | {e['epoch_growth_mb']:.0f}"
        print(f"| {form} | {count} | {mb:.0f} | {epoch} | {add:.1f} | {push:.1f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
