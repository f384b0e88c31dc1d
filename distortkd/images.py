"""One image file → one PIL image in a model's mode: the single decode behind the training path
(``imagesets.HFImages``, hence also the in-memory splits and the ``data.cache=uint8`` canvases) and
``distortkd-embed``, so a file reads the same everywhere.

A file is decoded faithfully or not at all: ``open_image`` raises ``BadImage`` (its message is the
reason) and the caller skips and counts the file. Faithfully means:

- high-bit-depth pixels are scaled by their true range, not clipped at 255 as PIL's ``convert``
  does: 16-bit grey (``I;16*``) by 65535; ``I`` (32-bit int: PIL's mode for 16-bit PGM/PPM and
  int TIFFs) by 65535 when it holds 0..65535, else refused; ``F`` (float TIFFs) read as ``[0, 1]``,
  else refused. 16-bit RGB(A)/LA PNGs need nothing here: PIL opens them as 8-bit RGB(A), keeping
  the high byte. Output is 8 bits per channel, as every other image and the uint8 cache;
- the EXIF orientation is applied (as ``datasets``' own ``Image`` feature does);
- a truncated file is an error even where ``ImageFile.LOAD_TRUNCATED_IMAGES`` was set (it pads the
  missing rows with grey), and an image over ``PIL.Image.MAX_IMAGE_PIXELS`` is refused in PIL's
  warning band too (it would decode, up to 2x the limit in memory). The limit itself is left alone.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import IO

import numpy as np
import PIL.Image
from PIL import ImageFile

_BOMBS = (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning)
_T = PIL.Image.Transpose
# EXIF orientation → the transpose that shows the image upright (ImageOps.exif_transpose's table).
_UPRIGHT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
            6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_RANGE = {"I": 65535.0, "F": 1.0}  # what a 32-bit int / float pixel is read against


class BadImage(Exception):
    """A file that cannot be decoded faithfully; ``str()`` is the reason, for logs and lists."""


@contextmanager
def _strict():
    """PIL's checks at their strict setting for one decode (its options are process-wide: another
    library may have loosened them). DataLoader workers are processes: no thread sees the swap."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _to_8bit(im: PIL.Image.Image) -> PIL.Image.Image:
    """A one-band ``I;16*``, ``I`` or ``F`` image → ``L``, scaled by its range (see module doc).

    By hand: PIL's ``convert("L")`` clips these modes at 255 instead of scaling them.
    """
    pixels = np.asarray(im)
    full = 65535.0 if im.mode.startswith("I;16") else _RANGE[im.mode]
    lo, hi = float(pixels.min()), float(pixels.max())
    if not 0 <= lo <= hi <= full:  # NaN fails too
        raise BadImage(f"mode {im.mode} pixels span [{lo:g}, {hi:g}]; only [0, {full:g}] has a "
                       "known intensity range")
    return PIL.Image.fromarray(np.rint(pixels * (255 / full)).astype(np.uint8), "L")


def upright(im: PIL.Image.Image) -> PIL.Image.Image:
    """``im`` loaded and turned as its EXIF orientation says.

    By hand: ``ImageOps.exif_transpose`` also re-encodes the EXIF block, which raises on a
    malformed tag that has nothing to do with the pixels (an XResolution stored as text).
    """
    method = _UPRIGHT.get(im.getexif().get(PIL.Image.ExifTags.Base.Orientation))
    im.load()
    return im.transpose(method) if method is not None else im


def to_mode(im: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """``im`` (any PIL mode) → ``mode`` (``L`` or ``RGB``), 8 bits, high bit depths scaled."""
    if im.mode.startswith("I;16") or im.mode in _RANGE:
        im = _to_8bit(im)
    return im.convert(mode)


def open_image(source: str | IO[bytes], mode: str) -> PIL.Image.Image:
    """The image at ``source`` (path or binary file object), fully decoded, upright, in ``mode``.

    Raises:
        BadImage: unreadable, truncated, over the pixel limit, corrupt metadata, or pixels with no
            known range. Any exception PIL raises counts: its plugins raise more than ``OSError``
            on malformed files (corrupt EXIF gives ``TypeError`` and ``struct.error``).
    """
    with _strict():
        try:
            with PIL.Image.open(source) as im:
                return to_mode(upright(im), mode)
        except BadImage:
            raise
        except _BOMBS as err:
            raise BadImage(f"{type(err).__name__}: {err} (PIL.Image.MAX_IMAGE_PIXELS)") from None
        except Exception as err:
            raise BadImage(f"{type(err).__name__}: {err}") from None
