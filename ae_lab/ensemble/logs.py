"""Each member's log file (`ae_lab.log` in its run folder), as a single run's Hydra job logging writes it.

The group's lines (its training: one line an epoch, a failed member, a resume) go into every member's
log, since each member's training is the group's; the lines logged while one member is written out
(its evaluation) go into that member's log only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from ae_lab.job import LogFile


class MemberLogs(logging.Handler):
    """A root-logger handler that writes each record into the log files of the members it addresses:
    all of them, or one inside `only(member)`. `files`: each member's (`JobContext.log_file`), None for a
    member whose job writes no log file."""

    def __init__(self, files: list[LogFile | None]) -> None:
        super().__init__()
        self.files = [file.handler() if file is not None else None for file in files]
        self.addressed = [file for file in self.files if file is not None]

    def emit(self, record: logging.LogRecord) -> None:
        for file in self.addressed:
            file.handle(record)

    @contextmanager
    def only(self, member: int) -> Iterator[None]:
        everyone, self.addressed = self.addressed, [file for file in self.files[member:member + 1] if file is not None]
        try:
            yield
        finally:
            self.addressed = everyone

    @contextmanager
    def attached(self) -> Iterator["MemberLogs"]:
        """Installed on the root logger for the `with` block; the files closed after it."""
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)
            for file in self.files:
                if file is not None:
                    file.close()
