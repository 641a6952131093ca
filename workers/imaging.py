"""Make what a backend returned into the delivered image: verified, cropped and resized to the table."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from app.images.dimensions import LONG_SIDE
from app.images.validation import MAX_PIXELS
from workers.backends.base import PermanentError


def finish(data: bytes, size: str, resolution: str, width: int, height: int) -> bytes:
    """PNG bytes of `data` center-cropped to width:height and resized to exactly that
    (for size "auto": the backend's ratio kept, the long side scaled to the tier)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                if probe.width * probe.height > MAX_PIXELS:
                    raise PermanentError("bad_image", "The provider returned an image too large to process.")
                probe.verify()
            image: Image.Image = Image.open(io.BytesIO(data))
            image.load()
    except PermanentError:
        raise
    except Exception as exc:
        raise PermanentError("bad_image", f"The provider returned data that is not an image ({exc}).") from None
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if size == "auto":
        scale = LONG_SIDE[resolution] / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if target != image.size:
            image = image.resize(target, Image.Resampling.LANCZOS)
    elif image.size != (width, height):
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=False, compress_level=3)
    return out.getvalue()
