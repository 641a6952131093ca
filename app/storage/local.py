"""Outputs on the local disk: a folder the app serves at /files/... (the default backend)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class LocalStorage:
    def __init__(self, root: Path, public_url: str) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"bad storage key {key!r}")
        return path

    def save(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, a retry overwrites cleanly.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            # A full disk (or any failed write) leaves no half-written temporary file behind.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.url(key)

    def url(self, key: str) -> str:
        return f"{self.public_url}/files/{key}"

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()
