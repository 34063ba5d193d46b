"""Load the reference image and fit it to the generation resolution.

Alpha is flattened onto white: avatar cut-outs are usually delivered as transparent PNGs meant to sit on a
light page, and white keeps hair/shoulder edges clean where mid-grey would add a dark halo to light
subjects. Resizing crops to cover instead of stretching (upstream StableAvatar stretches with
``Image.resize((w, h))``), so faces keep their proportions whatever the input aspect ratio.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.media.errors import UnreadableImageError

AspectRatio = Literal["16:9", "9:16", "1:1", "auto"]
FIXED_RATIOS: tuple[str, ...] = ("16:9", "9:16", "1:1")
BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)
MAX_PIXELS = 64_000_000  # ~8k x 8k; larger uploads are refused before decoding (memory guard)


def load_image(source: bytes | Path | str) -> Image.Image:
    """Decode ``source`` (encoded bytes or a file path) to an RGB image.

    The EXIF orientation is applied (phone photos), animated images yield their first frame, alpha is
    composited onto ``BACKGROUND_RGB`` and the pixels are fully decoded here so truncated or corrupt files
    fail now with ``UnreadableImageError`` rather than later inside the pipeline.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise UnreadableImageError(_msg("the file is empty"))
        fp: io.BytesIO | Path = io.BytesIO(data)
    else:
        fp = Path(source)
        if not fp.is_file():
            raise UnreadableImageError(_msg(f"file not found: {fp.name}"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnreadableImageError(_msg(f"it is too large ({img.width}x{img.height} pixels)"))
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return _to_rgb(img)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(_msg("it is too large"), detail=str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImageError(
            _msg("the file is not a recognised image format"), detail=str(exc)
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated") or SyntaxError (bad PNG).
        raise UnreadableImageError(_msg("the file is truncated or corrupt"), detail=str(exc)) from exc


def _msg(reason: str) -> str:
    return f"Could not read the image: {reason}."


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, flattening transparency onto the background colour."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def choose_size(
    aspect_ratio: AspectRatio | str,
    image_w: int,
    image_h: int,
    table: Mapping[str, tuple[int, int]],
) -> tuple[int, int]:
    """Return the output (width, height) for ``aspect_ratio`` from ``table`` (keys "16:9", "9:16", "1:1").

    ``auto`` picks the table entry whose W/H is nearest to the image's W/H in log space, so a ratio is as
    far from 2:1 as from 1:2; the decision boundaries are therefore the geometric means of neighbouring
    ratios (e.g. sqrt(16/9 * 1) ~ 1.333 between landscape and square). Ties go to the earlier key.
    """
    if aspect_ratio != "auto":
        if aspect_ratio not in table:
            raise ValueError(
                f"unknown aspect_ratio {aspect_ratio!r}; expected one of {sorted(table)} or 'auto'"
            )
        return _size(table[aspect_ratio])
    if image_w <= 0 or image_h <= 0:
        raise ValueError(f"image size must be positive, got {image_w}x{image_h}")
    candidates = [key for key in FIXED_RATIOS if key in table] or list(table)
    if not candidates:
        raise ValueError("the size table is empty")
    target = math.log(image_w / image_h)
    best = min(candidates, key=lambda key: abs(math.log(table[key][0] / table[key][1]) - target))
    return _size(table[best])


def _size(entry: tuple[int, int]) -> tuple[int, int]:
    width, height = int(entry[0]), int(entry[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid size table entry {entry!r}")
    return width, height


def resize_cover(img: Image.Image, width: int, height: int) -> np.ndarray:
    """Scale ``img`` to cover ``width`` x ``height``, centre-crop the excess, and return [H, W, 3] uint8.

    Unlike upstream's stretch, this preserves proportions: the scale is ``max(W/w, H/h)`` and the crop box is
    applied in source coordinates inside a single bicubic resample (``ImageOps.fit``), so there is no
    double resampling or rounding drift.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    rgb = img if img.mode == "RGB" else _to_rgb(img)
    fitted = ImageOps.fit(rgb, (width, height), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8).copy()
