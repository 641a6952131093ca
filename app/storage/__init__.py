"""Where generated images live: one interface (base.Storage), a backend per kind of store.

The local directory is the default (and so far only) backend; the app serves it at
/files/..., and URLs are built from the public base URL.
"""

from __future__ import annotations

from app.core.settings import Settings
from app.storage.base import Storage
from app.storage.local import LocalStorage


def from_settings(settings: Settings) -> Storage:
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    return LocalStorage(settings.files_dir, settings.public_url)


__all__ = ["LocalStorage", "Storage", "from_settings"]
