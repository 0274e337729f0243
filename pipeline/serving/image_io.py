"""Reading images for prediction: JPEG, PNG and DICOM, checked before decoding, each failure one line.

JPEG and PNG are decoded once, by training's ``modeling.preprocess.decode_gray`` (a 16-bit PNG of 12-bit data
scaled by its sBIT or stretched, not cut to its high byte), and resized by the same
``modeling.preprocess.resize_square``; an EXIF orientation other than upright is then undone with numpy, so
an upright file gives exactly the training pixels. CMYK and YCCK JPEGs, which TensorFlow cannot decode, go
through Pillow to RGB and then to grey with TensorFlow's luma weights.

DICOM is read with its header checked before any pixel is decoded: pixel count and decoded size, one
frame and 8- or 16-bit samples (otherwise ``UnsupportedImage``), a decoder installed for its transfer syntax
(JPEG baseline and lossless, JPEG-LS, JPEG 2000 and RLE through the pydicom plugin packages; a plugin missing is
``DecoderMissing``, the server's fault), and a compressed frame's own dimensions equal to the header's, since
decoders allocate what the codestream claims. Sequence items are counted, in both byte orders, before pydicom
parses any. Element values over ``DEFER_SIZE`` (the pixel data, large private blobs) stay in the upload until
used. A deflated data set is inflated here, a chunk at a time, and refused past ``MAX_INFLATED_BYTES``: a small
upload cannot inflate to gigabytes. Grayscale pixels go through the file's own modality LUT or rescale and VOI
LUT or window, then min-max, MONOCHROME1 inverted, computed once per stored value as a lookup table; colour (RGB,
or YBR which pydicom hands back as RGB) goes to grey with TensorFlow's luma weights. DICOM header fields that put
an image outside the model's intended use (not a chest radiograph, not AP/PA, not aged one to five) do not stop
the prediction: they come back as warnings next to it, as does an unreadable EXIF block.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import tensorflow as tf
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pipeline.core.errors import DataError
from pipeline.modeling.preprocess import decode_gray, resize_square

SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
MAX_PIXELS = 50_000_000  # a larger header is a decompression bomb, not an X-ray
MAX_PIXEL_BYTES = 2 * MAX_PIXELS  # decoded DICOM pixel data: 16-bit grayscale at the pixel limit
MAX_INFLATED_BYTES = MAX_PIXEL_BYTES + 16 * 2**20  # a deflated DICOM data set: those pixels and 16 MiB of header
MAX_FILE_BYTES = MAX_INFLATED_BYTES  # no image within the pixel limit is a larger file (a multi-frame CT may be)
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian: a sequence item, or a fragment of encapsulated pixels
ITEM_TAG_BIG_ENDIAN = b"\xff\xfe\xe0\x00"  # the same tag in Explicit VR Big Endian, which pydicom still reads
MAX_SEQUENCE_ITEMS = 10_000  # a radiograph's header holds tens; its pixels a few fragments
INFLATE_CHUNK = 2**20
DEFER_SIZE = 64 * 1024  # DICOM element values over this are read from the upload only when used
MIN_SIDE = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RADIOGRAPHY = {"CR", "DX", "DR", "RG"}
MIN_AGE_YEARS, MAX_AGE_YEARS = 1, 5  # the Kermany cohort: children aged one to five
LUMA = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)  # TensorFlow's rgb_to_grayscale weights
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}  # pydicom decodes all of these to RGB
JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # frame headers: JPEG SOF0-15, JPEG-LS SOF55
J2K_SIZ = b"\xff\x4f\xff\x51"  # JPEG 2000: SOC then SIZ
EXIF_ORIENTATION = 0x0112
UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {  # EXIF orientation -> the (H, W, C) transform undoing it
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


class ImageError(DataError):
    """An input that cannot be turned into a model input; the message is the reason."""


class UnsupportedImage(ImageError):
    """Not an image format the model takes (HTTP 415)."""


class ImageTooLarge(ImageError):
    """More pixels than any X-ray has (HTTP 413)."""


class DecoderMissing(ImageError):
    """A supported encoding whose decoder plugin is not installed on this server: the server's fault (HTTP 501)."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (H, W, 1) uint8 grayscale at the original size, upright
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


def _reason(exc: BaseException, limit: int = 100) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


