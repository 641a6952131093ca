"""Gallery thumbnails: made once with Pillow from the stored image, then served from a disk cache."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from app.storage import Storage

SIZE = 384  # px, the longer side: sharp on a 2x phone screen in a two-column grid
MARKER = "/files/"


def storage_key(url: str) -> str | None:
    """The storage key ("media_x/0.png") of an image URL the storage module made."""
    if MARKER not in url:
        return None
    return url.split(MARKER, 1)[1] or None


def local_path(url: str) -> str | None:
    """The image's path on this server (/files/...), whatever public host the URL names."""
    key = storage_key(url)
    return MARKER + key if key else None


def thumbnail(storage: Storage, cache_dir: Path, key: str) -> Path:
    """The cached WebP thumbnail of the stored image `key`, made now if missing."""
    target = (cache_dir / f"{key}.{SIZE}.webp").resolve()
    if cache_dir.resolve() not in target.parents:
        raise ValueError(f"bad storage key {key!r}")
    if target.exists():
        return target
    with Image.open(io.BytesIO(storage.read(key))) as image:  # Pillow's decompression-bomb guard stays on
        image.thumbnail((SIZE, SIZE))
        small = image.convert("RGB")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: two requests making the same thumbnail never serve half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        small.save(fh, "WEBP", quality=80)
    os.replace(tmp, target)
    return target
