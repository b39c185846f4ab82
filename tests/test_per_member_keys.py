"""The docs' list of what vectorises in a sweep is the list the grouping declares
(`ae_lab.ensemble.grouping.per_member_keys`), read between the `<!-- per-member-keys -->` markers of
README.md or of a page under docs/."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ae_lab.config import Config
from ae_lab.ensemble.grouping import per_member_keys

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- per-member-keys -->", "<!-- /per-member-keys -->"


def documented_list() -> str:
    """The text between the markers, in whichever Markdown file holds them (exactly one)."""
    holders = [path for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
               if path.is_file() and START in path.read_text()]
    assert len(holders) == 1, f"the per-member keys' markers are in {holders or 'no file'}"
    text = holders[0].read_text()
    return text[text.index(START) + len(START):text.index(END)]


def keys_named(text: str, top_level: set[str]) -> set[str]:
    """The keys a list names in backticks, with its two abbreviations written out: a bare name after a
    dotted key, unless it is a key of `top_level`, is a sibling of that key (`loss.beta_schedule.start`,
    `steps` -> `loss.beta_schedule.steps`); "the same under `a.b`" repeats the siblings just named under
    `a.b`."""
    keys: list[str] = []
    siblings: list[str] = []  # the leaf names of the last run of siblings
    parent = None
    for same_under, name in re.findall(r"(the same under )?`([^`]+)`", text):
        if same_under:
            keys += [f"{name}.{leaf}" for leaf in siblings]
        elif "." not in name and name not in top_level and parent is not None and siblings:
            keys.append(f"{parent}.{name}")
            siblings.append(name)
        else:
            keys.append(name)
            parent, _, leaf = name.rpartition(".")
            siblings = [leaf] if parent else []
            parent = parent or None
    return set(keys)


def test_the_abbreviations_are_written_out():
    text = "(`a.b.start`, `steps`, and the same under `a.c`); `x.y`, `seed`"
    assert keys_named(text, {"seed"}) == {"a.b.start", "a.b.steps", "a.c.start", "a.c.steps", "x.y", "seed"}


def test_the_documented_per_member_keys_are_the_declared_ones():
    declared = set(per_member_keys())
    documented = keys_named(documented_list(), {field.name for field in dataclasses.fields(Config)})
    assert documented - declared == set(), "documented but not per member"
    assert declared - documented == set(), "per member but not documented"
