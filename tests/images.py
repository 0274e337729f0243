"""Image files made for tests: DICOM in and out of spec, and broken files of every kind."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def full_range(arr: np.ndarray) -> np.ndarray:
    """(H, W) grey stretched to span 0..255, so every DICOM encoding of it decodes back exactly."""
    arr = np.asarray(arr, dtype=np.float64)
    return np.round((arr - arr.min()) / (arr.max() - arr.min()) * 255).astype(np.uint8)


def stretched(path: Path, size: int | None = None) -> np.ndarray:
    """A real X-ray as (H, W) uint8 spanning 0..255, so every DICOM encoding of it decodes back exactly."""
    img = Image.open(path).convert("L")
    if size:
        img = img.resize((size, size))
    return full_range(np.asarray(img))


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
    **header: object,
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
    for key, value in header.items():  # last, so a test can override any of the above
        setattr(ds, key, value)
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


def _encapsulated(plain: bytes, transfer_syntax: str, frame: bytes, **header: object) -> bytes:
    """`plain` (an uncompressed DICOM) with its pixels replaced by one encapsulated `frame`."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(io.BytesIO(plain))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    for key, value in header.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def jpeg_lossless(image: np.ndarray, bits: int, predictor: int = 1) -> bytes:
    """A lossless JPEG (ITU T.81 process 14, SOF3) of a (H, W) image, which no installed package writes.

    One component, point transform 0, and one Huffman table giving each difference category 0-16 a 5-bit code.
    """
    x = image.astype(np.int64)
    left, up, corner = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    left[:, 1:], up[1:, :], corner[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    pred = {
        1: left,
        2: up,
        3: corner,
        4: left + up - corner,
        5: left + ((up - corner) >> 1),
        6: up + ((left - corner) >> 1),
        7: (left + up) >> 1,
    }[predictor]
    pred[0, :], pred[1:, 0], pred[0, 0] = left[0, :], up[1:, 0], 1 << (bits - 1)  # T.81 H.1.2.1: the edges
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)  # modulo 2^16, in -32767..32768
    bitstream = []
    for d in diff.ravel().tolist():
        size = 16 if d == 32768 else abs(d).bit_length()
        bitstream.append(f"{size:05b}")
        if 0 < size < 16:
            bitstream.append(f"{(d if d > 0 else d + (1 << size) - 1):0{size}b}")
    bitstring = "".join(bitstream)
    bitstring += "1" * (-len(bitstring) % 8)  # pad with ones
    scan = int(bitstring, 2).to_bytes(len(bitstring) // 8, "big").replace(b"\xff", b"\xff\x00")
    h, w = image.shape
    sof = struct.pack(">HHBHHBBBB", 0xFFC3, 11, bits, h, w, 1, 1, 0x11, 0)
    dht = struct.pack(">HHB", 0xFFC4, 2 + 1 + 16 + 17, 0) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = struct.pack(">HHBBBBBB", 0xFFDA, 8, 1, 1, 0x00, predictor, 0, 0)
    return b"\xff\xd8" + sof + dht + sos + scan + b"\xff\xd9"


def compressed_dicom(arr: np.ndarray, transfer_syntax: str, bits: int = 16, **options: object) -> bytes:
    """`arr` (H, W) uint8 as a compressed MONOCHROME2 DICOM, x257 when 16-bit, written here.

    RLE, JPEG-LS and JPEG 2000 through pydicom's encoders (`options` are theirs: jls_error, j2k_cr),
    JPEG baseline through Pillow (8-bit only), JPEG lossless (.57, .70) through `jpeg_lossless`.
    """
    from pydicom import dcmread
    from pydicom.uid import JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1

    plain = dicom_bytes(arr, bits=bits)
    stored = arr.astype(np.uint16) * 257 if bits == 16 else arr
    if transfer_syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format="JPEG", quality=int(options.get("quality", 95)))
        return _encapsulated(plain, transfer_syntax, buffer.getvalue())
    if transfer_syntax in (JPEGLossless, JPEGLosslessSV1):
        predictor = int(options.get("predictor", 1))
        return _encapsulated(plain, transfer_syntax, jpeg_lossless(stored, bits, predictor))
    ds = dcmread(io.BytesIO(plain))
    ds.compress(transfer_syntax, **options)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def colour_dicom(rgb: np.ndarray, transfer_syntax: str, photometric: str, **options: object) -> bytes:
    """`rgb` (H, W, 3) uint8 as an 8-bit colour DICOM stored as `photometric`, compressed or not.

    JPEG baseline through Pillow (which writes YCbCr: YBR_FULL_422), uncompressed YBR_FULL through pydicom's
    colour conversion, anything else through pydicom's encoders (YBR_RCT / YBR_ICT: JPEG 2000's own transform).
    """
    from pydicom import dcmread
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    plain = dicom_bytes(rgb[..., 0], bits=8, photometric="RGB")
    if transfer_syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
        return _encapsulated(plain, transfer_syntax, buffer.getvalue(), PhotometricInterpretation=photometric)
    ds = dcmread(io.BytesIO(plain))
    ds.PhotometricInterpretation = photometric
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = convert_color_space(rgb, "RGB", photometric).tobytes() if photometric != "RGB" else rgb.tobytes()
    else:
        ds.PixelData = rgb.tobytes()
        ds.compress(transfer_syntax, **options)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_header(data: bytes, **header: object) -> bytes:
    """The DICOM `data` with header elements changed, its pixel data untouched (a lying header)."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    for key, value in header.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _explicit_element(group: int, element: int, vr: bytes, length: int) -> bytes:
    """An explicit VR little endian element header (PS3.5 7.1.2)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, length)
    return struct.pack("<HH2sH", group, element, vr, length)


