"""The documentation: the MkDocs site builds strict (no broken link, anchor or nav entry), the README's
links hold, and the command blocks the pages mark are run and give what the pages show.

A fenced block is run when the line before it is `<!-- run -->` (or `<!-- run: exit N -->` for commands
that must fail with exit code N, such as the refused command lines of Getting started). Blocks are
marked to run rather than to skip: most of the docs' commands train for minutes, download data or need
a GPU or a cluster, and a marker that says "this one runs in seconds" is a promise the reader can rely
on. A `bash` block is its commands, one a line (`\\` continues one); a `console` block is `$ command`
lines, each followed by the lines it prints that the page shows (`...` stands for lines left out): they
must come out in that order, each one whole. A page's blocks run in order, in one temporary folder, so
that a later block can read what an earlier one wrote.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKED = re.compile(r"^<!-- run(?:: exit (?P<exit>\d+))? -->\n```(?P<language>[a-z]+)\n(?P<body>.*?)\n```$",
                    re.MULTILINE | re.DOTALL)


def marked_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, expected exit code, body) of each block marked to run, in page order."""
    return [(block["language"], int(block["exit"] or 0), block["body"]) for block in MARKED.finditer(text)]


def commands_of(language: str, body: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown for it) of a marked block."""
    if language == "bash":
        joined = re.sub(r"\\\n\s*", " ", body).splitlines()
        return [(line, []) for line in joined if line.strip() and not line.lstrip().startswith("#")]
    assert language == "console", f"a block marked to run is bash or console, not {language}"
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            assert commands, f"a console block starts with its command: {line!r}"
            commands[-1][1].append(line)
    return commands


def shows(output: str, expected: list[str]) -> bool:
    """Whether `output` has each expected line whole (spaces aside), in that order; `...` skips lines."""
    lines = [" ".join(line.split()) for line in output.splitlines()]
    at = 0
    for wanted in (" ".join(line.split()) for line in expected if line.strip() != "..."):
        if wanted not in lines[at:]:
            return False
        at = lines.index(wanted, at) + 1
    return True


RUNNABLE = [page for page in PAGES if marked_blocks(page.read_text())]


def test_shown_output_must_come_whole_and_in_order():
    printed = "config: model=vae\n  2 jobs:  2 completed\nsweep folder: tiny"
    assert shows(printed, ["config: model=vae", "...", "2 jobs: 2 completed"])
    assert not shows(printed, ["2 jobs: 2 completed", "config: model=vae"])  # out of order
    assert not shows(printed, ["2 jobs"])  # part of a line


def test_the_pages_mark_commands_to_run_and_every_marker_is_read():
    for page in PAGES:
        text = page.read_text()
        markers = re.findall(r"^<!-- run", text, re.MULTILINE)  # a marker is a line of its own
        assert len(markers) == len(marked_blocks(text)), f"{page}: a run marker that is not `<!-- run -->` or " \
            "`<!-- run: exit N -->` right above a fenced block"
    assert {page.name for page in RUNNABLE} >= {"getting-started.md", "comparing.md"}


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(page.relative_to(ROOT)) for page in RUNNABLE])
def test_marked_command_blocks_run_and_print_what_the_page_shows(page, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is this interpreter
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for language, exit_code, body in marked_blocks(page.read_text()):
        for command, expected in commands_of(language, body):
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=300)
            assert done.returncode == exit_code, f"{page.name}: {command}\n{done.stdout[-3000:]}"
            assert shows(done.stdout, expected), f"{page.name}: {command} did not print\n" + "\n".join(
                expected) + f"\nit printed:\n{done.stdout[-3000:]}"


def test_the_site_builds_strict_with_no_broken_link_anchor_or_nav_entry(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[test]' -c constraints.txt")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[test]' -c constraints.txt")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr
    assert (site / "index.html").is_file() and (site / "benchmarks" / "RESULTS" / "index.html").is_file()


def test_the_readme_links_name_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local and [link for link in local if not (ROOT / link).is_file()] == []
