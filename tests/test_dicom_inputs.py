"""DICOM as PACS send it: compressed transfer syntaxes, windowing, colour, and uploads built to exhaust memory.

Every file is written here (tests/images.py), from a synthetic X-ray, so nothing needs the real data.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pipeline.data.synthetic import SyntheticImage, render
from pipeline.serving import image_io
from tests.images import (
    colour_dicom,
    compressed_dicom,
    deflated_dicom,
    dicom_bytes,
    dicom_with_private_zeros,
    full_range,
    png_bytes,
    with_header,
    with_implicit_file_meta,
)

REPO = Path(__file__).resolve().parents[1]
LUMA64 = image_io.LUMA.astype(np.float64)
BOMB_ZEROS = 2**30  # 1 GiB of a private element: about 1 MB once deflated
BOMB_PEAK_GROWTH = image_io.MAX_INFLATED_BYTES + 64 * 2**20  # where inflating stops (~111 MiB), and slack
BOMB_PEAK = 512 * 2**20  # the whole process: Python, numpy, pydicom, Pillow, the upload and the above


@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    """A synthetic chest X-ray, 256 x 192 (not square, so a transposition shows), spanning 0..255."""
    item = SyntheticImage("test", "PNEUMONIA", "bacteria", "person1_bacteria_1.jpeg", patient=1, seed=7)
    return full_range(render(item, 256)[:, 32:224])


def grey(data: bytes) -> np.ndarray:
    image = image_io.load(data)
    assert image.kind == "dicom" and image.pixels.dtype == np.uint8
    return image.pixels[..., 0].astype(int)


@pytest.mark.parametrize(
    ("syntax", "bits", "options", "max_error"),
    [
        (JPEGLosslessSV1, 8, {}, 0),
        (JPEGLosslessSV1, 16, {}, 0),
        (JPEGLossless, 16, {"predictor": 7}, 0),
        (JPEGLossless, 8, {"predictor": 4}, 0),
        (JPEGLSLossless, 8, {}, 0),
        (JPEGLSLossless, 16, {}, 0),
        (JPEG2000Lossless, 8, {}, 0),
        (JPEG2000Lossless, 16, {}, 0),
        (RLELossless, 8, {}, 0),
        (RLELossless, 16, {}, 0),
        (JPEGLSNearLossless, 8, {"jls_error": 2}, 2),  # JPEG-LS bounds each sample's error
        (JPEGLSNearLossless, 16, {"jls_error": 255}, 2),  # one grey level (x257), plus the min-max
        (JPEGBaseline8Bit, 8, {"quality": 95}, 10),
        (JPEG2000, 8, {"j2k_psnr": [45]}, 10),
        (JPEG2000, 16, {"j2k_psnr": [60]}, 10),
    ],
    ids=lambda v: getattr(v, "keyword", None),
)
def test_compressed_dicom_decodes_to_the_uncompressed_pixels(
    xray: np.ndarray, syntax: str, bits: int, options: dict, max_error: int
) -> None:
    """Exactly for lossless syntaxes; within the codec's error, and close as a model input, for lossy ones."""
    data = compressed_dicom(xray, syntax, bits=bits, **options)
    error = np.abs(grey(data) - grey(dicom_bytes(xray, bits=bits)))
    assert error.max() <= max_error and error.mean() <= (1.5 if max_error else 0.0), (error.max(), error.mean())
    model, plain = (image_io.model_input(image_io.load(d), 64) for d in (data, png_bytes(xray)))
    np.testing.assert_allclose(model, plain, atol=2.5 if max_error else 1.01)


@pytest.mark.parametrize(
    ("syntax", "photometric", "options", "max_error"),
    [
        (ExplicitVRLittleEndian, "RGB", {}, 1),
        (ExplicitVRLittleEndian, "YBR_FULL", {}, 1),
        (RLELossless, "RGB", {}, 1),
        (JPEG2000Lossless, "YBR_RCT", {}, 1),
        (JPEG2000, "YBR_ICT", {"j2k_psnr": [50]}, 8),
        (JPEGBaseline8Bit, "YBR_FULL_422", {}, 10),
    ],
    ids=lambda v: getattr(v, "keyword", None),
)
def test_colour_dicom_is_converted_to_rgb_once(
    xray: np.ndarray, syntax: str, photometric: str, options: dict, max_error: int
) -> None:
    """pydicom hands YBR back as RGB; converting it again (as before) put JPEG colour DICOM 32 grey levels off."""
    rgb = np.stack([xray, (xray * 0.8).astype(np.uint8), (xray * 0.5).astype(np.uint8)], axis=-1)
    error = np.abs(grey(colour_dicom(rgb, syntax, photometric, **options)) - np.round(rgb @ LUMA64))
    assert error.max() <= max_error and error.mean() < 1.5, (error.max(), error.mean())


