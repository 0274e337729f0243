"""Benchmark: what the lung-field crop (``model.lung_crop``) does to real X-rays (prints figures).

    .venv/bin/python benchmarks/lung_crop_stats.py [--shared ../shared/data] [--size 128] [--sheet crops.png]

Every image of the shared test split, per class: the share that gets a crop (the rest are left whole),
the mean share of the area kept, the same share with the stress set's 12% black frame added, and how
far the frame moves the crop on the content (the largest edge shift, as a fraction of the side).
``--sheet`` also draws 12 images per class with their boxes, to look at.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.stress import TRANSFORMS
from pipeline.modeling.lung_crop import LungFieldCrop

FRAME = 0.12  # the stress set's border_12pct
WHOLE = np.array([0.0, 0.0, 1.0, 1.0])


def crop_boxes(layer: LungFieldCrop, images: list[Image.Image], batch: int = 256) -> np.ndarray:
    arrays = [np.asarray(image, np.float32)[..., None] for image in images]
    return np.concatenate(
        [layer.crop_boxes(np.stack(arrays[i : i + batch])).numpy() for i in range(0, len(arrays), batch)]
    )


def sheet(images: list[Image.Image], boxes: np.ndarray, path: Path, side: int = 160) -> None:
    canvas = Image.new("RGB", (side * len(images), side))
    for i, (image, (y1, x1, y2, x2)) in enumerate(zip(images, boxes, strict=True)):
        tile = image.resize((side, side)).convert("RGB")
        ImageDraw.Draw(tile).rectangle(
            [x1 * side, y1 * side, x2 * side - 1, y2 * side - 1], outline=(0, 255, 0), width=2
        )
        canvas.paste(tile, (i * side, 0))
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--sheet", type=Path, help="a PNG of 12 images per class with their boxes")
    args = parser.parse_args()
    layer, rows = LungFieldCrop(), []
    print("| class | images | cropped | area kept | cropped, 12% frame | shift by the frame (median) |")
    print("|---|---|---|---|---|---|")
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((args.shared / "chest_xray_224" / "test" / label).glob("*.jpeg"))
        images = [Image.open(f).convert("L").resize((args.size,) * 2, Image.Resampling.BILINEAR) for f in files]
        plain = crop_boxes(layer, images)
        framed = crop_boxes(layer, [TRANSFORMS["border_12pct"](image) for image in images])
        cropped, cropped_framed = (plain != WHOLE).any(axis=1), (framed != WHOLE).any(axis=1)
        area = ((plain[:, 2] - plain[:, 0]) * (plain[:, 3] - plain[:, 1]))[cropped]
        both = cropped & cropped_framed
        shift = np.abs(plain[both] - (framed[both] - FRAME) / (1 - 2 * FRAME)).max(axis=1)
        print(
            f"| {label} | {len(files)} | {cropped.mean():.3f} | {area.mean():.3f} | {cropped_framed.mean():.3f} "
            f"| {np.median(shift):.3f} |"
        )
        rows.append((images[:: max(1, len(images) // 12)][:12], plain[:: max(1, len(images) // 12)][:12]))
    if args.sheet:
        sheets = [args.sheet.with_name(f"{args.sheet.stem}-{label.lower()}.png") for label in ("NORMAL", "PNEUMONIA")]
        for (images, boxes), path in zip(rows, sheets, strict=True):
            sheet(images, boxes, path)
        print("sheets:", ", ".join(map(str, sheets)))


if __name__ == "__main__":
    main()
