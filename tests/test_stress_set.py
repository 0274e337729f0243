"""The shift-stress transforms, and the aspect augmentation that trains against one of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.data.dataset_index import build_index
from pipeline.data.stress import AGAINST_CLASS, SETS, TRANSFORMS, build_stress_set, stress_sources


def _cross(size: int = 200, band: int = 20) -> np.ndarray:
    """A horizontal band at 255 and a vertical one at 100 through the centre, on black."""
    x = np.zeros((size, size), np.uint8)
    lo = (size - band) // 2
    x[lo : lo + band, :] = 255
    x[:, lo : lo + band] = 100
    return x


def _thickness(img: np.ndarray) -> tuple[float, float]:
    """Rows the horizontal band spans at the left edge, columns the vertical one spans at the top (its mass,
    so interpolated edges count by their share)."""
    return float(img[:, 2].astype(float).sum() / 255), float(img[2, :].astype(float).sum() / 100)


def test_aspect_sets_stretch_one_axis_by_a_quarter_and_keep_the_frame() -> None:
    img = Image.fromarray(_cross())
    assert _thickness(np.asarray(img)) == (20, 20)
    wider = np.asarray(TRANSFORMS["aspect_wider_x1.25"](img))
    taller = np.asarray(TRANSFORMS["aspect_taller_x1.25"](img))
    assert wider.shape == taller.shape == (200, 200)
    # Wider original, stretched to the square: the vertical extent is magnified, the horizontal one kept.
    assert _thickness(wider) == pytest.approx((25, 20), abs=0.3)
    assert _thickness(taller) == pytest.approx((20, 25), abs=0.3)


def _labelled_test_folder(root: Path) -> None:
    for label, value in (("NORMAL", 60), ("PNEUMONIA", 160)):
        (root / "test" / label).mkdir(parents=True)
        for i in range(3):
            ramp = np.add.outer(np.arange(96), 2 * np.arange(128)) % 40  # a pattern: each framing changes it
            Image.fromarray((value + i + ramp).astype(np.uint8)).save(root / "test" / label / f"{label}-{i}.jpeg")


def test_the_stress_set_holds_every_transform_for_each_class(tmp_path: Path) -> None:
    _labelled_test_folder(tmp_path / "raw")
    picked = stress_sources(build_index(tmp_path / "raw", workers=1), tmp_path / "raw", per_class=3)
    counts = build_stress_set(picked, tmp_path / "stress")
    assert counts == dict.fromkeys(SETS, 6) and set(SETS) == {*TRANSFORMS, AGAINST_CLASS}
    for name in SETS:
        for label in ("NORMAL", "PNEUMONIA"):
            files = sorted((tmp_path / "stress" / name / label).iterdir())
            assert [f.name for f in files] == [f"{label}-{i}.jpeg.png" for i in range(3)], name
    assert Image.open(tmp_path / "stress" / "aspect_wider_x1.25" / "NORMAL" / "NORMAL-0.jpeg.png").size == (128, 96)
    # The set framed apart: normal images as the wider set's, pneumonia ones as the taller set's
    for label, like in (("NORMAL", "aspect_wider_x1.25"), ("PNEUMONIA", "aspect_taller_x1.25")):
        name = f"{label}-0.jpeg.png"
        apart = np.asarray(Image.open(tmp_path / "stress" / AGAINST_CLASS / label / name))
        framed = {n: np.asarray(Image.open(tmp_path / "stress" / n / label / name)) for n in SETS}
        assert [n for n, pixels in framed.items() if np.array_equal(pixels, apart)] == [like, AGAINST_CLASS]


def test_the_stress_set_skips_what_the_index_quarantined_and_keeps_same_stem_files_apart(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _labelled_test_folder(raw)
    (raw / "test" / "NORMAL" / "A-cut.jpeg").write_bytes((raw / "test" / "NORMAL" / "NORMAL-0.jpeg").read_bytes()[:300])
    (raw / "test" / "NORMAL" / "A-empty.jpeg").write_bytes(b"")
    Image.open(raw / "test" / "NORMAL" / "NORMAL-2.jpeg").save(raw / "test" / "NORMAL" / "NORMAL-0.png")
    picked = stress_sources(build_index(raw, workers=1), raw, per_class=5)  # 4 decodable NORMAL: all of them
    assert sorted(p.name for p in picked["NORMAL"]) == [
        "NORMAL-0.jpeg",
        "NORMAL-0.png",
        "NORMAL-1.jpeg",
        "NORMAL-2.jpeg",
    ]
    counts = build_stress_set(picked, tmp_path / "stress")
    assert counts["gamma_0.6"] == 7
    written = sorted(p.name for p in (tmp_path / "stress" / "gamma_0.6" / "NORMAL").iterdir())
    assert written[:2] == ["NORMAL-0.jpeg.png", "NORMAL-0.png.png"]  # two files of one stem: two


def test_the_stress_images_spread_over_children_and_subtypes_whatever_the_file_order() -> None:
    """A patient-numbered folder's first files are a handful of children: the pick takes one image of every
    child before a second of any, the subtypes in their share, and does not depend on the order of the index."""
    from pipeline.data.stress import spread_over_patients

    rows = [(f"person{p}_bacteria_{i}.jpeg", f"person{p}", "bacteria") for p in range(1, 7) for i in range(3)]
    rows += [(f"person{p}_virus_{i}.jpeg", f"person{p}", "virus") for p in range(7, 10) for i in range(3)]
    index = pd.DataFrame(rows, columns=["path", "patient_id", "subtype"])
    picked = spread_over_patients(index, 6)
    assert picked["patient_id"].nunique() == 6  # the first six by path would be two children
    assert picked["subtype"].value_counts().to_dict() == {"bacteria": 4, "virus": 2}  # 6 of 9 children bacterial
    assert spread_over_patients(index, 12)["patient_id"].value_counts().max() == 2  # the ninth child before thirds
    shuffled = index.sample(frac=1, random_state=0)
    assert spread_over_patients(shuffled, 6)["path"].tolist() == picked["path"].tolist()


def test_a_label_without_a_decodable_test_image_is_one_clear_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _labelled_test_folder(raw)
    for f in (raw / "test" / "PNEUMONIA").iterdir():
        f.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"test/PNEUMONIA: no decodable test images"):
        stress_sources(build_index(raw, workers=1), raw, per_class=3)


def test_aspect_augmentation_stretches_each_axis_on_its_own_within_its_range() -> None:
    import tensorflow as tf

    from pipeline.core.config import AugmentParams
    from pipeline.modeling.inputs import augmenter

    aug = augmenter(AugmentParams(rotation=0, zoom=0, aspect=0.2, translation=0, contrast=0), seed=1)
    assert aug is not None
    batch = np.repeat(_cross(100)[None, :, :, None].astype(np.float32), 16, axis=0)
    out = aug(tf.constant(batch), training=True).numpy()[..., 0]
    rows, cols = np.array([_thickness(o) for o in out]).T / 20  # band growth per axis: 1 .. 1 / (1 - 0.2)
    assert rows.min() >= 0.95 and cols.min() >= 0.95 and rows.max() <= 1.3 and cols.max() <= 1.3
    assert np.ptp(rows / cols) >= 0.1  # the aspect changes from image to image, not only the scale
    assert (out.min(axis=(1, 2)) == 0).all() and not (out[:, :, :3] == 0).all()  # a crop: no fill at the edges


def test_reframing_gives_normal_images_a_wider_and_pneumonia_ones_a_taller_original() -> None:
    import tensorflow as tf

    from pipeline.modeling.inputs import MAX_REFRAME, reframe_batch

    batch = np.repeat(_cross(100)[None, :, :, None].astype(np.float32), 64, axis=0)
    labels = tf.constant([0.0, 1.0] * 32)
    rng = tf.random.Generator.from_seed(1)
    out = reframe_batch(tf.constant(batch), labels, 1.0, rng).numpy()[..., 0]
    rows, cols = np.array([_thickness(o) for o in out]).T / 20
    normal, pneumonia = slice(0, None, 2), slice(1, None, 2)
    # Normal: the height cropped (its horizontal band grows), the width kept; pneumonia the other way.
    assert np.allclose(cols[normal], 1, atol=0.03) and np.allclose(rows[pneumonia], 1, atol=0.03)
    for grown in (rows[normal], cols[pneumonia]):
        assert grown.min() >= 0.97 and grown.max() <= MAX_REFRAME + 0.05 and grown.mean() >= 1.1
    # One-hot labels (NORMAL first) are read the same way; a share of 0 changes nothing.
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), 3)
    again = reframe_batch(tf.constant(batch), one_hot, 1.0, tf.random.Generator.from_seed(1)).numpy()[..., 0]
    assert np.allclose(again, out, atol=1e-4)
    assert np.allclose(reframe_batch(tf.constant(batch), labels, 0.0, rng).numpy(), batch, atol=1e-3)
