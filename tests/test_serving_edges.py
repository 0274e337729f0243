"""Edge cases of serving inputs found in review: big-endian DICOM items, 16-bit PNGs of 12-bit data, unsupported
DICOMs (415) and missing decoder plugins (501), glob inputs, multipart media type case, bundle load errors, ages."""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, SecondaryCaptureImageStorage, generate_uid
from starlette.requests import Request

from pipeline.core.errors import PipelineError
from pipeline.modeling import preprocess
from pipeline.serving import image_io, rest
from pipeline.serving.classifier import MODEL_FILE, SERVING_FILE, Classifier
from pipeline.serving.predict import expand
from tests.images import dicom_bytes

RNG = np.random.default_rng(0)
BASE = RNG.integers(0, 256, (40, 60)).astype(np.uint16)  # a (H, W) image of 8-bit values


def big_endian_dicom(items: int) -> bytes:
    """A 64 x 32 12-bit image in Explicit VR Big Endian with `items` empty sequence items."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRBigEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(items)])
    arr = np.tile(np.arange(64, dtype=np.uint16) * 64, (32, 1))
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.byteswap().tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, little_endian=False, implicit_vr=False)
    return buffer.getvalue()


def test_big_endian_sequence_items_count_against_the_limit() -> None:
    items = image_io.MAX_SEQUENCE_ITEMS + 1
    with pytest.raises(image_io.ImageTooLarge, match=rf"^DICOM with {items:,} sequence items is over the limit"):
        image_io.load(big_endian_dicom(items))
    assert image_io.load(big_endian_dicom(50)).pixels.shape == (32, 64, 1)  # a few items read as ever


def png16(values: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit grey PNG of `values`, with an sBIT chunk after IHDR when `sbit` is given."""
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if sbit is None:
        return data
    body = b"sBIT" + bytes([sbit])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
    return data[:33] + chunk + data[33:]  # magic (8) and IHDR (25)


def high_byte(data: bytes) -> np.ndarray:
    """What every 16-bit PNG decoded to before: TensorFlow's 8-bit decode."""
    return tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8).numpy()


def test_a_16_bit_png_of_12_bit_data_is_stretched_not_cut_to_its_high_byte() -> None:
    values = BASE * 16 + 100  # 100..4180: 12-bit data, as PACS exports write it
    values[0, 0] = 4095
    values = np.minimum(values, 4095)
    got = image_io.load(png16(values)).pixels[..., 0]
    lo, hi = float(values.min()), float(values.max())
    np.testing.assert_array_equal(got, np.round((values - lo) / (hi - lo) * 255).astype(np.uint8))
    assert high_byte(png16(values)).max() <= 15  # what the model was fed before


def test_a_16_bit_png_with_sbit_is_scaled_from_its_significant_bits() -> None:
    got = image_io.load(png16(BASE * 4, sbit=10)).pixels[..., 0]
    np.testing.assert_array_equal(got, np.round(BASE * 4.0 * 255 / 1023).astype(np.uint8))


@pytest.mark.parametrize("sbit", [None, 12, 16], ids=["no-sbit", "sbit-12-shifted", "sbit-16"])
def test_a_full_range_16_bit_png_keeps_exactly_its_high_byte(sbit: int | None) -> None:
    """Images trained on or served before decode to the same pixels: a spec-conforming sBIT (samples scaled up to
    16 bits) changes nothing."""
    data = png16(BASE * 257, sbit)
    np.testing.assert_array_equal(image_io.load(data).pixels, high_byte(data))
    np.testing.assert_array_equal(preprocess.decode_gray(data).numpy(), high_byte(data))


