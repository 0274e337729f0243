"""A shift-stress set: labelled images changed the way other hospitals' images differ.

From a labelled folder (NORMAL/ and PNEUMONIA/), each transform writes its own labelled folder:
intensity (darker, brighter), contrast (lower), gamma (both ways), resolution (down to 64 px and
back), a black border (the image shrunk inside the frame), a tighter crop, and another aspect ratio
(the original framed 25% wider or taller, then stretched to the square), and the two framed apart
(normal images wider, pneumonia ones taller: a model reading the class off the shape). The full-resolution
originals, when given, are copied as one more set. Every set is scored like an external data set
(``pneumo external-validation``), so a model's robustness is a table, not a guess.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.config import LABELS
from pipeline.core.errors import DataError


def _scale(img: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img, np.float32) * factor, 0, 255).astype(np.uint8))


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    x = np.asarray(img, np.float32)
    return Image.fromarray(np.clip((x - x.mean()) * factor + x.mean(), 0, 255).astype(np.uint8))


def _gamma(img: Image.Image, gamma: float) -> Image.Image:
    x = np.asarray(img, np.float32) / 255.0
    return Image.fromarray((np.power(x, gamma) * 255).round().astype(np.uint8))


def _resolution(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.Resampling.BOX).resize(img.size, Image.Resampling.BILINEAR)


def _border(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    inner = img.resize((round(w * (1 - 2 * fraction)), round(h * (1 - 2 * fraction))), Image.Resampling.BOX)
    frame = Image.new("L", (w, h), 0)
    frame.paste(inner, (round(w * fraction), round(h * fraction)))
    return frame


def _crop(img: Image.Image, keep: float, keep_height: float | None = None) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * (1 - keep) / 2), round(h * (1 - (keep if keep_height is None else keep_height)) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _aspect(img: Image.Image, wider: float) -> Image.Image:
    """The image as if its original had been `wider` times wider than tall (< 1: taller) and then
    stretched to this frame, as the published images are: the other axis cropped, the frame filled."""
    keep_w, keep_h = (1.0, 1 / wider) if wider >= 1 else (wider, 1.0)
    return _crop(img, keep_w, keep_h).resize(img.size, Image.Resampling.BILINEAR)


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "darker_x0.7": lambda i: _scale(i, 0.7),
    "brighter_x1.3": lambda i: _scale(i, 1.3),
    "contrast_x0.6": lambda i: _contrast(i, 0.6),
    "gamma_0.6": lambda i: _gamma(i, 0.6),
    "gamma_1.6": lambda i: _gamma(i, 1.6),
    "resolution_64px": lambda i: _resolution(i, 64),
    "border_12pct": lambda i: _border(i, 0.12),
    "crop_80pct": lambda i: _crop(i, 0.8),
    # Pneumonia originals are wider than normal ones (median width/height 1.50 against 1.20 in the 48
    # full-resolution files), so stretched to a square they look narrower: a shortcut a model can learn.
    "aspect_wider_x1.25": lambda i: _aspect(i, 1.25),
    "aspect_taller_x1.25": lambda i: _aspect(i, 0.8),
}

# Every set above changes both classes alike, which moves a model's threshold but rarely its ranking. This
# one changes them apart: normal images framed as wider originals, pneumonia ones as taller, the frame's
# usual relation to the class turned round. A model that reads the class off the shape loses its ranking
# here (ROC AUC towards 0.5), not only its threshold; one that reads the lungs does not.
AGAINST_CLASS = "aspect_against_class"
SETS: dict[str, dict[str, Callable[[Image.Image], Image.Image]]] = {
    **{name: dict.fromkeys(LABELS, transform) for name, transform in TRANSFORMS.items()},
    AGAINST_CLASS: {"NORMAL": TRANSFORMS["aspect_wider_x1.25"], "PNEUMONIA": TRANSFORMS["aspect_taller_x1.25"]},
}


def small_changes(x: np.ndarray) -> dict[str, np.ndarray]:
    """Small exposure and contrast changes of model inputs (N, S, S, 1) in [0, 255], not clipped: what a model's
    confident labels (tests/test_model_behaviour.py) and the lung crop's box (benchmarks/lung_crop_stability.py)
    should not move under."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return {
        "brightness x0.9": x * 0.9,
        "brightness x1.1": x * 1.1,
        "brightness -10": x - 10,
        "brightness +10": x + 10,
        "contrast x0.9": (x - mean) * 0.9 + mean,
        "contrast x1.1": (x - mean) * 1.1 + mean,
    }


def _fixed_rank(text: str) -> int:
    """A pseudo-random rank for a name, the same on every machine: a pick that does not follow the numbering (a
    folder's first ids are often one clinic's or one period's children, a child's first file one subtype's)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def spread_over_patients(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """`n` rows of an index, spread over children: one image of every patient before a second of any, and
    within each such round the subtypes (bacterial, viral) interleaved in their share of that round's images;
    patients and each patient's images in `_fixed_rank` order."""
    rows = rows.assign(rank=rows["patient_id"].map(_fixed_rank), within=rows["path"].map(_fixed_rank))
    rows = rows.sort_values(["within", "path"]).assign(visit=lambda f: f.groupby("patient_id").cumcount())
    group = rows.groupby(["visit", "subtype"])["rank"]
    rows = rows.assign(share=(group.rank(method="first") - 0.5) / group.transform("size"))
    picked = rows.sort_values(["visit", "share", "subtype", "path"]).head(n)
    return picked.drop(columns=["rank", "within", "visit", "share"])


def stress_sources(index: pd.DataFrame, root: str | Path, per_class: int) -> dict[str, list[Path]]:
    """`per_class` decodable test images of each label, spread over children (`spread_over_patients`: a
    patient-numbered split's first files by path are a handful of children). A file the index quarantined
    (truncated, empty, not an image) is never picked."""
    test = index[(index["split"] == "test") & index["decodable"]]
    picked = {
        label: [Path(root) / p for p in spread_over_patients(test[test["label"] == label], per_class)["path"]]
        for label in LABELS
    }
    for label, files in picked.items():
        if not files:
            raise DataError(f"{Path(root) / 'test' / label}: no decodable test images (a stress set needs both labels)")
    return picked


def build_stress_set(
    picked: dict[str, list[Path]], out: str | Path, fullres: str | Path | None = None
) -> dict[str, int]:
    """Write out/<set>/{NORMAL,PNEUMONIA}/ for every set of `SETS` from the `picked` files of each label (each
    written as its file name plus ``.png``, so ``x.jpeg`` and ``x.png`` stay two images) and, with `fullres`,
    the originals as out/fullres/; returns images per set."""
    out = Path(out)
    counts = {}
    for name, transforms in SETS.items():
        for label, files in picked.items():
            target = out / name / label
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                try:
                    with Image.open(f) as img:
                        transforms[label](img.convert("L")).save(target / f"{f.name}.png")
                except OSError as exc:
                    raise DataError(f"{f}: cannot be read for the stress set ({exc})") from exc
        counts[name] = sum(len(f) for f in picked.values())
    if fullres is not None:
        shutil.copytree(fullres, out / "fullres", dirs_exist_ok=True)
        counts["fullres"] = sum(1 for p in (out / "fullres").rglob("*") if p.is_file())
    return counts
