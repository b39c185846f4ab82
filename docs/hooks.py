"""MkDocs hook (mkdocs.yml `hooks:`): the benchmark reports join the site from where they are written.

`benchmarks/*.md` are rewritten by their scripts (`benchmarks/run.py`, `vectorized.py`, `fidelity.py`,
`mutation.py`) beside the figures they link to, outside `docs/`. Each report is added as the page
`benchmarks/<NAME>.md` and every image under `benchmarks/` at its own path, so the reports' relative
links hold on the site as they do in the repository, and the strict build checks them like any page.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
IMAGES = (".png", ".svg", ".jpg")


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    reports = sorted((ROOT / "benchmarks").glob("*.md"))
    images = sorted(path for path in (ROOT / "benchmarks").rglob("*") if path.suffix in IMAGES)
    for path in [*reports, *images]:
        files.append(File(str(path.relative_to(ROOT)), src_dir=str(ROOT), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files
