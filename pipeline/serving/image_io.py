"""Reading images for prediction: JPEG, PNG and DICOM, checked before decoding, each failure one line.

JPEG and PNG are decoded once, by the TensorFlow decoder training used, and resized by the same
``modeling.preprocess.resize_square``. DICOM pixels (8- or 16-bit, MONOCHROME1/2 or RGB) are windowed to
8-bit grayscale with the file's own modality and VOI LUTs, then resized the same way. DICOM header fields that put an
image outside the model's intended use (not a chest radiograph, not AP/PA, not a young child) do
not stop the prediction: they come back as warnings next to it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
import pydicom
import tensorflow as tf
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

from pipeline.core.errors import DataError
from pipeline.modeling.preprocess import resize_square

SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
MAX_PIXELS = 50_000_000  # a larger header is a decompression bomb, not an X-ray
MIN_SIDE = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RADIOGRAPHY = {"CR", "DX", "DR", "RG"}
MAX_AGE_YEARS = 5  # the Kermany cohort: children aged one to five


class ImageError(DataError):
    """An input that cannot be turned into a model input; the message is the reason."""


class UnsupportedImage(ImageError):
    """Not an image format the model takes (HTTP 415)."""


class ImageTooLarge(ImageError):
    """More pixels than any X-ray has (HTTP 413)."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (H, W, 1) uint8 grayscale at the original size
    kind: str  # jpeg | png | dicom
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)


def sniff(data: bytes) -> str:
    if len(data) == 0:
        raise UnsupportedImage("empty file")
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == PNG_MAGIC:
        return "png"
    if data[128:132] == b"DICM":
        return "dicom"
    raise UnsupportedImage("not a JPEG, PNG or DICOM image")


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {MAX_PIXELS:,}")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{width}x{height} pixels is too small for an X-ray (min side {MIN_SIDE})")


def _raster(data: bytes, kind: str) -> LoadedImage:
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: cheap, and catches bombs before decoding
            width, height = img.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the {kind.upper()} header claims more pixels than the limit of {MAX_PIXELS:,}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageError(f"corrupt {kind.upper()} ({str(exc).splitlines()[0][:100] or type(exc).__name__})") from None
    _check_size(width, height)
    try:  # the training decoder; a truncated or corrupt body fails here, not silently as grey pixels
        pixels = tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8).numpy()
    except tf.errors.InvalidArgumentError as exc:
        reason = str(exc.message).split("}} ")[-1].splitlines()[0][:100]
        raise ImageError(f"corrupt {kind.upper()} ({reason})") from None
    return LoadedImage(pixels, kind, width, height)


def _age_years(text: str) -> float | None:
    match = re.fullmatch(r"(\d{3})([DWMY])", text.strip())
    if not match:
        return None
    return int(match.group(1)) / {"D": 365.25, "W": 52.18, "M": 12, "Y": 1}[match.group(2)]


def intended_use_warnings(ds: object) -> list[str]:
    """What in a DICOM header puts the image outside pediatric AP/PA chest radiography."""
    warnings = []
    modality = str(getattr(ds, "Modality", "") or "")
    if modality and modality.upper() not in RADIOGRAPHY:
        warnings.append(f"modality {modality} is not radiography (CR/DX)")
    body = str(getattr(ds, "BodyPartExamined", "") or "")
    if body and body.upper() != "CHEST":
        warnings.append(f"body part {body} is not CHEST")
    view = str(getattr(ds, "ViewPosition", "") or "")
    if view and view.upper() not in {"AP", "PA"}:
        warnings.append(f"view position {view} is not AP/PA")
    age = _age_years(str(getattr(ds, "PatientAge", "") or ""))
    if age is not None and age > MAX_AGE_YEARS:
        warnings.append(f"patient age {age:.0f} years is outside the training cohort (1-{MAX_AGE_YEARS} years)")
    return warnings


def dicom_to_uint8(ds: object) -> np.ndarray:
    """Stored DICOM pixels -> (H, W, 1) uint8: modality LUT, VOI window (or min-max), MONOCHROME1 inverted."""
    arr = ds.pixel_array  # type: ignore[attr-defined]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in {"RGB", "YBR_FULL", "YBR_FULL_422"}:
        if photometric != "RGB":
            arr = convert_color_space(arr, photometric, "RGB")
        gray = arr.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])  # TensorFlow's rgb_to_grayscale
        return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
    if not photometric.startswith("MONOCHROME"):
        raise ImageError(f"DICOM photometric interpretation {photometric} is not supported")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    windowed = "WindowCenter" in ds or "VOILUTSequence" in ds  # type: ignore[operator]
    if windowed:
        values = apply_voi_lut(values, ds).astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo) * 255.0
    if photometric == "MONOCHROME1":  # high values are dark
        scaled = 255.0 - scaled
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)[..., None]


def _dicom(data: bytes) -> LoadedImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"corrupt DICOM ({str(exc).splitlines()[0][:100] or type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageError("DICOM has no pixel data")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ImageError(f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not a radiograph")
    width, height = int(ds.get("Columns", 0)), int(ds.get("Rows", 0))
    _check_size(width, height)
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16):
        raise ImageError(f"DICOM with {bits}-bit pixels is not supported (8 or 16)")
    try:
        pixels = dicom_to_uint8(ds)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing decoder plugins, bad lengths, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"cannot decode DICOM pixels (transfer syntax {name}): {reason}") from None
    return LoadedImage(pixels, "dicom", width, height, intended_use_warnings(ds))


def load(data: bytes) -> LoadedImage:
    """Check and decode one encoded image; raises ImageError with the reason."""
    kind = sniff(data)
    return _dicom(data) if kind == "dicom" else _raster(data, kind)


def model_input(image: LoadedImage, image_size: int) -> np.ndarray:
    """(size, size, 1) float32 in [0, 255], exactly as training fed the model."""
    return resize_square(tf.constant(image.pixels), image_size).numpy()


def display_pixels(image: LoadedImage, max_side: int = 768) -> np.ndarray:
    """(H, W) uint8 grayscale for overlays, at most `max_side` on the longer side."""
    pil = Image.fromarray(image.pixels[..., 0])
    pil.thumbnail((max_side, max_side))
    return np.asarray(pil, dtype=np.uint8)
