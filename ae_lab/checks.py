"""The checks Hydra's types cannot express: ranges and combinations of config values, and keys added
with `+` that are not ae_lab's.

`validate` runs before anything is trained or written and raises `ConfigError` naming the key and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ae_lab.errors import ConfigError
from ae_lab.trainer_check import check_trainer, limited_batches


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(key, the keys allowed beside it) for every key of `node` that its schema does not have. Hydra's
    `+key=value` adds a key even to a typed config, so a misspelt `+model.latnt_dim=3` would otherwise
    train with the default latent size. Nodes typed as free dictionaries (e.g. `dataset.kwargs`) may
    hold any key; Hydra's own node (`hydra`, in a config with it) is Hydra's to check."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    known = [field.name for field in dataclasses.fields(schema)]
    found = []
    for key in node:
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            found.append((f"{prefix}{key}", [f"{prefix}{name}" for name in known]))
        elif isinstance(child := node._get_node(key), DictConfig):
            found += _unknown_keys(child, f"{prefix}{key}.")
    return found


def validate(cfg: DictConfig, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Check ranges and combinations; raise ConfigError on the first bad value.

    `input_shape` (one example's shape: (C, H, W), (C, T) or (D,)), when known, lets the conv depth and
    the noise kind be checked against the data; a user's own data (`dataset=array`, ...) are read and
    checked here too (ae_lab.data.own_data), so that a bad file is refused before anything is written.
    Returns warnings for settings that are allowed but probably not meant.
    """
    _refuse_unknown_keys(cfg)
    _validate_model(cfg, input_shape)
    _validate_loss(cfg)
    _validate_noise(cfg, input_shape)
    _validate_dataset(cfg.dataset)
    from ae_lab.data import is_own_data

    if is_own_data(cfg.dataset):
        _validate_own_data(cfg)
    _validate_optim(cfg.optim)
    _validate_trainer(cfg.trainer)
    _validate_eval(cfg.eval)
    _require(cfg.checkpoint_every_n_steps >= 0, "checkpoint_every_n_steps", cfg.checkpoint_every_n_steps,
             "an integer >= 0 (0: checkpoint only after validations)")
    _validate_logger(cfg.logger)

    warnings = check_trainer(cfg.trainer)  # every value Lightning's Trainer refuses, asked of Lightning
    if cfg.loss.beta > 0 and cfg.model.latent == "deterministic":
        warnings.append(f"loss.beta={cfg.loss.beta} has no effect: there is no KL term without "
                        "model.latent=gaussian (e.g. model=vae)")
    return warnings


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    for key, known in _unknown_keys(cfg):
        close = difflib.get_close_matches(key, known, n=1)
        raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r} is not a key of ae_lab's config: "
                          + (f"did you mean {close[0]}?" if close else f"the keys there are {', '.join(known)}"))


def _validate_model(cfg: DictConfig, input_shape: tuple[int, ...] | None) -> None:
    """The network's sizes (against the data's shape when known) and its output against the likelihood."""
    model, loss, data = cfg.model, cfg.loss, cfg.dataset
    _require(model.latent_dim >= 1, "model.latent_dim", model.latent_dim, "an integer >= 1")
    _require(all(d >= 1 for d in model.hidden_dims), "model.hidden_dims", list(model.hidden_dims),
             "a list of integers >= 1")
    _require(len(model.channels) >= 1 and all(c >= 1 for c in model.channels), "model.channels",
             list(model.channels), "a non-empty list of integers >= 1")
    _require(2 <= model.kernel_size <= 7, "model.kernel_size", model.kernel_size, "an integer from 2 to 7")
    _require(all(d >= 1 for d in model.fc_dims), "model.fc_dims", list(model.fc_dims),
             "a list of integers >= 1")
    if input_shape is not None and model.arch == "conv":
        _require(len(input_shape) in (2, 3), "model.arch", "conv",
                 f"model.arch=mlp for examples of shape {tuple(input_shape)}: conv nets need (C, T) sequences "
                 "(1-D convolutions) or (C, H, W) images (2-D)")
        from ae_lab.nets import conv_sizes

        spatial = list(input_shape[1:])
        sizes = conv_sizes(min(spatial), len(model.channels), model.kernel_size)
        # every stride-2 layer needs an input side >= 2
        deepest = next((depth for depth, side in enumerate(sizes) if side < 2), len(model.channels))
        kind = "images" if len(spatial) == 2 else "sequences"
        _require(len(model.channels) <= deepest, "model.channels", list(model.channels),
                 f"at most {deepest} stride-2 conv layers with kernel_size={model.kernel_size} for "
                 f"{'x'.join(map(str, spatial))} {kind} of dataset={data.name}")
    if model.output == "linear":
        _require(loss.recon == "mse", "model.output", "linear",
                 "model.output=sigmoid with loss.recon=bce (a Bernoulli likelihood needs outputs in (0, 1)), "
                 "or loss.recon=mse")


