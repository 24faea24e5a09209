"""Robust image decoding: every file a user's folder may hold either becomes an RGB image or a clear reason.

Convertible inputs are converted (grayscale, RGBA and palette images composited on white, 16-bit scaled to 8 bits,
CMYK, EXIF orientation applied, huge JPEGs decoded at reduced size); unreadable ones (zero bytes, not an image,
truncated data, beyond PIL's decompression-bomb limit) raise :class:`BadImageError` with the path and the reason,
so a training run can skip, count and list them, or stop with the path under ``--strict``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class BadImageError(ValueError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's convert("L") clips 16-bit values at 255 instead of scaling them; scale the range ourselves.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite transparent pixels on white: dropping alpha would expose arbitrary colours under it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Decode ``path`` into an RGB PIL image, or raise :class:`BadImageError`.

    ``max_side``: images whose sides both exceed it may be decoded at reduced size (JPEG draft mode, then
    ``thumbnail``), so an enormous photo costs little when the model wants 32 or 224 pixels.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # A DecompressionBombWarning is not an error for us: big images are downscaled right away.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if max_side and img.format == "JPEG":
                    img.draft("RGB", (max_side, max_side))
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                if max_side and min(img.size) > 2 * max_side:
                    img.thumbnail((4 * max_side, 4 * max_side), Image.Resampling.BILINEAR)
                return img.copy() if img.mode == "RGB" else img.convert("RGB")
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can identify") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"too large to decode safely ({e})") from None
    except OSError as e:
        raise BadImageError(path, f"unreadable or truncated image data ({e})") from None
    except (ValueError, SyntaxError, MemoryError) as e:
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from None
