"""Reading images for prediction: the same pixels as training, DICOM in and out of spec, CMYK and turned
JPEG/PNG, bad files. Compressed and deflated DICOM: tests/test_dicom_inputs.py."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from mlflow.exceptions import MlflowException
from PIL import Image, ImageOps

from pipeline.modeling import preprocess
from pipeline.serving import image_io, pyfunc_model
from pipeline.serving.classifier import ModelInfo
from tests.images import bad_inputs, cmyk_jpeg, dicom_bytes, oriented, png_bytes, stretched, ycck_jpeg

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


def two_valued_transfer_syntax(xray: Path) -> bytes:
    """A DICOM whose TransferSyntaxUID lost a byte to a backslash: 1.2.840.100\\8.1.2.1, two values."""
    data = dicom_bytes(stretched(xray, 128))
    bad = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.100\\8.1.2.1\x00", 1)
    assert bad != data
    return bad


def test_a_transfer_syntax_that_is_not_one_uid_is_one_clear_error(xray: Path) -> None:
    with pytest.raises(
        image_io.ImageError, match=r"^corrupt DICOM header \(the transfer syntax is not a single UID\)$"
    ):
        image_io.load(two_valued_transfer_syntax(xray))


def test_the_pyfunc_wrapper_turns_any_decoding_failure_into_its_row_error(
    xray: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As REST does: an ImageError keeps its reason, anything else a decoder raises is "cannot decode (Type)"."""
    wrapper = pyfunc_model.ChestXrayClassifier()
    info = ModelInfo(0.61, ("NORMAL", "PNEUMONIA"), 64, "binary", "compact_cnn", "relu3", name="pneumo", version="3")
    wrapper.classifier = SimpleNamespace(info=info)  # type: ignore[assignment]
    rows = pd.DataFrame({"image": [png_bytes(stretched(xray, 64)), two_valued_transfer_syntax(xray)]})
    with pytest.raises(MlflowException, match=r"^row 1: corrupt DICOM header \(the transfer syntax") as caught:
        wrapper.predict(None, rows)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"

    def failing(data: bytes) -> image_io.LoadedImage:
        raise KeyError("a decoder's internals\nover two lines")

    monkeypatch.setattr(image_io, "load", failing)
    with pytest.raises(MlflowException, match=r"^row 0: cannot decode \(KeyError\)$") as caught:
        wrapper.predict(None, rows)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"

    # Asked to, it answers each row instead (no model call: nothing was decodable), with the same reasons.
    answered = wrapper.predict(None, rows, params={"on_error": "row"})
    assert list(answered.columns) == list(pyfunc_model.OUTPUT_COLUMNS)
    assert answered["status"].tolist() == ["error", "error"]
    assert answered["error"].tolist() == ["cannot decode (KeyError)"] * 2
    assert answered["probability"].tolist() == [None, None] and answered["label"].tolist() == [None, None]
    assert answered["threshold"].tolist() == [0.61, 0.61]
    with pytest.raises(MlflowException, match=r"^params: on_error: 'skip' is not one of \['raise', 'row'\]$"):
        wrapper.predict(None, rows, params={"on_error": "skip"})


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


def tinted(grey: np.ndarray) -> np.ndarray:
    """A colour picture of `grey`, so every colour conversion on the way matters."""
    return np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.5).astype(np.uint8)], axis=-1)


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb.astype(np.float64) @ image_io.LUMA.astype(np.float64))


@pytest.mark.parametrize(("make", "transform"), [(cmyk_jpeg, 0), (ycck_jpeg, 2)], ids=["cmyk", "ycck"])
def test_cmyk_and_ycck_jpegs_are_read_as_grey(xray: Path, make, transform: int) -> None:
    """TensorFlow cannot decode them (it called them corrupt); Pillow does, then the same luma weights."""
    rgb = tinted(stretched(xray))
    data = make(rgb)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK" and img.info["adobe_transform"] == transform
    image = image_io.load(data)
    assert image.kind == "jpeg" and image.pixels.shape == (*rgb.shape[:2], 1) and image.warnings == []
    error = np.abs(image.pixels[..., 0] - luma(rgb))
    assert error.max() <= 10 and error.mean() <= 1.5, (error.max(), error.mean())
    np.testing.assert_allclose(model_input(data), model_input(png_bytes(rgb)), atol=2.0)  # the original, as trained


def test_a_large_cmyk_jpeg_is_turned_grey_a_strip_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pixels as the whole image turned grey at once, with array temporaries of a strip, not about
    20 bytes a pixel of float planes (Pillow's own buffers are not counted by tracemalloc; numpy's are)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rgb = tinted(np.repeat(np.repeat(rng.integers(0, 256, (250, 300), dtype=np.uint8), 8, 0), 8, 1))  # 2000x2400
    data = cmyk_jpeg(rgb)
    with Image.open(io.BytesIO(data)) as img:
        whole = image_io._luma(np.asarray(img.convert("RGB")))
    tracemalloc.start()
    try:
        pixels = image_io.load(data).pixels
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(pixels, whole)
    assert peak < 2 * pixels.size + 24 * image_io.STRIP_PIXELS, f"{peak / pixels.size:.1f} bytes a pixel"