@pytest.mark.parametrize("sbit", [None, 12], ids=["stretched", "sbit"])
def test_training_and_serving_decode_a_12_bit_png_alike(sbit: int | None) -> None:
    data = png16(BASE * 16, sbit)
    served = image_io.model_input(image_io.load(data), 32)
    np.testing.assert_array_equal(preprocess.decode_image(tf.constant(data), 32).numpy(), served)
    in_graph = tf.data.Dataset.from_tensors(data).map(lambda x: preprocess.decode_image(x, 32))  # as training runs
    np.testing.assert_array_equal(next(iter(in_graph)).numpy(), served)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a: dicom_bytes(a, frames=2), "multi-frame DICOM (2 frames) is not a radiograph"),
        (lambda a: dicom_bytes(a, bits=32), "DICOM with 32-bit pixels is not supported (8 or 16)"),
        (
            lambda a: dicom_bytes(a, bits=8, PhotometricInterpretation="PALETTE COLOR"),
            "DICOM photometric interpretation PALETTE COLOR is not supported",
        ),
    ],
    ids=["multi-frame", "32-bit", "palette"],
)
def test_valid_but_unsupported_dicom_is_415_not_corrupt(make, reason: str) -> None:
    with pytest.raises(image_io.UnsupportedImage, match=f"^{re.escape(reason)}$"):
        image_io.load(make(BASE.astype(np.uint8)))


def failure(monkeypatch: pytest.MonkeyPatch, error: image_io.ImageError) -> rest.DecodeFailure:
    def refuse(data: bytes) -> image_io.LoadedImage:
        raise error

    monkeypatch.setattr(image_io, "load", refuse)
    with pytest.raises(rest.DecodeFailure) as caught:
        rest.predict_bytes(None, b"", "x.dcm")  # type: ignore[arg-type] - refused before the model is used
    return caught.value


def test_a_missing_decoder_plugin_is_the_servers_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = failure(monkeypatch, image_io.DecoderMissing("no decoder installed for DICOM transfer syntax JPEG"))
    assert (missing.status, missing.reason) == (501, "no_decoder")
    unsupported = failure(monkeypatch, image_io.UnsupportedImage("multi-frame DICOM (2 frames) is not a radiograph"))
    assert (unsupported.status, unsupported.reason) == (415, "unsupported")


