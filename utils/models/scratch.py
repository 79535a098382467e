"""Temporary files of an export, kept on the cache directory's filesystem."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# tempfile's default directory is process-wide: one export at a time may move it.
_TEMP_DIR_LOCK = threading.Lock()


@contextlib.contextmanager
def temp_files_in(directory: Path) -> Iterator[None]:
    """Send the block's temporary files (Python's `tempfile` and, through TMPDIR, native
    code and child processes) to `directory`, which is created here and removed after.

    optimum-intel and NNCF write compressed models into `tempfile.TemporaryDirectory()`
    and rename them into the export; a rename cannot cross filesystems, so an export
    into a cache on another mount (a Docker volume, a second disk) fails with EXDEV
    unless its temporary files live on the cache's filesystem. Compiler caches that
    torch keeps under the temporary directory go away with it.
    """
    with _TEMP_DIR_LOCK:
        directory.mkdir(parents=True, exist_ok=True)
        saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir = os.environ["TMPDIR"] = str(directory)
        try:
            yield
        finally:
            tempfile.tempdir = saved_tempdir
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env
            shutil.rmtree(directory, ignore_errors=True)
