"""Benchmark: images per second for indexing and validating the real data (not a test; prints figures).

    .venv/bin/python benchmarks/bench_data.py [--shared ../shared/data] [--repeat 3]

Indexing reads, hashes and fully decodes every file (threads); validation runs both GX suites on the
index. Figures are the best of --repeat runs; compare them as ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline.core.config import load_params
from pipeline.data import dataset_index, splits, validation

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def best_of(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    times: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    params = load_params(
        REPO / "params.yaml",
        [f"validation.report={tmp / 'validation.json'}", f"validation.data_docs={tmp / 'docs'}"],
    )
    print(f"cpu cores: {os.cpu_count()}, repeat: best of {args.repeat}")
    for name, flat in (("chest_xray_224", False), ("chest_xray_fullres_sample", True)):
        root = args.shared / name
        if not root.is_dir():
            print(f"{name}: skipped, {root} not found")
            continue
        if flat:  # the sample has only NORMAL/ PNEUMONIA/: index it as the test split
            staged = tmp / name / "test"
            staged.mkdir(parents=True)
            for label in ("NORMAL", "PNEUMONIA"):
                (staged / label).symlink_to(root / label)
            root = tmp / name
        for workers in (1, 0):
            secs, index = best_of(args.repeat, lambda r=root, w=workers: dataset_index.build_index(r, w))
            mb = index["bytes"].sum() / 1e6
            label = "1 thread" if workers == 1 else f"{2 * (os.cpu_count() or 1)} threads"
            print(
                f"{name}: index ({label}): {len(index) / secs:8.1f} images/s, {mb / secs:6.1f} MB/s "
                f"({len(index)} images, {mb:.1f} MB, {secs:.2f} s)"
            )
        index = splits.assign_splits(index, params.split)
        secs, _ = best_of(args.repeat, lambda i=index: validation.validate(i, params.validation))
        print(f"{name}: validate (GX, 2 suites, data docs): {len(index) / secs:8.1f} images/s ({secs:.2f} s)")


if __name__ == "__main__":
    main()