def _validate_loss(cfg: DictConfig) -> None:
    """The loss weights, the regimes (`_validate_regimes`) and the terms' needs of the model."""
    model, loss = cfg.model, cfg.loss
    _require(loss.beta >= 0, "loss.beta", loss.beta, "a number >= 0")
    _require(loss.sparsity_weight >= 0, "loss.sparsity_weight", loss.sparsity_weight, "a number >= 0")
    _require(0 < loss.sparsity_target < 1, "loss.sparsity_target", loss.sparsity_target,
             "a rate strictly between 0 and 1")
    _require(loss.contractive_weight >= 0, "loss.contractive_weight", loss.contractive_weight,
             "a number >= 0")
    _require(loss.contractive_projections >= 1, "loss.contractive_projections",
             loss.contractive_projections, "an integer >= 1")
    _validate_regimes(cfg)
    if model.compile:
        _require(loss.contractive_weight == 0, "model.compile", True,
                 "false with the contractive penalty (torch.compile does not support the double backward "
                 "it needs)")
    if loss.sparsity == "kl" and loss.sparsity_weight > 0:
        _require(model.code_activation == "sigmoid" and model.latent == "deterministic",
                 "loss.sparsity", "kl",
                 "KL sparsity needs code activations in (0, 1): use model.code_activation=sigmoid "
                 "with model.latent=deterministic, or loss.sparsity=l1")


def _validate_noise(cfg: DictConfig, input_shape: tuple[int, ...] | None) -> None:
    noise, data = cfg.noise, cfg.dataset
    if noise.kind == "gaussian":
        _require(noise.std >= 0, "noise.std", noise.std, "a standard deviation >= 0")
    elif noise.kind in ("masking", "salt_pepper"):
        _require(0 <= noise.p <= 1, "noise.p", noise.p, "a probability in [0, 1]")
    elif noise.kind == "occlusion":
        _require(0 <= noise.size <= 1, "noise.size", noise.size, "a fraction of each side in [0, 1]")
    elif noise.kind == "watermark":
        _require(0 <= noise.opacity <= 1, "noise.opacity", noise.opacity, "an opacity in [0, 1]")
    elif noise.kind == "grayscale":
        _require(0 <= noise.amount <= 1, "noise.amount", noise.amount, "a weight in [0, 1] (1: fully grey)")
        if input_shape is not None:
            _require(len(input_shape) == 3 and input_shape[0] == 3, "noise", "grayscale",
                     f"only on RGB images (3, H, W); the examples of dataset={data.name} have shape "
                     f"{tuple(input_shape)}: choose another noise")


def _validate_optim(optim: DictConfig) -> None:
    _require(optim.lr > 0, "optim.lr", optim.lr, "a learning rate > 0")
    _require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "a number >= 0")
    _require(optim.eps > 0, "optim.eps", optim.eps, "a number > 0")
    milestones = list(optim.milestones)
    _require(all(m >= 1 for m in milestones) and milestones == sorted(set(milestones)), "optim.milestones",
             milestones, "strictly increasing epoch numbers >= 1")
    _require(0 < optim.gamma <= 1, "optim.gamma", optim.gamma, "a factor in (0, 1]")


