"""The config `python -m ae_lab OVERRIDES` would train, composed in this process with Hydra's compose API
(for the scikit-learn estimator and the tests; the command line composes through `@hydra.main`)."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig

from ae_lab.errors import ConfigError
from ae_lab.paths import CONF


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The composed config of `overrides`; a bad override is refused in one line (ConfigError), as on
    the command line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    from ae_lab.composition_errors import explain
    from ae_lab.config import register_configs

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (ConfigCompositionException, OmegaConfBaseException) as error:
        raise ConfigError(explain(error) or str(error).splitlines()[0]) from None
