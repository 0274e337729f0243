"""A deterministic generator of small chest-radiograph-like images in the Kaggle layout.

Each image has a body outline, two dark lung fields, ribs, a spine and a heart shadow, film grain
and per-patient anatomy. Pneumonia adds opacities inside the lungs: bacterial cases a dense
confluent consolidation in one lobe (lobar pneumonia), viral cases faint, patchy, bilateral
interstitial markings. The same parameters give byte-identical JPEGs.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline.core.config import SyntheticParams

# Patient ids start here per split so no patient is shared between splits.
_SPLIT_OFFSET = {"train": 0, "val": 5000, "test": 8000}


@dataclass(frozen=True)
class SyntheticImage:
    split: str
    label: str  # NORMAL | PNEUMONIA
    subtype: str  # none | bacteria | virus
    filename: str
    patient: int
    seed: int


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    return x, y


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Soft-edged ellipse mask in [0, 1]."""
    d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.clip(1.5 - d, 0.0, 1.0) ** 1.5


def _blobs(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    n: int,
    cx: tuple[float, float],
    cy: tuple[float, float],
    r: tuple[float, float],
) -> np.ndarray:
    out = np.zeros_like(x)
    for _ in range(n):
        bx, by = rng.uniform(*cx), rng.uniform(*cy)
        rad = rng.uniform(*r)
        out += np.exp(-(((x - bx) ** 2 + (y - by) ** 2) / (2 * rad**2)))
    return out


def render(item: SyntheticImage, size: int) -> np.ndarray:
    """Render one image as uint8 grayscale, a pure function of `item` and `size`."""
    anatomy = np.random.default_rng([item.patient, 11])  # same patient, same anatomy
    rng = np.random.default_rng([item.seed, item.patient, zlib.crc32(item.filename.encode())])
    x, y = _grid(size)
    shift_x, shift_y = rng.normal(0, 0.015, 2)
    x, y = x + shift_x, y + shift_y

    body = _ellipse(x, y, 0.5, 0.55, 0.46 + anatomy.normal(0, 0.02), 0.55)
    img = 0.18 + 0.42 * body
    lung_w, lung_h = 0.15 + anatomy.normal(0, 0.01), 0.30 + anatomy.normal(0, 0.02)
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(x, y, 0.5 + side * 0.19, 0.48, lung_w, lung_h)
        lungs.append(lung)
        img -= 0.33 * lung
    lung_mask = np.clip(lungs[0] + lungs[1], 0, 1)
    # Ribs: bright arcs across the lung fields.
    phase = anatomy.uniform(0, np.pi)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 9.0 + 1.8 * (x - 0.5) ** 2) + phase)
    img += 0.08 * (ribs**6) * lung_mask
    img += 0.20 * _ellipse(x, y, 0.5, 0.55, 0.045, 0.5)  # spine
    img += 0.28 * _ellipse(x, y, 0.56 + anatomy.normal(0, 0.01), 0.62, 0.13, 0.13)  # heart

    if item.subtype == "bacteria":  # lobar consolidation: dense, confluent, one lung
        side = rng.choice([-1, 1])
        cx = 0.5 + side * 0.19
        blob = _blobs(rng, x, y, rng.integers(2, 4), (cx - 0.05, cx + 0.05), (0.45, 0.68), (0.04, 0.07))
        img += 0.30 * np.clip(blob, 0, 1) * lung_mask
    elif item.subtype == "virus":  # interstitial: faint, patchy, both lungs
        blob = _blobs(rng, x, y, rng.integers(14, 22), (0.28, 0.72), (0.25, 0.75), (0.012, 0.025))
        img += 0.16 * np.clip(blob, 0, 1) * lung_mask
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.035, img.shape)  # exposure, film grain
    arr = np.clip(img * 255, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(arr, "L").filter(ImageFilter.GaussianBlur(0.6)))


def plan(params: SyntheticParams) -> Iterator[SyntheticImage]:
    """Every image to generate, with Kermany-style names carrying patient ids."""
    rng = np.random.default_rng(params.seed)
    image_no = 0
    for split, counts in sorted(params.counts.items()):
        pid = _SPLIT_OFFSET[split]
        for subtype, n in (("none", counts.normal), ("bacteria", counts.bacteria), ("virus", counts.virus)):
            made = 0
            while made < n:
                pid += 1
                k = min(int(rng.integers(1, params.max_images_per_patient + 1)), n - made)
                for j in range(k):
                    image_no += 1
                    if subtype == "none":
                        prefix = "NORMAL2-IM" if pid % 3 == 0 else "IM"
                        name = f"{prefix}-{pid:04d}-{j + 1:04d}.jpeg"
                        label = "NORMAL"
                    else:
                        name = f"person{pid}_{subtype}_{image_no}.jpeg"
                        label = "PNEUMONIA"
                    yield SyntheticImage(split, label, subtype, name, pid, params.seed)
                made += k


def encode_jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate(params: SyntheticParams, out_dir: Path) -> int:
    """Write the synthetic data set under `out_dir` in the Kaggle layout; returns the image count."""
    n = 0
    for item in plan(params):
        target = out_dir / item.split / item.label / item.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_jpeg(render(item, params.image_size)))
        n += 1
    return n
