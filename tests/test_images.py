"""The one image decode (``distortkd.images``) behind training, the uint8 cache and embed: high bit
depths scaled by their range, bombs, truncation and corrupt metadata refused with a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
from PIL import ImageFile

from distortkd.images import BadImage, open_image


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of ``pixels`` uint16 ``[H, W]`` or ``[H, W, C]`` (C = 2 LA, 3 RGB, 4 RGBA).

    By hand: PIL writes 16-bit grey PNGs only, never 16-bit LA/RGB/RGBA.
    """
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    h, w, c = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def saved(image: PIL.Image.Image, fmt: str = "PNG", **kw) -> io.BytesIO:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    buf.seek(0)
    return buf


def test_16bit_pngs_keep_their_range():
    gradient = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    gradient[0, :3] = 0, 32768, 65535
    image = PIL.Image.fromarray(gradient)
    assert image.mode == "I;16"  # numpy uint16 → PIL's 16-bit grey, kept by the PNG round trip
    for mode in ("L", "RGB"):
        out = np.asarray(open_image(saved(image), mode), dtype=float).reshape(16, 64, -1) / 255
        np.testing.assert_allclose(out, (gradient / 65535)[..., None].repeat(out.shape[-1], -1),
                                   atol=0.5 / 255)  # 8 bits per channel: half a step off at most
        assert out.min() == 0 and out.max() == 1 and abs(out[0, 1, 0] - 0.5) < 1 / 255
    for channels in (2, 3, 4):  # LA, RGB, RGBA: PIL opens these as 8-bit itself; keep it so
        pixels = np.full((4, 5, channels), 32768, np.uint16)
        pixels[0, 0], pixels[0, 1] = 65535, 255  # white; and a value that 8 bits call 255
        out = np.asarray(open_image(io.BytesIO(png16(pixels)), "RGB"), dtype=float) / 255
        assert out[0, 0].tolist() == [1.0] * 3 and out[0, 1].max() < 1 / 255
        assert np.abs(out[1:] - 0.5).max() < 1 / 255


@pytest.mark.parametrize("pixels, expected", [
    (np.array([[0, 32768, 65535]], np.int32), [0, 128, 255]),  # I: 16-bit in 32 (16-bit PGM, TIFF)
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # F: a float TIFF in [0, 1]
])
def test_int32_and_float_tiffs_scale_by_their_range(pixels, expected):
    image = PIL.Image.fromarray(pixels)
    assert image.mode in ("I", "F")
    assert np.asarray(open_image(saved(image, "TIFF"), "L"))[0].tolist() == expected


@pytest.mark.parametrize("pixels", [np.array([[0, 70000]], np.int32), np.array([[-1, 5]], np.int32),
                                    np.array([[0.0, 2.0]], np.float32),
                                    np.array([[0.0, np.nan]], np.float32)])
def test_int32_and_float_tiffs_without_a_known_range_are_refused(pixels):
    with pytest.raises(BadImage, match=r"pixels span \[.*\]; only \[0, "):
        open_image(saved(PIL.Image.fromarray(pixels), "TIFF"), "RGB")


@pytest.mark.parametrize("pixels, band", [(12 * 12, "Warning"), (20 * 20, "Error")])
def test_decompression_bombs_are_refused_in_both_bands(monkeypatch, pixels, band):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # error band: over 200 pixels
    side = int(pixels ** 0.5)
    image = saved(PIL.Image.new("RGB", (side, side), (10, 20, 30)))
    with pytest.raises(BadImage, match=f"DecompressionBomb{band}: .*PIL.Image.MAX_IMAGE_PIXELS"):
        open_image(image, "RGB")
    assert PIL.Image.MAX_IMAGE_PIXELS == 100  # the limit is not raised behind the caller's back


def test_truncated_jpeg_is_refused_even_with_load_truncated_images(monkeypatch):
    rng = np.random.default_rng(0)
    jpeg = saved(PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    cut = jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3]  # headers intact, scan cut short
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some library may set it
    with pytest.raises(BadImage, match="truncated"):
        open_image(io.BytesIO(cut), "RGB")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """An EXIF block (little-endian TIFF header, one IFD) of (tag, type, count, 4-byte value)."""
    ifd = b"".join(struct.pack("<HHI", tag, kind, n) + value for tag, kind, n, value in entries)
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)


def test_exif_orientation_is_applied_even_beside_a_malformed_tag():
    pixels = np.zeros((6, 10, 3), np.uint8)
    pixels[0, 0] = 255  # a white corner: top-left stored, top-right once turned upright
    orientation = (0x0112, 3, 1, struct.pack("<HH", 6, 0))  # 6: rotate 90° clockwise to view
    resolution_as_text = (0x011A, 2, 4, b"abc\0")  # XResolution must be a rational
    exif = exif_block([orientation, resolution_as_text])
    out = np.asarray(open_image(saved(PIL.Image.fromarray(pixels), "PNG", exif=exif), "L"))
    assert out.shape == (10, 6) and out[0, -1] == 255 and out.sum() == 255
