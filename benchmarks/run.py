"""ae_lab's speed against baselines measured in the same run, written to benchmarks/RESULTS.md.

    python benchmarks/run.py            # the full run (a few minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # tiny sizes: checks that everything runs (used by the tests)

Every figure is a ratio against a baseline timed in the same process and run, on the same model,
data, batch size and optimizer, after warm-up steps, as the median over repeats (with the min-max
spread). Absolute numbers are given only for context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from ae_lab.config import register_configs
from ae_lab.data.base import ArrayDataModule, Split
from ae_lab.module import Autoencoder
from ae_lab.job import JobContext
from ae_lab.tracking import build_logger, package_versions

REPOSITORY = Path(__file__).resolve().parent.parent
MODELS = {"MLP AE": [], "MLP VAE": ["model=vae"], "conv VAE": ["model=vae", "model.arch=conv"]}


@dataclass
class Sizes:
    examples: int
    batch_size: int
    warmup: int
    steps: int
    repeats: int
    contractive_steps: int
    contractive_grid: tuple[tuple[tuple[int, int, int], int], ...]
    sweep_jobs: int
    startup_repeats: int


FULL = Sizes(60000, 128, 20, 150, 3, 15,
             tuple(((c, s, s), z) for (c, s) in ((1, 8), (1, 28), (3, 32)) for z in (8, 32, 128)), 8, 5)
QUICK = Sizes(512, 64, 2, 4, 1, 2, (((1, 8, 8), 4), ((1, 28, 28), 8)), 2, 1)


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPOSITORY / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def module_for(cfg: DictConfig, shape: tuple[int, ...]) -> Autoencoder:
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return Autoencoder.from_config(plain, shape)


def mnist_sized(examples: int, data_root: Path | None) -> tuple[torch.Tensor, str]:
    """uint8 images (N, 1, 28, 28): MNIST's training images when present, else seeded random pixels."""
    if data_root is not None and (data_root / "mnist").is_dir():
        from ae_lab.data.mnist import read_arrays

        arrays, _ = read_arrays(config(["dataset=mnist", f"dataset.root={data_root}"]).dataset)
        return torch.from_numpy(np.array(arrays["train_images"][:examples])).unsqueeze(1), "MNIST training images"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (examples, 1, 28, 28), generator=generator, dtype=torch.uint8)
    return images, "random 28x28 uint8 images (MNIST not found)"


