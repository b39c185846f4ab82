"""`AutoencoderTransformer`: an ae_lab run as a scikit-learn transformer (Pipeline, cross_val_score, GridSearchCV).

`fit(X)` trains through `ae_lab.run.train`, as `python -m ae_lab dataset=array dataset.path=X.npy
OVERRIDES` would: the config is composed with Hydra's compose API from the repository's `conf/` and the
estimator's parameters, and the run folder is written as usual (with X saved in it as `inputs.npy`, the
file its `dataset.path` names). The fitted estimator holds the loaded `ae_lab.TrainedModel` (`model_`)
and its folder (`run_dir_`); `ae_lab.load(run_dir_)` gives the same model back later.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ae_lab.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
# libraries whose INFO messages (the Trainer's devices, checkpoint restores, tips) a fit keeps off the console
QUIET_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric")
# what `ae_lab.load` reads of a run folder besides the checkpoint (a pickled estimator carries them)
RUN_FILES = ("run.json", ".hydra/config.yaml", "scaling.json")
PLAIN_VALUE = re.compile(r"[\w./:+-]+")  # a string Hydra's override grammar takes unquoted


@functools.lru_cache(maxsize=16)
def _composed(overrides: tuple[str, ...]) -> Any:
    from ae_lab.compose import compose_config as compose

    return compose(overrides)


def compose_config(overrides: list[str]) -> Any:
    """The config `python -m ae_lab OVERRIDES` would train (omegaconf DictConfig), composed in-process
    with Hydra's compose API (once per list of overrides in a process: a grid search composes each
    candidate once); a bad override is refused in one line (ConfigError), as on the command line."""
    return copy.deepcopy(_composed(tuple(overrides)))


def override(name: str, value: Any) -> str:
    """A parameter as Hydra's command-line override: `model__latent_dim=8` -> `model.latent_dim=8`,
    `model="vae"` -> `model=vae`; lists and tuples as `[a,b]`, None as `null`, booleans as `true`/`false`."""
    return f"{name.replace('__', '.')}={_hydra_value(value)}"


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(value.item() if isinstance(value, np.generic) else value)
    text = str(value)
    if PLAIN_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Lightning's INFO messages off the console for the fit (the command line sends them to ae_lab.log)."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class AutoencoderTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """An autoencoder trained by ae_lab, as a scikit-learn transformer.

    Parameters are ae_lab's config overrides, with `__` for the dot: `model="vae"` is `model=vae`,
    `model__latent_dim=8` is `model.latent_dim=8`, `trainer__max_epochs=20`, `loss__recon="mse"`,
    `dataset__normalize="standard"` (fitted on the training part of X). No other defaults are added: the
    config is the command line's (`conf/config.yaml`) with `dataset=array`, so e.g. `logger="none"` turns
    off the W&B record, `trainer__enable_progress_bar=False` the progress bar (Lightning's other console
    messages are kept off during a fit), and `loss.recon=bce` needs X in [0, 1]. In a Pipeline or
    GridSearchCV the keys are `step__model__latent_dim` as usual. `dataset` and `dataset__path` cannot be
    set: the data is X. A bad override is refused by `fit` in one line (ConfigError, a ValueError).

    Args:
        output_dir: the folder each fit writes its run folder in (named by the time, as `outputs/runs/`
            names the command line's); None: a new temporary folder per fit (`tempfile.mkdtemp`), kept,
            so that the run can be read and loaded later (its path is `run_dir_`).
        device: where the trained model runs (`transform`, `score_samples`, ...); training follows the
            `trainer` config.
        **overrides: config overrides, as above.

    `fit(X)` trains on X of shape (N, D) (or (N, C, T), (N, C, H, W)), in its raw units: ae_lab splits it
    into train/val/test by `dataset.val_fraction`/`dataset.test_fraction` (0.1/0.2) with `dataset.split_seed`,
    keeps the best checkpoint by val loss, and evaluates on test, as any run. y is ignored. Then
    `transform(X)` = `model_.encode(X)` (N, latent_dim), the code (the posterior mean of a VAE);
    `inverse_transform(Z)` = `model_.decode(Z)`, in X's units; `score_samples(X)` = -`model_.score(X)`
    (higher is more normal, scikit-learn's convention: minus the reconstruction error, or the ELBO of a
    VAE); `score(X)` = the mean of `score_samples`, so GridSearchCV alone picks the best held-out fit.

    scikit-learn's estimator checks (`sklearn.utils.estimator_checks`, all 47 of scikit-learn 1.9 in
    tests/test_sklearn.py) pass but one that cannot apply: `check_array_api_input` (scikit-learn skips it
    unless SCIPY_ARRAY_API is set; the model is torch's, fed numpy, so array-API namespaces are not
    used). Outputs are float32 whatever the input's dtype (tag `preserves_dtype=["float32"]`): the model
    computes in float32. Each check fits a real run, so they take about 47 fits (about 15 s of CPU time
    with the tests' two-batch config).
    Pickling carries the parameters and the files `ae_lab.load` reads of the run folder (its config,
    run.json, scaling.json and the checkpoint: kilobytes to megabytes), not the torch objects.
    """

    def __init__(self, output_dir: str | Path | None = None, device: str = "cpu", **overrides: Any) -> None:
        self.output_dir = output_dir
        self.device = device
        self._overrides = overrides

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = ["float32"]  # the model computes in float32, and returns so
        return tags

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "device": self.device, **self._overrides}

    def set_params(self, **params: Any) -> "AutoencoderTransformer":
        for name, value in params.items():
            if name in ("output_dir", "device"):
                setattr(self, name, value)
            else:
                self._overrides[name] = value
        return self

    def _run_dir(self) -> Path:
        if self.output_dir is None:
            return Path(tempfile.mkdtemp(prefix="ae_lab-sklearn-"))
        return Path(self.output_dir) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")

    def _config_overrides(self) -> list[str]:
        for name in self._overrides:
            if name == "dataset" or name.startswith("dataset__path"):
                raise ConfigError(f"{name.replace('__', '.')} cannot be set on AutoencoderTransformer: its data "
                                  "is the X given to fit (as dataset=array)")
        return ["dataset=array", *(override(name, value) for name, value in self._overrides.items())]

    def fit(self, X: Any, y: Any = None) -> "AutoencoderTransformer":
        """Train on X (y is ignored) into a new run folder; see the class docstring."""
        import shutil

        from ae_lab.run import train
        from ae_lab.trained import load

        X = validate_data(self, X, allow_nd=True, dtype=np.float32, ensure_min_samples=2)
        run_dir = self._run_dir()
        run_dir.mkdir(parents=True, exist_ok=self.output_dir is None)
        inputs = run_dir / "inputs.npy"
        try:
            np.save(inputs, X)
            cfg = compose_config(self._config_overrides())
            cfg.dataset.path = str(inputs)  # as `dataset.path=...` on the command line (composed once, see compose_config)
            with _quiet_libraries():
                train(cfg, run_dir)
        except ConfigError:  # refused before training: nothing of this fit is left
            shutil.rmtree(run_dir)
            raise
        self.model_ = load(run_dir, device=self.device)
        self.run_dir_ = run_dir
        self._n_features_out = self.model_.latent_dim
        return self

    def __getstate__(self) -> dict[str, Any]:
        """The parameters and, once fitted, the run folder's path and the files `ae_lab.load` reads
        (`RUN_FILES` and the checkpoint), not the loaded model (a LightningModule with closures does
        not pickle): unpickling loads it again, from `run_dir_` where it still holds that checkpoint,
        else from those files restored into a new temporary folder (e.g. on another machine)."""
        state = dict(self.__dict__)
        model = state.pop("model_", None)
        if model is not None:
            files = [*RUN_FILES, str(model.checkpoint.relative_to(model.run_dir))]
            state["_run_files"] = {name: (model.run_dir / name).read_bytes() for name in files
                                   if (model.run_dir / name).is_file()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from ae_lab.trained import load

        files = state.pop("_run_files", None)
        self.__dict__.update(state)
        if files is None:
            return
        checkpoint = next(name for name in files if name.startswith("checkpoints/"))
        kept = self.run_dir_ / checkpoint
        if not (kept.is_file() and kept.read_bytes() == files[checkpoint]):
            self.run_dir_ = Path(tempfile.mkdtemp(prefix="ae_lab-sklearn-"))
            for name, content in files.items():
                (self.run_dir_ / name).parent.mkdir(parents=True, exist_ok=True)
                (self.run_dir_ / name).write_bytes(content)
        self.model_ = load(self.run_dir_ / checkpoint, device=self.device)

    def _inputs(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, allow_nd=True, dtype=np.float32)

    def transform(self, X: Any) -> np.ndarray:
        """The codes of X, shape (N, latent_dim)."""
        return self.model_.encode(self._inputs(X))

    def inverse_transform(self, X: Any) -> np.ndarray:
        """The decoding of codes X (N, latent_dim), in the units of the X given to fit."""
        check_is_fitted(self)
        codes = check_array(X, dtype=np.float32)
        if codes.shape[1] != self._n_features_out:
            raise ValueError(f"X has {codes.shape[1]} features, but inverse_transform of {type(self).__name__} "
                             f"takes codes of {self._n_features_out} (model.latent_dim)")
        return self.model_.decode(codes)

    def score_samples(self, X: Any) -> np.ndarray:
        """Minus each example's anomaly score (reconstruction error, or -ELBO for a VAE): higher is more
        normal. Shape (N,)."""
        return -self.model_.score(self._inputs(X))

    def score(self, X: Any, y: Any = None) -> float:
        """The mean of `score_samples(X)` (y is ignored)."""
        return float(np.mean(self.score_samples(X)))
