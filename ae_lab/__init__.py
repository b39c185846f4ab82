"""ae_lab: train, sweep and compare autoencoders; `ae_lab.load(RUN)` gives back a trained model
(ae_lab/trained.py). `load` is imported on first use, so that `import ae_lab` (and every
`python -m ae_lab.<tool>`) does not pay for torch until it is needed."""

from __future__ import annotations

from typing import Any

__all__ = ["load", "TrainedModel"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ae_lab import trained

        return getattr(trained, name)
    raise AttributeError(f"module 'ae_lab' has no attribute {name!r}")
