"""Benchmark: how far the lung-field crop's box moves under changes that should not move it (prints figures).

    .venv/bin/python benchmarks/lung_crop_stability.py [--shared ../shared/data] [--size 64 128]

For every third image of the shared test split: the box after brightness x0.9 / x1.1 / -10 / +10 and
contrast x0.9 / x1.1 (the behaviour tests' changes), and for the full-resolution originals against their
224 px copies. Per change: the median and the largest edge shift (fraction of the side), and the share of
images whose box moved by more than 0.05 of the side, or went from cropped to whole (or back).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.data.stress import small_changes
from pipeline.modeling.lung_crop import LungFieldCrop
from pipeline.serving.behaviour import model_inputs

WHOLE = np.array([0.0, 0.0, 1.0, 1.0])


def boxes(layer: LungFieldCrop, x: np.ndarray) -> np.ndarray:
    return np.concatenate([layer.crop_boxes(np.clip(x[i : i + 256], 0, 255)).numpy() for i in range(0, len(x), 256)])


def row(name: str, before: np.ndarray, after: np.ndarray) -> str:
    shift = np.abs(before - after).max(axis=1)
    switched = (before == WHOLE).all(axis=1) != (after == WHOLE).all(axis=1)
    return (
        f"| {name} | {len(shift)} | {np.median(shift):.3f} | {shift.max():.3f} | {(shift > 0.05).mean():.3f} "
        f"| {switched.mean():.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    layer = LungFieldCrop()
    test = sorted((args.shared / "chest_xray_224" / "test").rglob("*.jpeg"))[::3]
    copies = {p.name: p for p in (args.shared / "chest_xray_224").rglob("*.jpeg")}
    originals = [f for f in sorted((args.shared / "chest_xray_fullres_sample").rglob("*.jpeg")) if f.name in copies]
    for size in args.size:
        print(f"\n{size} px: | change | images | median shift | largest shift | moved > 0.05 | cropped <-> whole |")
        print("|---|---|---|---|---|---|")
        x = model_inputs(test, size)
        base = boxes(layer, x)
        for name, changed in small_changes(x).items():
            print(row(name, base, boxes(layer, changed)))
        full = boxes(layer, model_inputs(originals, size))
        print(
            row(
                "full resolution vs 224 px copy",
                boxes(layer, model_inputs([copies[f.name] for f in originals], size)),
                full,
            )
        )


if __name__ == "__main__":
    main()
