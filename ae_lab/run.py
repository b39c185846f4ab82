"""One run: check config -> seed -> data -> module -> trainer -> fit -> test -> write results.

Results go into the run folder: `run.json` (record), `metrics.json` (final train/val/test metrics,
flat `split/name` keys), `checkpoints/` (`last.ckpt`, `best.ckpt` by val/loss), `figures/`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ae_lab.config import validate
from ae_lab.data import build_datamodule, input_shape
from ae_lab.figures import image_rows
from ae_lab.module import Autoencoder
from ae_lab.tracking import RunRecord, build_logger, finish_logger, write_json

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per loop: noise, not news.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

MODULE_SECTIONS = ("model", "loss", "noise", "optim")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Train and evaluate one configuration into `run_dir`; return the final metrics.

    Raises ConfigError before anything is written when the config is bad.
    """
    for warning in validate(cfg, input_shape(cfg.dataset)):
        log.warning(warning)
    data = build_datamodule(cfg.dataset)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_dir, cfg, data.name, data.checksum)
    logger = None
    try:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        module = Autoencoder({key: plain[key] for key in MODULE_SECTIONS}, data.input_shape)
        logger = build_logger(cfg, run_dir)
        checkpoints = pl.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
            save_top_k=1, save_last=True, enable_version_counter=False)
        trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer), logger=logger,
                             callbacks=[checkpoints], default_root_dir=str(run_dir),
                             inference_mode=False)  # the contractive term needs grads in evaluation
        trainer.fit(module, datamodule=data)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("train/")}
        # val and test both with the best weights, so the two splits describe the same model
        for results in (trainer.validate(module, datamodule=data, ckpt_path="best", verbose=False),
                        trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)):
            metrics.update({key: float(value) for key, value in results[0].items()})
        metrics["epochs"] = trainer.current_epoch
        if trainer.is_global_zero:
            write_json(run_dir / "metrics.json", dict(sorted(metrics.items())))
            test = data.splits["test"]
            shown = test.batch(torch.arange(min(cfg.num_reconstructions, len(test))))["x"]
            save_reconstructions(module, shown, run_dir / "figures" / "reconstructions.png")
            record.update(best_checkpoint=checkpoints.best_model_path or None)
            record.completed()
        return metrics
    except BaseException as error:
        record.failed(error)
        raise
    finally:
        finish_logger(logger)


def save_reconstructions(module: Autoencoder, inputs: torch.Tensor, path: Path) -> Path:
    module.eval()
    outputs = module.reconstruct(inputs.to(module.device))
    return image_rows({"input": inputs, "reconstruction": outputs}, path,
                      title="Test inputs (top) and their reconstructions (bottom)")