def linear_window(stored: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto 0..255, by hand."""
    return np.round(np.clip((stored - (centre - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)


@pytest.mark.parametrize(
    ("slope", "intercept"), [(1.0, 0.0), (0.5, -1024.0), (2.0, 100.0)], ids=["no-rescale", "slope-0.5", "slope-2"]
)
def test_window_is_applied_in_rescaled_units(xray: np.ndarray, slope: float, intercept: float) -> None:
    """A window narrower than the data saturates both ends; its centre and width are in rescaled (modality) units."""
    stored = xray.astype(np.float64) * 257
    centre, width = 30_000.0, 20_000.0  # in stored units: the darkest and brightest pixels saturate
    expected = linear_window(stored, centre, width)
    assert (expected == 0).mean() > 0.05 and (expected == 255).mean() > 0.05
    data = dicom_bytes(
        xray,
        window=(centre * slope + intercept, width * slope),
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        RescaleType="US",
    )
    windowed = grey(data)
    assert np.abs(windowed - expected).max() <= 1
    assert np.abs(windowed - xray).mean() > 10  # the window changed the picture


def test_rescale_ignored_would_misplace_the_window(xray: np.ndarray) -> None:
    """The same window without the slope it was written for selects a different range: slope is not ignored."""
    with_slope = grey(dicom_bytes(xray, window=(14_000.0, 10_000.0), RescaleSlope=0.5, RescaleIntercept=-1024.0))
    without = grey(dicom_bytes(xray, window=(14_000.0, 10_000.0)))
    assert np.abs(with_slope - without).mean() > 20


def test_monochrome1_is_the_inverse_of_monochrome2(xray: np.ndarray) -> None:
    """The same stored values and window: MONOCHROME1 shows high values dark."""
    window = (30_000.0, 20_000.0)
    mono2 = grey(dicom_bytes(xray, window=window))
    mono1 = grey(dicom_bytes(255 - xray, photometric="MONOCHROME1", window=window))  # stores `xray` again
    np.testing.assert_array_equal(mono1, 255 - mono2)


@pytest.mark.parametrize("bits", [8, 16], ids=["8-bit-US", "16-bit-OW-deferred"])
def test_voi_lut_sequence_is_applied(xray: np.ndarray, bits: int) -> None:
    """A VOI LUT (a gamma curve) is used instead of a straight stretch; the 16-bit one (128 KiB, over
    DEFER_SIZE) is read from the upload only when applied, from inside its sequence item."""
    entries = 2**bits
    lut = np.round((np.arange(entries) / (entries - 1)) ** 0.5 * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries % 65536, 0, 16]  # 0 entries means 65536
    if bits == 8:
        item.LUTData = lut.tolist()
        item["LUTData"].VR = "US"
    else:
        item.LUTData = lut.astype("<u2").tobytes()
        item["LUTData"].VR = "OW"
    assert len(lut.tobytes()) > image_io.DEFER_SIZE or bits == 8
    data = dicom_bytes(xray, bits=bits, VOILUTSequence=Sequence([item]))
    mapped = lut[xray.astype(np.int64) * (257 if bits == 16 else 1)].astype(np.float64)
    expected = np.round((mapped - mapped.min()) / (mapped.max() - mapped.min()) * 255)
    assert np.abs(grey(data) - expected).max() <= 1
    assert np.abs(grey(data) - xray).mean() > 10


def test_signed_pixels_with_rescale(xray: np.ndarray) -> None:
    """Signed 16-bit stored values (CT-like, PixelRepresentation 1) map by value, not by bit pattern."""
    signed = (xray.astype(np.int32) * 100 - 12_000).astype(np.int16)
    data = dicom_bytes(xray, RescaleSlope=1.0, RescaleIntercept=-1024.0)
    ds = dcmread(io.BytesIO(data))
    ds.PixelRepresentation, ds.PixelData = 1, signed.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert np.abs(grey(buffer.getvalue()) - xray).max() <= 1


def lying(side: int, syntax: str, bits: int = 8) -> bytes:
    """A black `side` x `side` codestream under a header that says 192 x 256 (a few KB that decoders would
    allocate at the codestream's size)."""
    return with_header(compressed_dicom(np.zeros((side, side), np.uint8), syntax, bits=bits), Rows=256, Columns=192)


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [
        pytest.param(
            lambda a: dicom_bytes(a, frames=2),
            image_io.UnsupportedImage,
            "multi-frame DICOM (2 frames) is not a radiograph",
            id="multi-frame",
        ),
        pytest.param(
            lambda a: dicom_bytes(a, bits=8, photometric="RGB", Rows=6000, Columns=6000, pixel_data=b"\0\0"),
            image_io.ImageTooLarge,
            "6000x6000 DICOM of 3x8-bit samples decodes to 108,000,000 bytes, over the limit of 100,000,000",
            id="decoded-bytes",
        ),
        pytest.param(
            lambda a: dicom_bytes(a, Rows=10_000, Columns=10_000, pixel_data=b"\0\0"),
            image_io.ImageTooLarge,
            "10000x10000 pixels is over the limit",
            id="pixels",
        ),
        pytest.param(
            lambda a: dicom_bytes(a, transfer_syntax=MPEG2MPML, pixel_data=b"\xfe\xff\x00\xe0" + bytes(4)),
            image_io.UnsupportedImage,
            "no decoder for DICOM transfer syntax MPEG2 Main Profile / Main Level",
            id="no-decoder",
        ),
        pytest.param(
            lambda a: lying(2000, JPEGLSLossless),
            image_io.ImageTooLarge,
            "the JPEG-LS Lossless Image Compression codestream is 2000x2000 but the DICOM header says 192x256",
            id="jpeg-ls-codestream-larger",
        ),
        pytest.param(
            lambda a: lying(600, JPEG2000Lossless),
            image_io.ImageTooLarge,
            "codestream is 600x600 but the DICOM header says 192x256",
            id="jpeg-2000-codestream-larger",
        ),
        pytest.param(
            lambda a: lying(500, JPEGLosslessSV1, bits=16),
            image_io.ImageTooLarge,
            "codestream is 500x500 but the DICOM header says 192x256",
            id="jpeg-lossless-codestream-larger",
        ),
        pytest.param(
            lambda a: with_header(compressed_dicom(a, JPEGBaseline8Bit, bits=8), Rows=512, Columns=384),
            image_io.ImageError,
            "the JPEG Baseline (Process 1) codestream is 192x256 but the DICOM header says 384x512",
            id="jpeg-codestream-smaller",
        ),
        pytest.param(
            lambda a: deflated_dicom(a)[:-100],
            image_io.ImageError,
            "corrupt DICOM (the deflated data set is truncated)",
            id="truncated-deflate",
        ),
        pytest.param(
            lambda a: deflated_dicom(a)[:400] + b"\xff" * 64,
            image_io.ImageError,
            "corrupt DICOM (Error -3 while decompressing data",
            id="bad-deflate",
        ),
    ],
)
def test_dicom_refused_from_the_header_with_one_line(xray: np.ndarray, make, error: type, reason: str) -> None:
    with pytest.raises(error, match=re.escape(reason)) as caught:
        image_io.load(make(xray))
    assert "\n" not in str(caught.value)


def test_missing_decoder_plugin_names_the_transfer_syntax(xray: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG 2000 DICOM on a server without pylibjpeg-openjpeg (or Pillow's OpenJPEG): one line, before decoding."""
    data = compressed_dicom(xray, JPEG2000Lossless)
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("numpy", "pylibjpeg", "pylibjpeg-openjpeg")})
    with pytest.raises(image_io.DecoderMissing) as caught:  # the server's fault (501), not the upload's
        image_io.load(data)
    message = str(caught.value)
    assert message.startswith("no decoder installed for DICOM transfer syntax JPEG 2000 Image Compression (Lossless")
    assert "pylibjpeg-openjpeg" in message and "\n" not in message


def test_deflated_dicom_reads_like_the_plain_one(xray: np.ndarray) -> None:
    np.testing.assert_array_equal(grey(deflated_dicom(xray)), grey(dicom_bytes(xray)))
    np.testing.assert_array_equal(grey(deflated_dicom(xray, private_zeros=5 * 2**20 + 6)), grey(dicom_bytes(xray)))


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")
def test_deflate_cap_holds_when_the_file_meta_is_implicit_vr(xray: np.ndarray) -> None:
    """pydicom also reads a file meta group wrongly written in implicit VR; so must the deflate check,
    or such a bomb would reach pydicom's own, uncapped inflation."""
    bomb = with_implicit_file_meta(deflated_dicom(xray, private_zeros=256 * 2**20))
    with pytest.raises(image_io.ImageTooLarge, match="deflated DICOM inflates past"):
        image_io.load(bomb)
    np.testing.assert_array_equal(grey(with_implicit_file_meta(deflated_dicom(xray))), grey(dicom_bytes(xray)))


def test_large_private_element_is_not_read(xray: np.ndarray) -> None:
    """A plain DICOM with 64 MiB of private data: the element stays in the upload (deferred), never copied."""
    data = dicom_with_private_zeros(xray, 64 * 2**20)
    tracemalloc.start()
    try:
        image = image_io.load(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(image.pixels[..., 0], grey(dicom_bytes(xray)))
    assert peak < 8 * 2**20, f"loading allocated {peak / 2**20:.0f} MiB"


MEASURE = """
import json, sys, types

class NoTensorFlow(types.ModuleType):  # reading DICOM never touches TensorFlow; importing it takes 5-15 s
    def __getattr__(self, name):
        raise AssertionError(f"tensorflow.{name} used while reading a DICOM")

sys.modules["tensorflow"] = NoTensorFlow("tensorflow")
from pipeline.serving import image_io

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

data = open(sys.argv[1], "rb").read()
before = status("VmRSS:")
try:
    image_io.load(data)
    error = None
except image_io.ImageError as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"error": error, "rss_before": before, "peak": status("VmHWM:")}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc (Linux)")
def test_deflate_bomb_is_refused_within_bounded_memory(xray: np.ndarray, tmp_path: Path) -> None:
    """About 1 MB that inflates to over 1 GiB (the 3.8 GB incident): refused at the cap, in its own process."""
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflated_dicom(xray, private_zeros=BOMB_ZEROS))
    assert bomb.stat().st_size < 2 * 2**20
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(bomb)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    limit = f"{image_io.MAX_INFLATED_BYTES:,}"
    assert result["error"] == f"ImageTooLarge: deflated DICOM inflates past the limit of {limit} bytes"
    growth = result["peak"] - result["rss_before"]
    mib = {key: round(value / 2**20) for key, value in result.items() if key != "error"}
    print(f"bomb {bomb.stat().st_size:,} bytes: peak RSS {mib['peak']} MiB, {mib['rss_before']} MiB before loading")
    assert growth < BOMB_PEAK_GROWTH and result["peak"] < BOMB_PEAK, mib


@pytest.mark.parametrize("deflated", [False, True], ids=["plain", "deflated"])
def test_a_header_of_countless_sequence_items_is_refused_before_it_is_parsed(
    xray: np.ndarray, deflated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each item becomes a Python object: millions of empty items (a few MB, a few KB deflated) took gigabytes
    and half a minute. Over the limit the file is refused from a byte count, before pydicom builds one."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    items = image_io.MAX_SEQUENCE_ITEMS + 1
    syntax = DeflatedExplicitVRLittleEndian if deflated else None
    bomb = dicom_bytes(
        xray, transfer_syntax=syntax, ReferencedImageSequence=Sequence([Dataset() for _ in range(items)])
    )
    parsed: list[object] = []
    read_dataset = image_io.read_dataset

    def data_set_read(*args: object, **kwargs: object) -> object:  # the file meta (stop_when) is read as ever
        if "stop_when" not in kwargs:
            parsed.append(args)
        return read_dataset(*args, **kwargs)

    monkeypatch.setattr(image_io.pydicom, "dcmread", lambda *a, **k: parsed.append(a))
    monkeypatch.setattr(image_io, "read_dataset", data_set_read)
    with pytest.raises(image_io.ImageTooLarge, match=rf"^DICOM with {items:,} sequence items is over the limit of"):
        image_io.load(bomb)
    assert not parsed
    monkeypatch.undo()
    fine = dicom_bytes(xray, transfer_syntax=syntax, ReferencedImageSequence=Sequence([Dataset() for _ in range(50)]))
    assert image_io.load(fine).pixels.shape[:2] == xray.shape  # a header with a few items reads as ever


def test_items_are_counted_across_chunk_edges() -> None:
    data = bytes(5) + image_io.ITEM_TAG + bytes(3) + image_io.ITEM_TAG * 2
    for chunk in (1, 2, 3, 4, 5, 7, 64):
        assert image_io._count(memoryview(data), image_io.ITEM_TAG, chunk) == 3 == data.count(image_io.ITEM_TAG)
