"""Decode encoded image bytes (PNG, JPEG, DICOM) into 8-bit RGB ``PIL.Image``.

Only those formats: Pillow would otherwise identify some forty (EPS runs Ghostscript where it is installed,
others bring their own parsers' bugs), and neither the datasets nor the server need more. Prepare, training and
the server all decode through here; the server's header check uses :data:`PILLOW_FORMATS` too.
"""
from __future__ import annotations

import io

from PIL import Image

DICOM_MAGIC_OFFSET = 128
PILLOW_FORMATS = ("PNG", "JPEG")  # DICOM goes through pydicom


class UnreadableImage(ValueError):
    """Raised when bytes cannot be decoded as an image."""


def is_dicom(data: bytes) -> bool:
    return len(data) > DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode_image(data: bytes) -> Image.Image:
    """Return an RGB image, or raise :class:`UnreadableImage` (never anything else) on bad bytes."""
    if not data:
        raise UnreadableImage("empty image bytes")
    try:
        if is_dicom(data):
            from medvl.data.dicom import decode_dicom  # optional dependency, imported lazily

            image = decode_dicom(data)
        else:
            image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            image.load()  # force full decode: truncated files fail here, not later in training
        return image.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
