"""Writing files so that a reader, or a process killed mid-write, never sees a part of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable

import torch


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


def atomic_torch_save(path: Path, payload: Any) -> None:
    """`torch.save(payload)` to `path` through `atomic_write`, with a Ctrl-C that lands inside the save
    raised as the KeyboardInterrupt it is. torch's zip writer, left mid-record by the interrupt, fails
    when it closes ("unexpected pos"), and that RuntimeError takes the interrupt's place: the run would
    be recorded as failed (a sweep would go on) instead of interrupted."""
    def save(file: IO[bytes]) -> None:
        try:
            torch.save(payload, file)
        except RuntimeError as error:
            if isinstance(error.__context__, KeyboardInterrupt):
                raise error.__context__ from None
            raise

    atomic_write(path, save)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(payload, indent=2) + "\n").encode()))
