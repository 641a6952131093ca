"""Local storage: whole files or none, and nothing left behind when a write fails."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from app.storage import LocalStorage


def test_save_and_read(tmp_path):
    store = LocalStorage(tmp_path, "http://host")
    assert store.save("media_x/0.png", b"png") == "http://host/files/media_x/0.png"
    assert store.read("media_x/0.png") == b"png"
    with pytest.raises(ValueError):
        store.save("../outside.png", b"x")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a disk that fills up) needs root")
def test_a_full_disk_leaves_no_temporary_files(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        store = LocalStorage(disk, "http://host")
        failures = 0
        for index in range(40):
            try:
                store.save(f"media_{index}/0.png", os.urandom(200 * 1024))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                failures += 1
        assert failures >= 30  # the disk holds one such image at the most
        leftovers = [path for path in disk.rglob("*") if path.name.startswith(".tmp-")]
        assert leftovers == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