def test_glob_inputs_skip_heat_maps_and_junk_like_folders(tmp_path: Path) -> None:
    for name in ("scans/1.png", "scans/b/2.png", "scans/heat/1.gradcam.png", "scans/__MACOSX/3.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for pattern in (f"{tmp_path}/scans/**/*.png", f"{tmp_path}/*/**/*.png"):
        files, missing = expand([pattern])
        assert [Path(f).relative_to(tmp_path).as_posix() for f in files] == ["scans/1.png", "scans/b/2.png"]
        assert not missing
    named = tmp_path / "scans" / "heat" / "1.gradcam.png"
    assert expand([str(named)])[0] == [str(named)]  # a file named explicitly is taken as given


def test_multipart_media_type_is_case_insensitive() -> None:
    body = (
        b'--xx\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\nPIXELS\r\n--xx--\r\n"
    )
    headers = [(b"content-type", b"Multipart/Form-Data; boundary=xx"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    data, filename = asyncio.run(rest.read_upload(Request(scope, receive), 10_000, 1.0))
    assert (data, filename) == (b"PIXELS", "x.png")


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ('{"threshold": 0.5', "JSONDecodeError: Expecting"),
        (json.dumps({"threshold": 0.5, "class_names": ["a", "b"]}), "TypeError: ModelInfo.__init__() missing"),
        ("[1, 2]", "TypeError: list indices must be integers"),
    ],
    ids=["not-json", "incompatible", "not-an-object"],
)
def test_an_invalid_serving_json_is_one_line_naming_the_file(tmp_path: Path, text: str, cause: str) -> None:
    (tmp_path / SERVING_FILE).write_text(text)
    with pytest.raises(PipelineError) as caught:
        Classifier.from_bundle(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / SERVING_FILE}: invalid {SERVING_FILE} ({cause}") and "\n" not in message


def test_a_keras_load_failure_says_why(tmp_path: Path) -> None:
    info = {"threshold": 0.5, "class_names": ["NORMAL", "PNEUMONIA"], "image_size": 32, "task": "binary"}
    (tmp_path / SERVING_FILE).write_text(json.dumps({**info, "architecture": "x", "last_conv_layer": "conv"}))
    (tmp_path / MODEL_FILE).write_bytes(b"not a zip")
    with pytest.raises(PipelineError) as caught:
        Classifier.from_bundle(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / MODEL_FILE}: cannot load the model (") and "\n" not in message
    assert len(message) > len(f"{tmp_path / MODEL_FILE}: cannot load the model (ValueError)")  # not the type alone


@pytest.mark.parametrize(
    ("drift", "said"),
    [
        (None, "serving.json sets ood_threshold 3.0 but there is no 'ood' reference here"),
        ('{"ood": ', "invalid drift_reference.json (JSONDecodeError: Expecting value"),
        ("[1, 2]", "invalid drift_reference.json (not a JSON object)"),
        ('{"features": {}}', "serving.json sets ood_threshold 3.0 but there is no 'ood' reference here"),
    ],
    ids=["missing", "not-json", "not-an-object", "no-ood-part"],
)
def test_a_bundle_that_would_serve_without_its_ood_guard_says_so_naming_the_file(
    tmp_path: Path, drift: str | None, said: str
) -> None:
    """serving.json promises refusals above an OOD threshold: without the reference, blank pages and photos would
    get a label and nothing would say the guard is off."""
    from pipeline.modeling.models import build_model
    from pipeline.serving.classifier import DRIFT_FILE

    build_model("compact_cnn", 32).model.save(tmp_path / MODEL_FILE)
    info = {"threshold": 0.5, "class_names": ["NORMAL", "PNEUMONIA"], "image_size": 32, "task": "binary"}
    serving = {**info, "architecture": "compact_cnn", "last_conv_layer": "relu3", "ood_threshold": 3.0}
    (tmp_path / SERVING_FILE).write_text(json.dumps(serving))
    if drift is not None:
        (tmp_path / DRIFT_FILE).write_text(drift)
    with pytest.raises(PipelineError) as caught:
        Classifier.from_bundle(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / DRIFT_FILE}: {said}") and "\n" not in str(caught.value)
    (tmp_path / SERVING_FILE).write_text(json.dumps({**serving, "ood_threshold": None}))  # no guard promised
    if drift is None or drift.startswith('{"f'):
        assert Classifier.from_bundle(tmp_path).ood_reference is None


def test_the_ood_histogram_keeps_a_finite_sum_after_a_blank_upload() -> None:
    """A constant image scores inf; the metric takes it capped, as the answer does, so the mean stays usable."""
    from pipeline.serving.classifier import OOD_CAP, ModelInfo, Prediction
    from pipeline.serving.service_metrics import ServiceMetrics

    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "c", "relu3", version="1")
    holder = SimpleNamespace(current=SimpleNamespace(info=info), reloads=0, last_error=None, loaded_at=0.0)
    metrics = ServiceMetrics(holder, drift_window=0)  # type: ignore[arg-type]
    blank = Prediction(0.4, None, {"NORMAL": 0.6, "PNEUMONIA": 0.4}, ood_score=float("inf"), refused="constant")
    metrics.observe_prediction("1", blank)
    text = metrics.render()[0].decode()
    total = next(line for line in text.splitlines() if line.startswith("pneumo_prediction_ood_score_sum"))
    assert float(total.split()[-1]) == OOD_CAP


@pytest.mark.parametrize(
    ("age", "warning"),
    [
        ("006M", "patient age 6 months"),
        ("010D", "patient age 10 days"),
        ("061M", "patient age 5.1 years"),
        ("012Y", "patient age 12 years"),
        ("012M", None),
        ("003Y", None),
        ("060M", None),
    ],
)
def test_age_outside_one_to_five_years_warns_without_contradiction(age: str, warning: str | None) -> None:
    warnings = image_io.intended_use_warnings(SimpleNamespace(PatientAge=age))
    expected = [f"{warning} is outside the training cohort (1-5 years)"] if warning else []
    assert warnings == expected


def test_a_port_in_use_is_one_line_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn alone exits 3 with a log line, after the model (maybe a registry download) has loaded."""
    import socket

    from pipeline.core.config import ServeParams
    from pipeline.core.errors import PipelineError
    from pipeline.serving import rest

    monkeypatch.setattr(rest, "ModelHolder", lambda *a, **k: pytest.fail("the model loaded before the bind"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            PipelineError, match=rf"^serve: cannot listen on 127\.0\.0\.1:{port} \(Address already in use\)"
        ):
            rest.serve("models:/m/1", ServeParams(host="127.0.0.1", port=port))
