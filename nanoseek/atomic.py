"""Writing outputs atomically: a file (`write_atomic`) or a whole directory (`swap_into_place`).

A file is written under a temporary name in its directory and renamed over the old one. A
directory is assembled under a temporary name next to its destination, then swapped in by
renames: a crash or an error at any point leaves either the old directory or the new one,
never a mix, and never half-written files under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """All of `text` (UTF-8) at `path`, or on any failure the file as it was: readers never see half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename tmp to path; an existing path is moved aside first and removed only afterwards."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
