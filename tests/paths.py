"""Where the suite finds the checkout, its configs and the verified data files: constants that test modules
need when they are collected (in parametrize lists, module-level tables), which a fixture cannot give."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# verified MNIST and Fashion-MNIST files beside the checkout (see shared/data/README.md)
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir() or not (SHARED / "fashion_mnist").is_dir(),
    reason=f"the MNIST and Fashion-MNIST files are not in {SHARED} (see shared/data/README.md)")
