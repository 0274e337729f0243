"""Reading images for prediction: the same pixels as training, DICOM in and out of spec, bad files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.modeling import preprocess
from pipeline.serving import image_io
from tests.images import bad_inputs, dicom_bytes, png_bytes, stretched

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def xray(real_224: Path) -> Path:
    return sorted((real_224 / "test" / "PNEUMONIA").iterdir())[0]


def model_input(data: bytes, size: int = 64) -> np.ndarray:
    return image_io.model_input(image_io.load(data), size)


def test_jpeg_goes_through_the_training_decoder(xray: Path) -> None:
    data = xray.read_bytes()
    trained_on = preprocess.decode_image(tf.io.read_file(str(xray)), 64).numpy()
    np.testing.assert_array_equal(model_input(data), trained_on)


@pytest.mark.parametrize(
    ("encoding", "extra"),
    [
        ("dicom16", {}),
        ("dicom8", {"bits": 8}),
        ("monochrome1", {"photometric": "MONOCHROME1"}),
        ("rgb", {"bits": 8, "photometric": "RGB"}),
        ("windowed16", {"window": (32767.5, 65536.0)}),
    ],
)
def test_dicom_in_spec_decodes_to_the_same_pixels(xray: Path, encoding: str, extra: dict) -> None:
    arr = stretched(xray)
    image = image_io.load(dicom_bytes(arr, **extra))
    assert image.kind == "dicom" and image.warnings == [] and (image.width, image.height) == arr.shape[::-1]
    assert np.abs(image.pixels[..., 0].astype(int) - arr).max() <= 1, encoding
    np.testing.assert_allclose(image_io.model_input(image, 64), model_input(png_bytes(arr)), atol=1.01)


def test_sixteen_bit_png_is_read_like_training(xray: Path) -> None:
    from PIL import Image

    arr16 = stretched(xray).astype(np.uint16) * 257
    import io

    buffer = io.BytesIO()
    Image.fromarray(arr16).save(buffer, format="PNG")
    assert image_io.load(buffer.getvalue()).kind == "png"
    np.testing.assert_allclose(model_input(buffer.getvalue()), model_input(png_bytes(stretched(xray))), atol=1.01)


def test_dicom_outside_intended_use_is_predicted_with_warnings(xray: Path) -> None:
    data = dicom_bytes(stretched(xray), Modality="CT", BodyPartExamined="HEAD", ViewPosition="LL", PatientAge="045Y")
    warnings = image_io.load(data).warnings
    assert len(warnings) == 4
    assert any("modality CT" in w for w in warnings) and any("45 years" in w for w in warnings)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a: dicom_bytes(a, frames=3), "multi-frame DICOM (3 frames)"),
        (lambda a: dicom_bytes(a, bits=32), "32-bit pixels is not supported"),
        (lambda a: dicom_bytes(a, omit_pixels=True), "no pixel data"),
        (
            lambda a: dicom_bytes(
                a,
                transfer_syntax="1.2.840.10008.1.2.4.90",
                pixel_data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\x00" * 8,
            ),
            "transfer syntax JPEG 2000",
        ),
    ],
    ids=["multi-frame", "32-bit", "no-pixels", "jpeg2000-without-decoder"],
)
def test_dicom_out_of_spec_is_one_clear_error(xray: Path, make, reason: str) -> None:
    with pytest.raises(image_io.ImageError, match=re.escape(reason)):
        image_io.load(make(stretched(xray, 128)))


@pytest.mark.parametrize(
    ("name", "error", "reason"),
    [
        ("empty.jpeg", image_io.UnsupportedImage, "empty file"),
        ("notes.jpeg", image_io.UnsupportedImage, "not a JPEG, PNG or DICOM"),
        ("truncated.jpeg", image_io.ImageError, "corrupt JPEG"),
        ("garbage_after_magic.png", image_io.ImageError, "corrupt PNG"),
        ("bomb.png", image_io.ImageTooLarge, "claims more pixels than the limit"),
    ],
)
def test_bad_files_get_their_reason(xray: Path, name: str, error: type, reason: str) -> None:
    with pytest.raises(error, match=reason):
        image_io.load(bad_inputs(xray)[name])
