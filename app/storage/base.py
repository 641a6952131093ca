"""The storage interface: every backend stores an output under a key and gives its public URL."""

from __future__ import annotations

from typing import Protocol


class Storage(Protocol):
    def save(self, key: str, data: bytes) -> str:
        """Store `data` under `key` ("media_x/0.png"); returns its public URL."""
        ...

    def read(self, key: str) -> bytes: ...