def test_ycck_planes_are_not_read_as_plain_cmyk(xray: Path) -> None:
    """The YCCK file really is YCCK: the same planes flagged as CMYK (transform 0) are a different picture."""
    rgb = tinted(stretched(xray))
    data = bytearray(ycck_jpeg(rgb))
    data[data.index(b"\xff\xee\x00\x0eAdobe") + 15] = 0
    assert np.abs(image_io.load(bytes(data)).pixels[..., 0] - luma(rgb)).mean() > 20


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_a_png_upright_exactly(xray: Path, orientation: int) -> None:
    upright = stretched(xray)[:, :180]  # not square: a transposition shows in the shape
    data = oriented(upright, orientation, "PNG")
    with Image.open(io.BytesIO(data)) as img:  # the file is tagged as viewers read it
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(img)), upright)
    image = image_io.load(data)
    assert (image.width, image.height) == (180, upright.shape[0]) and image.pixels.flags.c_contiguous
    np.testing.assert_array_equal(image.pixels[..., 0], upright)


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
def test_exif_orientation_turns_a_jpeg_upright_decoded_as_in_training(xray: Path, orientation: int) -> None:
    """Pixels still come from TensorFlow's decoder, turned with numpy exactly as Pillow would turn them;
    the turned file then matches the upright one within JPEG noise, and as a model input."""
    upright = stretched(xray)[:, :176]
    data = oriented(upright, orientation, "JPEG")
    stored = Image.fromarray(tf.io.decode_image(data, channels=1).numpy()[..., 0])
    stored.info["exif"] = Image.open(io.BytesIO(data)).info["exif"]
    image = image_io.load(data)
    np.testing.assert_array_equal(image.pixels[..., 0], np.asarray(ImageOps.exif_transpose(stored)))
    reference = image_io.load(oriented(upright, 1, "JPEG"))
    error = np.abs(image.pixels.astype(int) - reference.pixels)
    assert error.mean() <= 1.0 and error.max() <= 16, (error.mean(), error.max())
    # Model inputs are whole gray levels: rounding can turn a 1.5 difference into 2.
    np.testing.assert_allclose(image_io.model_input(image, 64), image_io.model_input(reference, 64), atol=2.0)


def test_unreadable_exif_is_a_warning_not_an_error(xray: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(stretched(xray)).save(buffer, format="JPEG", exif=b"Exif\x00\x00not a TIFF header")
    image = image_io.load(buffer.getvalue())
    assert image.warnings == ["unreadable EXIF block: the image is predicted as stored, orientation not applied"]


def test_the_pyfunc_answers_each_class_probability_of_a_three_class_model(xray: Path, tmp_path: Path) -> None:
    """As `pneumo predict` writes p_<class> columns and REST class_probabilities: why BACTERIAL over VIRAL."""
    from pipeline.modeling.models import build_model
    from pipeline.serving.classifier import Classifier

    names = ("NORMAL", "BACTERIAL", "VIRAL")
    wrapper = pyfunc_model.ChestXrayClassifier()
    info = ModelInfo(0.5, names, 32, "three_class", "compact_cnn", "relu3")
    wrapper.classifier = Classifier(build_model("compact_cnn", 32, n_classes=3).model, info)
    rows = pd.DataFrame({"image": [png_bytes(stretched(xray, 64)), b"not an image"]})
    answered = wrapper.predict(None, rows, params={"on_error": "row"})
    columns = [*pyfunc_model.OUTPUT_COLUMNS, "p_NORMAL", "p_BACTERIAL", "p_VIRAL"]
    assert list(answered.columns) == columns == [c.name for c in pyfunc_model.signature(names).outputs.inputs]
    first = answered.iloc[0]
    assert first["status"] == "ok" and sum(first[f"p_{n}"] for n in names) == pytest.approx(1.0, abs=1e-5)
    flagged = 1 - first["p_NORMAL"] >= 0.5  # the served rule: NORMAL below the threshold, else the likelier kind
    assert first["label"] == (max(names[1:], key=lambda n: first[f"p_{n}"]) if flagged else "NORMAL")
    assert answered.iloc[1]["status"] == "error" and answered.iloc[1]["p_VIRAL"] is None
    # `pneumo predict` answers the same row for the same image (one rule, Prediction.row)
    from pipeline.serving.predict import predict_files

    image = tmp_path / "xray.png"
    image.write_bytes(png_bytes(stretched(xray, 64)))
    [row] = predict_files(wrapper.classifier, [str(image)], progress=False)
    assert {k: row[k] for k in columns} == pytest.approx(first.to_dict())


def test_the_pyfunc_decodes_and_predicts_a_long_frame_in_bounded_chunks(
    xray: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Spark batch or a big /invocations frame is not decoded and predicted whole (memory); chunks change no
    answer, and an unreadable row is still named by its place in the whole frame."""
    from pipeline.modeling.models import build_model
    from pipeline.serving.classifier import Classifier

    monkeypatch.setattr(pyfunc_model, "MAX_ROWS", 4)
    wrapper = pyfunc_model.ChestXrayClassifier()
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "compact_cnn", "relu3")
    wrapper.classifier = Classifier(build_model("compact_cnn", 32).model, info)
    calls: list[int] = []
    predict = wrapper.classifier.predict
    monkeypatch.setattr(wrapper.classifier, "predict", lambda batch: calls.append(len(batch)) or predict(batch))
    images = [png_bytes(stretched(xray, size)) for size in (40, 48, 56, 64, 72, 80, 88, 96, 104, 112)]
    frame = wrapper.predict(None, pd.DataFrame({"image": images}))
    assert calls == [4, 4, 2] and frame["status"].tolist() == ["ok"] * 10
    alone = [wrapper.predict(None, pd.DataFrame({"image": [one]}))["probability"][0] for one in images]
    np.testing.assert_allclose(frame["probability"].astype(float), alone, atol=1e-5)
    with pytest.raises(MlflowException, match=r"^row 9: "):
        wrapper.predict(None, pd.DataFrame({"image": [*images[:9], b"not an image"]}))
