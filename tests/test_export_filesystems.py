"""An export into a cache directory on another filesystem than the system temp dir
(a Docker volume, a second disk): nothing may be renamed across the two, and nothing
may be left behind in either."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.models import TEST_SPEC
from utils.models.export import export_model
from utils.models.manifest import check_export


def _inside(path: str | os.PathLike[str], root: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(root)


def _mount_tmpfs(mount: Path) -> bool:
    if os.geteuid() != 0:
        return False
    command = ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)]
    return subprocess.run(command, capture_output=True).returncode == 0


def _fail_cross_device_renames(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renames between `volume` and anywhere else fail with EXDEV, as the kernel does
    across mounts."""

    def guard(real: Callable[..., None]) -> Callable[..., None]:
        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if _inside(src, volume) != _inside(dst, volume):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
            real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", guard(os.rename))
    monkeypatch.setattr(os, "replace", guard(os.replace))


@pytest.fixture
def volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on another filesystem than tmp_path: a tmpfs mount where this user
    may mount one (root), else a directory that renames may not cross."""
    mount = tmp_path / "volume"
    mount.mkdir()
    mounted = _mount_tmpfs(mount)
    if not mounted:
        _fail_cross_device_renames(mount, monkeypatch)
    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_int4_export_into_a_cache_on_another_filesystem(
    qwen2vl_hf: Path,
    volume: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    system_tmp = tmp_path / "system-tmp"  # stands for /tmp, outside the volume
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    cache = volume / "models"

    out = export_model(qwen2vl_hf, cache / "tiny-int4", TEST_SPEC)

    assert check_export(out) is None
    assert [p.name for p in cache.iterdir()] == ["tiny-int4"]  # no scratch, no caches
    assert not list(system_tmp.iterdir())
    assert tempfile.gettempdir() == str(system_tmp)  # restored after the export
    assert os.environ["TMPDIR"] == str(system_tmp)
