"""Writing files so that a reader, or a process killed mid-write, never sees a part of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` with `write(file)` atomically: into a temporary file in the same folder, flushed to
    disk, then renamed over `path` (one step on POSIX). A reader, or a process killed mid-write, sees
    the previous file or the new one, never a part of one; a killed write leaves only the temporary
    file, which the next write replaces."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(payload, indent=2) + "\n").encode()))