def _with_private_zeros(arr: np.ndarray, transfer_syntax: str, zeros: int) -> tuple[bytes, bytes, list[bytes]]:
    """(file meta, data set up to the pixels, the rest) of `arr` as a 16-bit DICOM whose data set holds a private
    OB element of `zeros` zero bytes before its pixels; the rest is [element headers, the zeros..., pixels]."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    small = dicom_bytes(arr, transfer_syntax=transfer_syntax, omit_pixels=True)
    meta_end = 132 + 12 + struct.unpack_from("<I", small, 140)[0]  # after (0002,0000) and the group it counts
    header = small[meta_end:]
    if transfer_syntax == DeflatedExplicitVRLittleEndian:  # pydicom deflated it
        header = zlib.decompress(header, -zlib.MAX_WBITS)
    creator = b"PNEUMO TEST "
    private = _explicit_element(0x0029, 0x0010, b"LO", len(creator)) + creator
    private += _explicit_element(0x0029, 0x1000, b"OB", zeros)
    pixels = (arr.astype("<u2") * 257).tobytes()
    pixel_element = _explicit_element(0x7FE0, 0x0010, b"OW", len(pixels)) + pixels
    return small[:meta_end], header, [private, bytes(zeros), pixel_element]


def dicom_with_private_zeros(arr: np.ndarray, zeros: int) -> bytes:
    """`arr` (H, W) uint8 as an Explicit VR Little Endian 16-bit DICOM with `zeros` bytes of a private element."""
    from pydicom.uid import ExplicitVRLittleEndian

    meta, header, rest = _with_private_zeros(arr, ExplicitVRLittleEndian, zeros)
    return meta + header + b"".join(rest)


def deflated_dicom(arr: np.ndarray, private_zeros: int = 0) -> bytes:
    """`arr` (H, W) uint8 as a Deflated Explicit VR Little Endian 16-bit DICOM; with `private_zeros`, a private
    OB element of that many zero bytes before the pixels: a deflate bomb of about 1 KB per MiB, built from one
    compressed MiB repeated after full flushes (no back-references), so the zeros never exist in memory."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if not private_zeros:
        return dicom_bytes(arr, transfer_syntax=DeflatedExplicitVRLittleEndian)  # deflated by pydicom
    meta, header, (private, _, pixels) = _with_private_zeros(arr, DeflatedExplicitVRLittleEndian, 0)
    private = private[:-4] + struct.pack("<I", private_zeros)  # the OB element's length
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(header + private), deflater.flush(zlib.Z_FULL_FLUSH)]
    mib, rest = divmod(private_zeros, 2**20)
    one_mib = deflater.compress(bytes(2**20)) + deflater.flush(zlib.Z_FULL_FLUSH)
    body += [one_mib * mib, deflater.compress(bytes(rest) + pixels), deflater.flush()]
    return meta + b"".join(body)


def with_implicit_file_meta(data: bytes) -> bytes:
    """The DICOM `data` with its file meta group rewritten in implicit VR, as some old writers got it wrong."""
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    pos, implicit = 132, b""
    while pos < meta_end:
        group, element, vr = struct.unpack_from("<HH2s", data, pos)
        if vr in (b"OB", b"OW", b"UN"):
            length, start = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        implicit += struct.pack("<HHI", group, element, length) + data[start : start + length]
        pos = start + length
    return data[:132] + implicit + data[meta_end:]


def cmyk_jpeg(rgb: np.ndarray) -> bytes:
    """`rgb` as a CMYK JPEG (Adobe APP14, transform 0), as Pillow writes it."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def ycck_jpeg(rgb: np.ndarray) -> bytes:
    """`rgb` as an Adobe YCCK JPEG (APP14 transform 2), as Photoshop writes CMYK.

    Pillow writes the four planes untransformed (and inverted, the Adobe way), so the planes are made here:
    libjpeg reads YCCK as CMYK = 255 - RGB(Y, Cb, Cr) and K as stored, and Pillow inverts that again, so
    Pillow's CMYK of `rgb` (255 - R, 255 - G, 255 - B, 0) needs Y, Cb, Cr of 255 - `rgb` and a stored K of 255.
    """
    ycc = np.asarray(Image.fromarray(255 - rgb).convert("YCbCr"))
    planes = np.concatenate([ycc, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    inverted = Image.frombytes("CMYK", (rgb.shape[1], rgb.shape[0]), (255 - planes).tobytes())
    inverted.save(buffer, format="JPEG", quality=95)
    data = bytearray(buffer.getvalue())
    app14 = data.index(b"\xff\xee\x00\x0eAdobe")
    data[app14 + 15] = 2  # the transform byte: 0 = CMYK as stored, 2 = YCCK
    return bytes(data)


STORED_AS = {  # EXIF orientation -> the Pillow transpose that makes the stored image from the upright one
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented(upright: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    """`upright` (H, W) uint8 stored turned, with the EXIF orientation tag that tells a viewer how to turn it back."""
    img = Image.fromarray(upright)
    if orientation in STORED_AS:
        img = img.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()