def _validate_trainer(trainer: DictConfig) -> None:
    """The trainer keys whose ranges ae_lab sets (Lightning checks the rest: `check_trainer`)."""
    _require(trainer.max_epochs >= 1 or trainer.max_epochs == -1, "trainer.max_epochs",
             trainer.max_epochs, "an integer >= 1, or -1 for no limit")
    _require(trainer.max_steps >= -1, "trainer.max_steps", trainer.max_steps, "an integer >= 0, or -1 for no limit")
    _require(trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
             trainer.accumulate_grad_batches, "an integer >= 1")
    clip = trainer.gradient_clip_val
    _require(clip is None or (isinstance(clip, (int, float)) and clip >= 0), "trainer.gradient_clip_val",
             clip, "null or a number >= 0")


def _validate_logger(logger: DictConfig) -> None:
    if logger.kind == "wandb":
        _require(logger.mode in ("offline", "online", "disabled"), "logger.mode", logger.mode,
                 "one of offline, online, disabled")
        if logger.mode == "online":
            _require(_wandb_key_available(), "logger.mode", "online",
                     "no W&B API key found: run `wandb login` or set WANDB_API_KEY, "
                     "or keep logger.mode=offline and `wandb sync` the run later")


def _validate_schedule(key: str, schedule: DictConfig) -> None:
    if schedule.kind == "constant":
        return
    _require(schedule.steps >= 1, f"{key}.steps", schedule.steps, "an integer >= 1 (the schedule's length in steps)")
    _require(schedule.start >= 0, f"{key}.start", schedule.start, "a weight >= 0")
    if schedule.kind == "cyclical":
        _require(1 <= schedule.cycles <= schedule.steps, f"{key}.cycles", schedule.cycles,
                 f"an integer from 1 to {key}.steps={schedule.steps}")
        _require(0 < schedule.rise <= 1, f"{key}.rise", schedule.rise,
                 "the fraction of each cycle spent rising, in (0, 1]")
    if schedule.kind == "capacity":
        _require(schedule.capacity >= 0, f"{key}.capacity", schedule.capacity, "a number of nats >= 0")


def _validate_regimes(cfg: DictConfig) -> None:
    """Schedules, free bits, beta-TCVAE and greedy pretraining: ranges, and where each makes sense."""
    model, loss = cfg.model, cfg.loss
    gaussian = model.latent == "gaussian"
    _validate_schedule("loss.beta_schedule", loss.beta_schedule)
    _validate_schedule("loss.sparsity_schedule", loss.sparsity_schedule)
    _require(loss.sparsity_schedule.kind != "capacity", "loss.sparsity_schedule.kind", "capacity",
             "constant, linear or cyclical (capacity is a form of the KL term: loss.beta_schedule.kind=capacity)")
    _require(loss.free_bits >= 0, "loss.free_bits", loss.free_bits, "a number of nats per latent unit >= 0")
    for key in ("tc_alpha", "tc_gamma"):
        _require(loss[key] >= 0, f"loss.{key}", loss[key], "a weight >= 0")
    needs_head = [(loss.free_bits > 0, "loss.free_bits", loss.free_bits),
                  (loss.beta_schedule.kind == "capacity", "loss.beta_schedule.kind", "capacity"),
                  (loss.kl == "tc", "loss.kl", "tc")]
    for active, key, value in needs_head:
        _require(not active or gaussian, key, value,
                 "only with a Gaussian latent head (model=vae or model.latent=gaussian): it acts on the KL term")
    chosen = [(key, value) for active, key, value in needs_head if active]
    if len(chosen) > 1:
        (first, first_value), (key, value) = chosen[:2]
        _require(False, key, value, f"one form of the KL term at a time, and {first}={first_value!r} is set too")
    if model.pretrain == "greedy":
        _require(model.arch == "mlp", "model.pretrain", "greedy",
                 "only with model.arch=mlp (greedy layer-wise pretraining of conv encoders is not supported)")
        _require(not gaussian, "model.pretrain", "greedy",
                 "only with a deterministic latent head (model.latent=deterministic): the layer-wise "
                 "autoencoders are deterministic")
        _require("ddp" not in str(cfg.trainer.strategy), "model.pretrain", "greedy",
                 f"not with trainer.strategy={cfg.trainer.strategy} (each greedy phase leaves most parameters "
                 "without a gradient, which DDP's gradient reduction does not allow): train on one device")
        _require(model.epochs_per_layer >= 1, "model.epochs_per_layer", model.epochs_per_layer, "an integer >= 1")
        pretraining = model.epochs_per_layer * (len(model.hidden_dims) + 1)
        max_epochs = cfg.trainer.max_epochs
        _require(max_epochs == -1 or max_epochs > pretraining, "trainer.max_epochs", max_epochs,
                 f"more than the {pretraining} pretraining epochs of model.pretrain=greedy "
                 f"({len(model.hidden_dims) + 1} layers x model.epochs_per_layer={model.epochs_per_layer}), "
                 "so that the joined network is fine-tuned")


