"""Image files made for tests: DICOM in and out of spec, and broken files of every kind."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def stretched(path: Path, size: int | None = None) -> np.ndarray:
    """A real X-ray as (H, W) uint8 spanning 0..255, so every DICOM encoding of it decodes back exactly."""
    img = Image.open(path).convert("L")
    if size:
        img = img.resize((size, size))
    arr = np.asarray(img, dtype=np.float64)
    return np.round((arr - arr.min()) / (arr.max() - arr.min()) * 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(
    arr: np.ndarray,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    window: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
    pixel_data: bytes | None = None,
    omit_pixels: bool = False,
    **header: str,
) -> bytes:
    """A DICOM file of `arr` (H, W) uint8, stored as `bits`-bit pixels (x257 for 16-bit)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "DX", "CHEST", "AP", "003Y"
    for key, value in header.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = arr.shape
    if photometric == "RGB":
        pixels = np.repeat(arr[..., None], 3, axis=-1)
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    else:
        pixels = 255 - arr if photometric == "MONOCHROME1" else arr
        ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if bits == 16:
        pixels = pixels.astype(np.uint16) * 257
    elif bits == 32:
        pixels = pixels.astype(np.uint32) * 16843009
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data is not None:
        ds.PixelData = pixel_data
    elif not omit_pixels:
        ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb's signature), with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + body + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def bad_inputs(real_jpeg: Path) -> dict[str, bytes]:
    """name -> bytes of inputs no model should see, each with a distinct reason."""
    data = real_jpeg.read_bytes()
    return {
        "empty.jpeg": b"",
        "notes.jpeg": b"patient notes, not an image\n" * 20,
        "truncated.jpeg": data[: len(data) // 2],
        "garbage_after_magic.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 200,
        "bomb.png": png_header_claiming(100_000, 100_000),
    }


def big_png(side: int = 8000) -> bytes:
    """A real, decodable PNG over the pixel limit (64 megapixels of black compress to ~60 KB)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()
