"""Replacing a whole output directory atomically (checkpoints, prepared datasets).

A directory is assembled under a temporary name next to its destination, then swapped in by
renames: a crash or an error at any point leaves either the old directory or the new one,
never a mix, and never half-written files under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
