"""A data set's units: how its examples as a user has them ("raw": digit counts 0..16, MNIST pixels
0..255, the values of their own arrays) become the model's inputs, and back.

Every data module says what its loader does between the file and the model with a `units(cfg, run_dir,
input_shape)` function; `ae_lab.data.units` picks it for a run, and `ae_lab.load` applies it on the way
in and undoes it on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ae_lab.data.base import Split
from ae_lab.data.scaling import Scaling


@dataclass(frozen=True)
class Units:
    """raw -> model: binarised at `threshold` (raw >= threshold is 1, else 0) when it is set, else
    divided by `scale`; then `scaling` (`dataset.normalize`, fitted on the training split) when set.

    `pixels`: the raw values are pixel intensities, 0 black and `scale` white, so that image files can be
    read into raw units and written from them (PNG level v is the raw value v * scale / 255).
    """

    scale: float = 1.0
    threshold: float | None = None
    scaling: Scaling | None = None
    pixels: bool = False

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw values (any shape whose trailing axes are one example's) -> model inputs, float32."""
        raw = raw.to(torch.float32)
        x = (raw >= self.threshold).to(torch.float32) if self.threshold is not None else raw / self.scale
        return self.scaling.apply(x) if self.scaling is not None else x

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Model units (inputs or reconstructions) -> raw values. A binarised set's reconstruction, a
        pixel's probability of being on, comes back as that fraction of `scale`."""
        if self.scaling is not None:
            x = self.scaling.undo(x)
        return x * self.scale

    def raw(self, split: Split, positions: torch.Tensor) -> torch.Tensor:
        """Examples `positions` of `split` in raw units: through `to_model` they give the inputs the run
        evaluated on. A split holds intensities times its `pixel_scale` (binarised MNIST's evaluation
        splits their fixed binary draw); a split binarised afresh per batch gives its intensities, the
        draws' expectation."""
        stored = split.images[split.rows(positions)].to(torch.float32)
        return stored * (self.scale / split.pixel_scale)
