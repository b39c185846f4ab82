"""`python -m ae_lab [overrides]`: train one configuration (or a sweep with `-m`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ae_lab.config import ConfigError, fail, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ae_lab.report import print_summary
    from ae_lab.run import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = train(cfg, run_dir)
    except ConfigError as error:
        fail(str(error))
    print_summary(run_dir, metrics)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