@contextmanager
def _parsing(kind: str) -> Iterator[None]:
    """Any parser failure other than our own becomes one line: corrupt KIND (reason)."""
    try:
        yield
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers raise many types for corrupt input
        raise ImageError(f"corrupt {kind} ({_reason(exc)})") from None


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {MAX_PIXELS:,}")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{width}x{height} pixels is too small for an X-ray (min side {MIN_SIDE})")


def _luma(rgb: np.ndarray, full_scale: float = 255.0) -> np.ndarray:
    """(H, W, 3) RGB with values up to `full_scale` -> (H, W, 1) uint8, one float32 plane at a time."""
    grey = np.zeros(rgb.shape[:2], dtype=np.float32)
    for channel, weight in zip(np.moveaxis(rgb, -1, 0), LUMA * np.float32(255.0 / full_scale), strict=True):
        grey += channel * weight
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]


def _orientation(img: Image.Image) -> tuple[int, list[str]]:
    """The EXIF orientation (1 = upright) from the header; a PNG's eXIf after the pixels is not seen."""
    exif = img.info.get("exif")
    if not exif:
        return 1, []
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        orientation = int(parsed.get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unreadable
        return 1, ["unreadable EXIF block: the image is predicted as stored, orientation not applied"]
    return (orientation if orientation in UPRIGHT else 1), []


def _tf_decode(data: bytes, kind: str) -> np.ndarray:
    try:  # the training decoder; a truncated or corrupt body fails here, not silently as grey pixels
        return decode_gray(data).numpy()
    except tf.errors.InvalidArgumentError as exc:
        reason = str(exc.message).split("}} ")[-1].splitlines()[0][:100]
        raise ImageError(f"corrupt {kind.upper()} ({reason})") from None


STRIP_PIXELS = 1 << 20  # CMYK is turned grey a strip of rows at a time: its temporaries stay this small


def _pillow_decode(data: bytes, kind: str) -> np.ndarray:
    """CMYK (and YCCK, which Pillow also reads as CMYK) -> RGB -> grey with TensorFlow's weights, a strip of
    rows at a time: the float planes of the whole image would take about 20 bytes a pixel."""
    with _parsing(kind.upper()), Image.open(io.BytesIO(data)) as img:
        img.load()
        width, height = img.size
        grey = np.empty((height, width, 1), np.uint8)
        rows = max(1, STRIP_PIXELS // max(width, 1))
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            grey[top:bottom] = _luma(np.asarray(img.crop((0, top, width, bottom)).convert("RGB")))
        return grey


def _raster(data: bytes, kind: str) -> LoadedImage:
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: cheap, and catches bombs before decoding
            (width, height), mode = img.size, img.mode
            orientation, warnings = _orientation(img)
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the {kind.upper()} header claims more pixels than the limit of {MAX_PIXELS:,}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageError(f"corrupt {kind.upper()} ({_reason(exc)})") from None
    _check_size(width, height)
    pixels = _pillow_decode(data, kind) if mode == "CMYK" else _tf_decode(data, kind)
    if orientation in UPRIGHT:
        pixels = np.ascontiguousarray(UPRIGHT[orientation](pixels))
    return LoadedImage(pixels, kind, pixels.shape[1], pixels.shape[0], warnings)


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
    if age is not None and not MIN_AGE_YEARS <= age <= MAX_AGE_YEARS:
        cohort = f"{MIN_AGE_YEARS}-{MAX_AGE_YEARS} years"
        warnings.append(f"patient age {_age_text(age)} is outside the training cohort ({cohort})")
    return warnings


def _age_text(years: float) -> str:
    """Days below a month, months below two years (11 months, not 1 year), else years to one decimal (5.1, 45)."""
    if years < 1 / 12:
        return f"{years * 365.25:.0f} days"
    return f"{years * 12:.0f} months" if years < 2 else f"{round(years, 1):g} years"


def _monochrome(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Stored values -> uint8 via a lookup table over every value the dtype holds: the same arithmetic as
    mapping each pixel (modality LUT, VOI, min-max over the values present), without float copies of the image."""
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        raise ImageError(f"DICOM pixels decoded as {arr.dtype} {arr.shape} are not one grayscale plane")
    codes = arr.view(f"u{arr.dtype.itemsize}")  # the bit pattern: an index for signed values too
    present = np.zeros(2 ** (8 * arr.dtype.itemsize), dtype=bool)
    present[codes] = True
    values = apply_modality_lut(np.arange(present.size, dtype=codes.dtype).view(arr.dtype), ds)  # float if rescaled
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    values = values.astype(np.float64)
    lo, hi = float(values[present].min()), float(values[present].max())
    scaled = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo) * 255.0
    if photometric == "MONOCHROME1":  # high values are dark
        scaled = 255.0 - scaled
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)[codes][..., None]


def dicom_to_uint8(ds: Dataset) -> np.ndarray:
    """Stored DICOM pixels -> (H, W, 1) uint8: modality LUT, VOI window (or min-max), MONOCHROME1 inverted;
    colour (RGB, or YBR which pydicom converts to RGB) to grey with TensorFlow's weights."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in COLOUR and not photometric.startswith("MONOCHROME"):
        raise UnsupportedImage(f"DICOM photometric interpretation {photometric} is not supported")
    arr = ds.pixel_array
    if photometric not in COLOUR:
        return _monochrome(arr, ds, photometric)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"DICOM {photometric} pixels decoded as {arr.shape}, not three samples per pixel")
    return _luma(arr, full_scale=2 ** int(ds.get("BitsStored", 8)) - 1)


def _inflate(deflated: memoryview, limit: int = MAX_INFLATED_BYTES) -> io.BytesIO:
    """Raw deflate -> a buffer, fed and drained a chunk at a time, refused once past `limit` bytes."""
    inflater, out = zlib.decompressobj(-zlib.MAX_WBITS), io.BytesIO()

    def drain(pending: bytes | memoryview) -> None:
        while not inflater.eof:
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
            out.write(chunk)
            if out.tell() > limit:
                raise ImageTooLarge(f"deflated DICOM inflates past the limit of {limit:,} bytes")
            pending = inflater.unconsumed_tail
            if not pending and not chunk:
                return

    for start in range(0, len(deflated), INFLATE_CHUNK):
        drain(deflated[start : start + INFLATE_CHUNK])
    drain(b"")  # what zlib still holds once the input has run out
    if not inflater.eof:
        raise ImageError("corrupt DICOM (the deflated data set is truncated)")
    out.seek(0)
    return out


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def _file_meta(buffer: io.BytesIO) -> FileMetaDataset:
    """The file meta group read as pydicom's dcmread reads it (explicit VR, or implicit where the first element
    does not parse), so both agree on whether the data set is deflated; `buffer` is left after the group."""
    start = buffer.tell()
    meta = FileMetaDataset(read_dataset(buffer, False, True, stop_when=_past_file_meta))
    try:
        _ = [meta[tag] for tag in list(meta.keys())[:1]]
    except NotImplementedError:
        buffer.seek(start)
        meta = FileMetaDataset(read_dataset(buffer, True, True, stop_when=_past_file_meta))
    return meta


def _count(buffer: bytes | memoryview, pattern: bytes, chunk: int = 1 << 24) -> int:
    """Occurrences of `pattern` in `buffer`, read a chunk at a time (no copy of the whole)."""
    if isinstance(buffer, bytes):
        return buffer.count(pattern)
    overlap = len(pattern) - 1  # a match starting in a chunk ends at most this far past it
    return sum(bytes(buffer[i : i + chunk + overlap]).count(pattern) for i in range(0, len(buffer), chunk))


def _check_items(buffer: bytes | memoryview) -> None:
    """Refuse a data set with more sequence items than any radiograph's header holds before pydicom builds them
    (each is a Python object: a few MB of items, or a few KB deflated, took gigabytes and half a minute)."""
    items = _count(buffer, ITEM_TAG) + _count(buffer, ITEM_TAG_BIG_ENDIAN)
    if items > MAX_SEQUENCE_ITEMS:
        raise ImageTooLarge(f"DICOM with {items:,} sequence items is over the limit of {MAX_SEQUENCE_ITEMS:,}")


def _read_dicom(data: bytes) -> FileDataset:
    """The data set with values over DEFER_SIZE left unread; a deflated one inflated here, under a cap."""
    with _parsing("DICOM"):
        buffer = io.BytesIO(data)
        buffer.seek(132)  # the preamble and "DICM", checked by sniff
        meta = _file_meta(buffer)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            _check_items(data)
            buffer.seek(0)
            return pydicom.dcmread(buffer, defer_size=DEFER_SIZE)
        body = _inflate(memoryview(data)[buffer.tell() :])
        with body.getbuffer() as inflated:
            _check_items(inflated)
        dataset = read_dataset(body, False, True, defer_size=DEFER_SIZE)
        return FileDataset(body, dataset, data[:128], meta, is_implicit_VR=False, is_little_endian=True)


def _check_dicom_header(ds: Dataset) -> tuple[int, int]:
    """(width, height) once the header promises one decodable frame within the limits."""
    if "PixelData" not in ds:
        raise ImageError("DICOM has no pixel data")
    with _parsing("DICOM header"):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        width, height = int(ds.get("Columns", 0)), int(ds.get("Rows", 0))
        bits, samples = int(ds.get("BitsAllocated", 0)), int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        raise UnsupportedImage(f"multi-frame DICOM ({frames} frames) is not a radiograph")
    _check_size(width, height)
    if bits not in (8, 16):
        raise UnsupportedImage(f"DICOM with {bits}-bit pixels is not supported (8 or 16)")
    decoded = width * height * frames * samples * bits // 8
    if decoded > MAX_PIXEL_BYTES:
        raise ImageTooLarge(
            f"{width}x{height} DICOM of {samples}x{bits}-bit samples decodes to {decoded:,} bytes, "
            f"over the limit of {MAX_PIXEL_BYTES:,}"
        )
    return width, height


def _check_decoder(ds: FileDataset) -> str:
    """The transfer syntax's name, once a decoder for it is installed."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:  # pydicom guesses the encoding
        return "unknown"
    if not isinstance(syntax, UID):  # several values (a stray backslash), or not text: nothing to look up
        raise ImageError("corrupt DICOM header (the transfer syntax is not a single UID)")
    with _parsing("DICOM header"):
        name = syntax.name
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedImage(f"no decoder for DICOM transfer syntax {name}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise DecoderMissing(f"no decoder installed for DICOM transfer syntax {name} (one of: {needs})")
    return name


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG, JPEG-LS or JPEG 2000 codestream's own header; None for anything else."""
    if frame[:2] != b"\xff\xd8":
        siz = frame.find(J2K_SIZ, 0, 4096)  # at 0 in a bare codestream, later inside a JP2 wrapper
        if siz < 0:
            return None
        xsiz, ysiz, x_offset, y_offset = struct.unpack_from(">4I", frame, siz + 8)
        return xsiz - x_offset, ysiz - y_offset
    pos = 2
    while pos + 9 <= len(frame) and frame[pos] == 0xFF:  # JPEG marker segments up to the frame header
        marker, length = frame[pos + 1], struct.unpack_from(">H", frame, pos + 2)[0]
        if marker in JPEG_SOF:
            height, width = struct.unpack_from(">HH", frame, pos + 5)
            return width, height
        pos += 1 if marker == 0xFF else 2 + length  # 0xFF: a fill byte
    return None


def _check_codestream(ds: FileDataset, width: int, height: int) -> None:
    """Decoders allocate what the codestream claims, not what the DICOM header says: they must agree."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated:
        return
    size = _codestream_size(b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1))))
    if size is None or size == (width, height):
        return
    message = f"the {syntax.name} codestream is {size[0]}x{size[1]} but the DICOM header says {width}x{height}"
    raise (ImageTooLarge if size[0] * size[1] > width * height else ImageError)(message)


def _dicom(data: bytes) -> LoadedImage:
    ds = _read_dicom(data)
    width, height = _check_dicom_header(ds)
    syntax = _check_decoder(ds)
    try:
        _check_codestream(ds, width, height)
        pixels = dicom_to_uint8(ds)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt codestreams, bad lengths, ...
        raise ImageError(f"cannot decode DICOM pixels (transfer syntax {syntax}): {_reason(exc, 120)}") from None
    return LoadedImage(pixels, "dicom", width, height, intended_use_warnings(ds))


def read_file(path: str | Path) -> bytes:
    """A file's bytes, refused (ImageTooLarge) before reading when it is larger than any image we take."""
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageTooLarge(f"a file of {size:,} bytes is over the limit of {MAX_FILE_BYTES:,}")
    return Path(path).read_bytes()


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
