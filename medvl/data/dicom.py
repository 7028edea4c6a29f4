"""DICOM bytes to an 8-bit PIL image, shown the way a viewer would show it by default.

Grey images go through the standard pipeline: the modality LUT (``RescaleSlope`` / ``RescaleIntercept``
or a Modality LUT Sequence, via pydicom) gives physical values such as Hounsfield units; then the VOI
stage picks the displayed range: the first ``WindowCenter`` / ``WindowWidth`` pair with the LINEAR
function of PS3.3 C.11.2.1.2, or a VOI LUT Sequence (via pydicom) stretched over its output, or, with
neither, the image's own min-max. ``MONOCHROME1`` (low values white, common in CR/DX) is inverted so
that every image comes out with bright bone. RGB images (pydicom converts YBR) are only scaled to 8 bits.

Left out on purpose: the SIGMOID VOI function (treated as LINEAR), per-frame functional groups of
enhanced multi-frame objects, palette colour. A multi-frame object gives its middle frame (only that frame is
decoded). Compressed
transfer syntaxes decode only where pydicom has a decoder installed (JPEG 2000 works through Pillow).

pydicom is an optional dependency, imported on first use (``medvl.data.images`` imports this module only
for bytes that start with the DICOM preamble).
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def decode_dicom(data: bytes) -> Image.Image:
    """Decode DICOM file bytes into a mode "L" (grey) or "RGB" image; raise on anything unsupported."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:  # decode the middle frame alone: all of them could be hundreds of MiB from a few MB
        ds.pixel_array_options(index=frames // 2)
    pixels = ds.pixel_array
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = _grey_to_uint8(ds, pixels)
        return Image.fromarray(255 - grey if photometric == "MONOCHROME1" else grey, mode="L")
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return Image.fromarray(_scale(pixels, 0, 2 ** int(ds.BitsStored) - 1), mode="RGB")
    raise ValueError(f"unsupported DICOM PhotometricInterpretation {photometric!r}")


def _grey_to_uint8(ds, pixels: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, prefer_lut=True)
        return _scale(values, values.min(), values.max())
    window = _first_window(ds)
    if window is None:
        return _scale(values, values.min(), values.max())
    center, width = window
    linear = np.clip((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
    return _scale(linear, 0.0, 1.0)


def _first_window(ds) -> tuple[float, float] | None:
    """The first (default) of the image's windows, or None when it has no usable one."""
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    return (center, width) if center is not None and width is not None and width > 0 else None


def _first_value(value) -> float | None:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom MultiValue (VM > 1)
        value = value[0] if len(value) else None
    return None if value in (None, "") else float(value)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (rounded, clipped); a flat image becomes black."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