def schedule_warnings(cfg: DictConfig, train_size: int) -> list[str]:
    """Schedules that would not finish within the run (allowed: the run ends part-way through)."""
    trainer = cfg.trainer
    batches = math.ceil(train_size / cfg.dataset.batch_size)
    batches = limited_batches(batches, trainer.limit_train_batches)
    per_epoch = max(batches // trainer.accumulate_grad_batches, 1)
    total = [trainer.max_steps] if trainer.max_steps > 0 else []
    total += [trainer.max_epochs * per_epoch] if trainer.max_epochs > 0 else []
    if not total:
        return []
    run_steps = min(total)
    warnings = []
    for key, schedule, on in (("loss.beta_schedule", cfg.loss.beta_schedule, cfg.model.latent == "gaussian"),
                              ("loss.sparsity_schedule", cfg.loss.sparsity_schedule, cfg.loss.sparsity_weight > 0)):
        if on and schedule.kind != "constant" and schedule.steps > run_steps:
            warnings.append(f"{key}.steps={schedule.steps} is longer than the run ({run_steps} training steps): "
                            f"the {schedule.kind} schedule will not reach its end")
    return warnings


def _validate_dataset(data: DictConfig) -> None:
    _require(data.batch_size >= 1, "dataset.batch_size", data.batch_size, "an integer >= 1")
    _require(data.num_workers >= 0, "dataset.num_workers", data.num_workers, "an integer >= 0")
    if "val_fraction" in data:
        for key in ("val_fraction", "test_fraction"):
            _require(0 < data[key] < 1, f"dataset.{key}", data[key], "a fraction strictly between 0 and 1")
        _require(data.val_fraction + data.test_fraction < 1, "dataset.val_fraction", data.val_fraction,
                 f"val_fraction + test_fraction < 1 (test_fraction={data.test_fraction})")
    from ae_lab.data import classes
    from ae_lab.data.mnist import TRAIN_IMAGES
    from ae_lab.data.shapes import NUM_IMAGES

    if "val_size" in data:
        _require(1 <= data.val_size < TRAIN_IMAGES, "dataset.val_size", data.val_size,
                 f"between 1 and {TRAIN_IMAGES - 1:,} of the {TRAIN_IMAGES:,} training images")
    if data.get("held_out_class") is not None:
        known = classes(data)  # None: a user's data, whose labels are read later
        labels = "a label of the data" if known is None else f"a class label {known[0]}-{known[-1]}"
        _require(isinstance(data.held_out_class, int) and (known is None or data.held_out_class in known),
                 "dataset.held_out_class", data.held_out_class,
                 f"null or {labels} (left out of training and validation; the test split keeps it)")
    if "download_timeout" in data:
        _require(data.download_timeout > 0, "dataset.download_timeout", data.download_timeout,
                 "a number of seconds > 0")
    if "subsample" in data and data.subsample is not None:
        _require(isinstance(data.subsample, int) and 10 <= data.subsample <= NUM_IMAGES, "dataset.subsample",
                 data.subsample, f"null (all {NUM_IMAGES:,} images) or an integer in [10, {NUM_IMAGES}]")


def _validate_own_data(cfg: DictConfig) -> None:
    """What a user's data (read and checked by ae_lab.data) must have for this config."""
    import torch

    from ae_lab.data import own_data

    data = own_data(cfg.dataset)
    held_out = cfg.dataset.get("held_out_class")
    train = data.splits["train"]
    if held_out is not None:
        _require(train.labels is not None, "dataset.held_out_class", held_out,
                 "null: the data have no labels to hold a class out by")
        present = sorted(set(train.labels[train.rows(torch.arange(len(train)))].tolist()))
        _require(held_out in present, "dataset.held_out_class", held_out, f"one of the training labels {present}")
        _require(len(present) >= 2, "dataset.held_out_class", held_out,
                 f"null: the training split has only label {present} (nothing would be left to train on)")
    scaling = data.scaling
    if scaling is None:
        return
    scaled = f"[{scaling.scaled_low:.4g}, {scaling.scaled_high:.4g}]"
    where = f"the training data (dataset.normalize={scaling.kind}) lie in {scaled}"
    inside = scaling.scaled_low >= 0 and scaling.scaled_high <= 1
    if cfg.loss.recon == "bce":
        _require(inside, "loss.recon", "bce", f"{where}, and bce needs data in [0, 1]: use dataset.normalize=minmax, "
                 "or loss.recon=mse with model.output=linear")
    elif cfg.model.output == "sigmoid":
        _require(inside, "model.output", "sigmoid", f"{where}, beyond the sigmoid's (0, 1): use model.output=linear, "
                 "or dataset.normalize=minmax")


def _validate_eval(ev: DictConfig) -> None:
    for key in ("batch_size", "max_decode_batch", "num_reconstructions", "num_samples",
                "traversal_steps", "interpolation_steps", "gmm_components", "gmm_train_size",
                "fd_classifier_epochs"):
        _require(ev[key] >= 1, f"eval.{key}", ev[key], "an integer >= 1")
    for key in ("iw_samples", "probe_train_size", "disentanglement_pool", "disentanglement_train_size",
                "disentanglement_test_size", "jacobian_examples", "traversal_dims"):
        _require(ev[key] >= 0, f"eval.{key}", ev[key], "an integer >= 0 (0 switches it off)")
    _require(ev.fd_samples == 0 or ev.fd_samples >= 2, "eval.fd_samples", ev.fd_samples,
             "0 (no Fréchet distances) or an integer >= 2 (a covariance needs two samples)")
    _require(ev.gmm_components <= ev.gmm_train_size, "eval.gmm_components", ev.gmm_components,
             f"at most eval.gmm_train_size={ev.gmm_train_size}, the codes the mixture is fitted on")
    _require(len(ev.fd_classifier_hidden) >= 1 and all(d >= 1 for d in ev.fd_classifier_hidden),
             "eval.fd_classifier_hidden", list(ev.fd_classifier_hidden), "a non-empty list of integers >= 1")
    _require(ev.test_examples is None or (isinstance(ev.test_examples, int) and ev.test_examples >= 2),
             "eval.test_examples", ev.test_examples, "null (the whole test split) or an integer >= 2")
    for key in ("active_unit_threshold", "near_zero", "traversal_range"):
        _require(ev[key] > 0, f"eval.{key}", ev[key], "a number > 0")


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
