"""The errors a user sees as one line: what is refused and why, with no traceback.

Imports nothing from ae_lab, so every part can raise `ConfigError` without an import circle.
"""

from __future__ import annotations

import argparse
import sys


class ConfigError(ValueError):
    """A bad configuration value: its message names the key and what is allowed."""


def fail(message: str, exit_code: int = 2) -> None:
    """End the process with one line on stderr and `exit_code` (no traceback)."""
    print(f"ae_lab: error: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals (an unknown choice, a missing option) are `fail`'s one line and exit code 2,
    not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (see {self.prog} --help)")
