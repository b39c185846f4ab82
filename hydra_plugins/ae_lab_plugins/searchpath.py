"""Puts the repository root on Hydra's config search path, so the ready sweeps in `sweeps/` are the
config group `sweeps`: `python -m ae_lab -m +sweeps=vae_latent_beta`, from any working directory."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

import ae_lab

REPOSITORY = Path(ae_lab.__file__).resolve().parent.parent


class AeLabSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if (REPOSITORY / "sweeps").is_dir():
            search_path.append(provider="ae_lab-sweeps", path=f"file://{REPOSITORY}")