class PerItem(Dataset):
    """The way most templates feed data: one Python call per example, then the default collate."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.images[index].to(torch.float32) / 255}


class PerItemData(ArrayDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(PerItem(self.splits["train"].images), batch_size=self.batch_size, shuffle=True)


class Stopwatch(pl.Callback):
    """Wall time of the training steps after `warmup` (data loading, step and logging included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def lightning_rate(cfg: DictConfig, images: torch.Tensor, sizes: Sizes, per_item: bool = False) -> float:
    """Examples/s of ae_lab's training as users run it: Lightning, progress bar, W&B offline."""
    module = module_for(cfg, tuple(images.shape[1:]))
    split = Split(images, pixel_scale=255.0)
    kind = PerItemData if per_item else ArrayDataModule
    data = kind("bench", {"train": split, "val": split, "test": split}, sizes.batch_size, 0, "")
    stopwatch = Stopwatch(sizes.warmup)
    with tempfile.TemporaryDirectory() as folder:
        settings = {**OmegaConf.to_container(cfg.trainer), "max_epochs": -1,
                    "max_steps": sizes.warmup + sizes.steps, "limit_val_batches": 0,
                    "enable_model_summary": False}
        trainer = pl.Trainer(**settings,
                             logger=build_logger(cfg, JobContext.outside_hydra(Path(folder)), 784), callbacks=[stopwatch],
                             enable_checkpointing=False,
                             use_distributed_sampler=False, inference_mode=False)
        trainer.fit(module, datamodule=data)
        import wandb

        wandb.finish()
    return sizes.steps * sizes.batch_size / (stopwatch.end - stopwatch.start)


class BareModule(pl.LightningModule):
    """ae_lab's network and objective in the smallest LightningModule: its step returns the loss (no epoch
    means, no checks), its optimizer is the module's. What Lightning itself costs per step."""

    def __init__(self, module: Autoencoder) -> None:
        super().__init__()
        self.module = module

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        logits, latent = self.module(x)
        return self.module.objective(logits, x, latent, x, self.module.objective.weights(0), create_graph=True)["loss"]

    def configure_optimizers(self) -> Any:
        return self.module.configure_optimizers()


def bare_lightning_rate(cfg: DictConfig, images: torch.Tensor, sizes: Sizes) -> float:
    """Examples/s of `BareModule` under a Trainer without logger, progress bar or callbacks of ae_lab's."""
    module = BareModule(module_for(cfg, tuple(images.shape[1:])))
    split = Split(images, pixel_scale=255.0)
    data = ArrayDataModule("bench", {"train": split, "val": split, "test": split}, sizes.batch_size, 0, "")
    stopwatch = Stopwatch(sizes.warmup)
    trainer = pl.Trainer(max_epochs=-1, max_steps=sizes.warmup + sizes.steps, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=1, callbacks=[stopwatch], use_distributed_sampler=False,
                         inference_mode=False)
    trainer.fit(module, datamodule=data)
    return sizes.steps * sizes.batch_size / (stopwatch.end - stopwatch.start)


def hand_rate(cfg: DictConfig, images: torch.Tensor, sizes: Sizes) -> float:
    """Examples/s of a minimal hand-written loop over in-memory tensors, same model and optimizer."""
    module = module_for(cfg, tuple(images.shape[1:]))
    optimizer = module.configure_optimizers()["optimizer"]
    order = torch.randperm(len(images))
    start = 0.0
    for step in range(sizes.warmup + sizes.steps):
        if step == sizes.warmup:
            start = time.perf_counter()
        first = (step * sizes.batch_size) % (len(images) - sizes.batch_size + 1)
        x = images[order[first:first + sizes.batch_size]].to(torch.float32) / 255
        logits, latent = module(x)
        loss = module.objective(logits, x, latent, x, module.objective.weights(0), create_graph=True)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sizes.steps * sizes.batch_size / (time.perf_counter() - start)


def repeated(measure: Callable[[], float], repeats: int) -> list[float]:
    return [measure() for _ in range(repeats)]


def ratio(values: list[float], baseline: list[float]) -> str:
    """median(values) / median(baseline), with the spread of the per-repeat ratios."""
    per_repeat = [v / b for v, b in zip(values, baseline)]
    middle = statistics.median(values) / statistics.median(baseline)
    if len(per_repeat) == 1:
        return f"{middle:.2f}"
    return f"{middle:.2f} ({min(per_repeat):.2f}–{max(per_repeat):.2f})"


def throughput(images: torch.Tensor, sizes: Sizes, quick: bool) -> list[str]:
    lines = ["| model | hand-written loop (examples/s) | ae_lab ÷ hand loop | bare LightningModule ÷ hand loop "
             "| per-item DataLoader ÷ ae_lab |", "|---|---|---|---|---|"]
    for name, overrides in MODELS.items():
        cfg = config([*overrides, "trainer.accelerator=cpu"])
        hand, ours, bare, per_item = [], [], [], []
        for _ in range(sizes.repeats):  # interleaved, so drift in the machine's speed hits all four
            hand.append(hand_rate(cfg, images, sizes))
            ours.append(lightning_rate(cfg, images, sizes))
            bare.append(bare_lightning_rate(cfg, images, sizes))
            per_item.append(lightning_rate(cfg, images, sizes, per_item=True))
        lines.append(f"| {name} | {statistics.median(hand):,.0f} | {ratio(ours, hand)} | {ratio(bare, hand)} "
                     f"| {ratio(per_item, ours)} |")
        print(lines[-1], flush=True)
    return lines


def options(images: torch.Tensor, sizes: Sizes, quick: bool) -> list[str]:
    """torch.compile and bf16 autocast against the default fp32 eager step, MLP VAE, through ae_lab."""
    lines = ["| option | ae_lab with it ÷ ae_lab without |", "|---|---|"]
    base = config(["model=vae", "trainer.accelerator=cpu"])
    settings = {"trainer.precision=bf16-mixed": ["trainer.precision=bf16-mixed"]}
    if not quick:
        settings["model.compile=true"] = ["model.compile=true"]
    for label, overrides in settings.items():
        plain, changed = [], []
        warm = Sizes(**{**sizes.__dict__, "warmup": max(sizes.warmup, 30)})  # compiling happens in warm-up
        for _ in range(sizes.repeats):
            plain.append(lightning_rate(base, images, warm))
            changed.append(lightning_rate(config(["model=vae", "trainer.accelerator=cpu", *overrides]), images, warm))
        lines.append(f"| `{label}` | {ratio(changed, plain)} |")
        print(lines[-1], flush=True)
    return lines


def step_seconds(cfg: DictConfig, shape: tuple[int, ...], sizes: Sizes) -> float:
    module = module_for(cfg, shape)
    optimizer = module.configure_optimizers()["optimizer"]
    x = torch.rand(sizes.batch_size, *shape)
    times = []
    for step in range(2 + sizes.contractive_steps):
        start = time.perf_counter()
        inputs = x.detach().requires_grad_(module.objective.needs_input_grad)
        logits, latent = module(inputs)
        loss = module.objective(logits, x, latent, inputs, module.objective.weights(0), create_graph=True)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def contractive(sizes: Sizes) -> list[str]:
    lines = ["| input | D | latent d_z | exact ÷ plain step | projection (1 draw) ÷ plain step |",
             "|---|---|---|---|---|"]
    for shape, latent in sizes.contractive_grid:
        common = [f"model.latent_dim={latent}", "model.hidden_dims=[256]"]
        plain = step_seconds(config(common), shape, sizes)
        exact = step_seconds(config([*common, "loss=contractive"]), shape, sizes)
        projection = step_seconds(config([*common, "loss=contractive", "loss.contractive_estimator=projection"]),
                                  shape, sizes)
        lines.append(f"| {'×'.join(map(str, shape))} | {int(np.prod(shape))} | {latent} | "
                     f"{exact / plain:.2f} | {projection / plain:.2f} |")
        print(lines[-1], flush=True)
    return lines


def cli(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run `python -m ae_lab ARGS`; return (its start time, its wall time)."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "ae_lab", *args], cwd=cwd, check=True, capture_output=True)
    return start, time.time() - start


def bare_import() -> float:
    """Wall time of `python -c "import torch, pytorch_lightning"`, the floor of any run's start-up."""
    start = time.time()
    subprocess.run([sys.executable, "-c", "import torch, pytorch_lightning"], check=True)
    return time.time() - start


def first_step(args: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds from launch to the first training step, wall time) of one `python -m ae_lab ARGS` run."""
    launched, wall = cli(args, cwd)
    [run] = [path for path in (cwd / "outputs" / "runs").iterdir() if not path.name.startswith("done-")]
    to_first = json.loads((run / "run.json").read_text())["timings"]["first_step_unix"] - launched
    run.rename(run.with_name(f"done-{run.name}"))
    return to_first, wall


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else f"{values[0]:.2f}"


def startup_and_sweep(sizes: Sizes) -> list[str]:
    """The default run (one epoch: the same start-up) to its first step and `--help`, each repeat beside a
    bare import of torch and Lightning, interleaved; then a sweep's cost per job beyond its training."""
    default = ["trainer.max_epochs=1"] + (["trainer=debug"] if sizes is QUICK else [])
    quick_run = ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=1",
                 "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]
    bare, to_first, walls, helps, loads = [], [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        for _ in range(sizes.startup_repeats):
            loads.append(os.getloadavg()[0])
            bare.append(bare_import())
            step, wall = first_step(default, cwd)
            to_first.append(step)
            walls.append(wall)
            helps.append(cli(["--help"], cwd)[1])
        seeds = ",".join(str(seed) for seed in range(sizes.sweep_jobs))
        launched, wall = cli(["-m", f"seed={seeds}", *quick_run, "logger=none"], cwd)
        records = [json.loads(p.read_text()) for p in (cwd / "outputs" / "sweeps").glob("*/*/run.json")]
        fits = [record["timings"]["fit_seconds"] for record in records]
        sweep_first = min(record["timings"]["first_step_unix"] for record in records) - launched
    beyond = (wall - sweep_first - sum(fits)) / len(fits)
    return [f"{len(bare)} interleaved repeats; load average (1 min) at each: {', '.join(f'{load:.1f}' for load in loads)}.",
            "", "| measure | ratio | seconds, for context: median (min–max) |", "|---|---|---|",
            f"| `python -m ae_lab {' '.join(default)}` (digits, W&B offline) to its first training step ÷ "
            f"`python -c 'import torch, pytorch_lightning'` | {ratio(to_first, bare)} | {spread(to_first)} vs "
            f"{spread(bare)} |",
            f"| `python -m ae_lab --help` | | {spread(helps)} |",
            f"| the same run's whole wall time (one epoch, test, evaluation, W&B) | | {spread(walls)} |",
            f"| in-process sweep of {len(fits)} tiny jobs: wall time per job beyond its training ÷ its "
            f"training time | {beyond / statistics.mean(fits):.2f} | {beyond:.2f} vs {statistics.mean(fits):.2f} |"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    versions = package_versions()
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; Python "
            f"{versions['python']}, torch {versions['torch']}, pytorch-lightning {versions['pytorch-lightning']}; "
            f"torch threads {torch.get_num_threads()}; device: "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")


SECTIONS = {"throughput": "Training throughput", "options": "Options", "contractive": "Contractive penalty",
            "startup": "Start-up and sweeps"}


def _sections(text: str) -> dict[str, list[str]]:
    """The `## ` sections of a RESULTS.md: title -> its lines after the heading."""
    found: dict[str, list[str]] = {}
    for part in text.split("\n## ")[1:]:
        title, *lines = part.split("\n")
        found[title] = lines
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    parser.add_argument("--data-root", type=Path, default=REPOSITORY.parent / "shared" / "data",
                        help="folder holding mnist/ (default: ../shared/data)")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "benchmarks" / "RESULTS.md")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="measure only these sections; the output's other sections are kept as they are")
    args = parser.parse_args()
    register_configs()
    os.environ.setdefault("WANDB_SILENT", "true")
    sizes = QUICK if args.quick else FULL
    pl.seed_everything(0, verbose=False)
    images, source = mnist_sized(sizes.examples, args.data_root)
    began = time.time()
    measures = {"throughput": lambda: throughput(images, sizes, args.quick),
                "options": lambda: options(images, sizes, args.quick),
                "contractive": lambda: contractive(sizes), "startup": lambda: startup_and_sweep(sizes)}
    sections = {SECTIONS[name]: measures[name]() for name in args.sections}
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    if args.sections != list(SECTIONS):
        command += " --sections " + " ".join(args.sections)
    text = [
        "# ae_lab benchmarks", "",
        f"Command: `{command}` ({time.time() - began:.0f} s). Machine: {machine()}.", "",
        f"Data: {source}, {len(images):,} of them, batch size {sizes.batch_size}, Adam; "
        f"{sizes.warmup} warm-up steps, then {sizes.steps} timed steps, {sizes.repeats} repeats: each figure is "
        "the ratio of the medians, with the range of the per-repeat ratios in brackets.", "",
        "**GPU figures are still to come**: no GPU was lent to the session that ran this.", "",
    ]
    notes = {
        "Training throughput": "ae_lab: `Trainer.fit` as `python -m ae_lab` runs it (Lightning, progress bar, "
        "W&B offline logger, in-memory batches sliced with one indexing operation). Hand-written loop: the same "
        "module's forward and objective, Adam, batches sliced from an in-memory tensor, no framework. Bare "
        "LightningModule: the same network, objective and batches in a module whose step only returns the loss, "
        "under a Trainer without logger, progress bar or callbacks: what Lightning itself costs. Per-item "
        "DataLoader: the same Lightning run fed by a `Dataset` with one `__getitem__` per example and the "
        "default collate.",
        "Options": "The MLP VAE through ae_lab with the option against without it, same run.",
        "Contractive penalty": "Median time of one training step (batch of random inputs, MLP encoder with one "
        "hidden layer of 256) with the exact penalty (one vector-Jacobian product per latent unit) or the "
        "one-draw random-projection estimator, against the same step without the penalty.",
        "Start-up and sweeps": "Wall-clock times of real `python -m ae_lab` processes on digits: the default "
        "run (one epoch instead of 100, which changes nothing before its first step; `run.json`'s "
        "`first_step_unix` less the launch time) and `--help`, each repeat beside a bare import of torch and "
        "Lightning; the sweep's jobs train 5 batches.",
    }
    kept = _sections(args.output.read_text()) if args.output.exists() and args.sections != list(SECTIONS) else {}
    if kept:  # the header of the run that measured the kept sections stays; this run's command is said per section
        text = [*args.output.read_text().split("\n## ", 1)[0].splitlines(), ""]
    for title in SECTIONS.values():
        if title in sections:
            measured = [f"Measured by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", ""] if kept else []
            text += [f"## {title}", "", *measured, notes[title], "", *sections[title], ""]
        elif title in kept:
            text += [f"## {title}", *kept[title]]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(text))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
