"""PNG overlays of a decoder's attention on the image, for a reviewer to see where a text came from.

The image is the model's own input (``pixel_values`` rescaled to [0, 1] for display), so the overlay lines up
with the patches the map was computed on. The map (rows × cols, summing to 1) is stretched over the whole image.
"""
from __future__ import annotations

import re
import textwrap
import numpy as np


def overlay_png(pixel_values: np.ndarray, attention: np.ndarray, title: str) -> bytes:
    """The overlay as PNG bytes (drawn where the model ran, written wherever the run folder is)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    image = displayable(pixel_values)
    figure, axes = plt.subplots(figsize=(4, 4.6))
    axes.imshow(image, cmap="gray" if image.ndim == 2 else None)
    height, width = image.shape[:2]
    axes.imshow(attention, cmap="jet", alpha=0.45, extent=(0, width, height, 0), interpolation="bilinear")
    axes.set_axis_off()
    axes.set_title("\n".join(textwrap.wrap(title, 48)[:4]), fontsize=7)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return png.getvalue()


def displayable(pixel_values: np.ndarray) -> np.ndarray:
    """(3, H, W) normalised model input → (H, W, 3) in [0, 1]; a grey image → (H, W)."""
    image = np.moveaxis(np.asarray(pixel_values, dtype=np.float64), 0, -1)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return image[..., 0] if np.allclose(image[..., 0], image[..., -1]) else image


def overlay_filename(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[:100] + ".png"
