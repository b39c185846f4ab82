"""The ensemble's training step against a hand-written stacked step for the same model, side by side.

    python benchmarks/ensemble_step.py [--device cpu|cuda] [--quick] [--output benchmarks/VECTORIZED.md]

For the digits MLP AE (64-256-128-16) and the MNIST 784-400-40 MLP VAE at M = 4, 16, 64 members: the
ensemble's `GroupTrainer._step` on configs composed by Hydra (members differ by seed), and a hand-written
step over the same weights stacked as (M, in, out) tensors: `torch.baddbmm`, ReLU, BCE with logits (and
the Gaussian KL for the VAE), `torch.optim.Adam(fused=True)` over the stacked tensors. The two are timed
alternately in one process (blocks of steps, the median block), after the benchmark has checked that the
hand-written step's first loss equals the ensemble's, member by member. The inputs are uniform random
pixels of the data set's shape (a step's cost does not depend on the values). GFLOP/s count the matrix
products only (6 M B sum(in * out) a step: forward, and backward for inputs and weights), beside the
`bmm` roofline: the same products (shapes and transposes) timed alone with `torch.bmm`.

With `--output`, the results replace this benchmark's section of that Markdown file (or are appended).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import config  # noqa: E402 - benchmarks/run.py

from ae_lab.config import register_configs  # noqa: E402
from ae_lab.ensemble.group import GroupTrainer, Member  # noqa: E402
from ae_lab.ensemble.streams import MemberStreams  # noqa: E402

SECTION = "## The ensemble's training step against a hand-written stacked step"


@dataclass
class Case:
    name: str
    overrides: list[str]
    input_shape: tuple[int, ...]
    train_size: int


CASES = [
    Case("digits MLP AE (64-256-128-16)", [], (1, 8, 8), 1437),
    Case("MNIST MLP VAE (784-400-40)", ["dataset=mnist", "dataset.download=false", "model=vae",
                                        "model.hidden_dims=[400]", "model.latent_dim=40"], (1, 28, 28), 60000),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class HandStep:
    """The hand-written stacked step of an MLP AE or VAE (ReLU between layers, BCE from logits, the
    Gaussian KL with weight `beta`), starting from the ensemble's member weights."""

    def __init__(self, trainer: GroupTrainer, beta: float, lr: float, eps: float) -> None:
        params = trainer.ensemble.unflatten(trainer.ensemble.flat.detach())
        weights = [name for name in params if name.endswith(".weight")]

        def stacked(name: str) -> tuple[torch.Tensor, torch.Tensor]:  # (M, in, out), (M, 1, out)
            return (params[name].transpose(1, 2).contiguous().requires_grad_(True),
                    params[name.replace(".weight", ".bias")].unsqueeze(1).contiguous().requires_grad_(True))

        self.layers = [stacked(name) for name in weights]
        self.head = [i for i, name in enumerate(weights) if name.startswith("head.")][0]
        self.gaussian = trainer.ensemble.base.objective.gaussian_head
        self.beta = beta
        self.optimizer = torch.optim.Adam([t for layer in self.layers for t in layer], lr=lr, eps=eps, fused=True)

    def loss(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Each member's loss (M,) on its batch x (M, B, ...); `noise` (M, B, latent) for the VAE."""
        members, batch = x.shape[:2]
        target = x.reshape(members, batch, -1)
        h = target
        kl = 0.0
        for index, (weight, bias) in enumerate(self.layers):
            h = torch.baddbmm(bias, h, weight)
            if index == self.head:
                if self.gaussian:
                    mean, logvar = h.chunk(2, dim=-1)
                    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(2).mean(1)
                    h = mean + torch.exp(0.5 * logvar) * noise
            elif index < len(self.layers) - 1:
                h = h.relu()
        recon = F.binary_cross_entropy_with_logits(h, target, reduction="none").sum(2).mean(1)
        return recon + self.beta * kl if self.gaussian else recon

    def step(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.gaussian and noise is None:
            noise = torch.randn(*x.shape[:2], self.layers[self.head][0].shape[2] // 2, device=x.device)
        loss = self.loss(x, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        self.optimizer.step()
        return loss.detach()


def group_trainer(case: Case, members: int, device: torch.device, folder: Path,
                  data_root: Path) -> GroupTrainer:
    """The ensemble of `members` seeds of `case`, its data module replaced by what `_step` reads of it."""
    root = [f"dataset.root={data_root}"] if "dataset=mnist" in case.overrides else []
    cfgs = [config([*case.overrides, *root, f"seed={seed}", "logger=none"])
            for seed in range(members)]
    data = SimpleNamespace(input_shape=case.input_shape, splits={"train": range(case.train_size)},
                           batch_size=cfgs[0].dataset.batch_size)
    return GroupTrainer([Member(c, folder / str(i)) for i, c in enumerate(cfgs)], data, folder / "g.pt", device)


def first_losses(trainer: GroupTrainer, hand: HandStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both steps' first losses per member, the hand step given the very noise each member's stream draws."""
    ensemble = trainer.ensemble
    states = list(ensemble.streams.states)
    terms, _ = ensemble.train_terms(x, 0)  # records the step's draws (its plan) and advances the streams
    plan = next(iter(ensemble._plans.values()))
    drawn = MemberStreams(states).draw(plan, range(len(states)))
    return terms["loss"].detach(), hand.loss(x, drawn[0] if drawn else None).detach()


def block_seconds(step: Callable[[], object], steps: int, device: torch.device) -> float:
    """Seconds a step over a block of `steps`: on a CPU the process's CPU time (what a step costs, without
    the waits of a machine shared with other work; one torch thread, see `--threads`), on a GPU wall time."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    synchronize(device)
    started = clock()
    for _ in range(steps):
        step()
    synchronize(device)
    return (clock() - started) / steps


def bmm_roofline(shapes: list[tuple[int, int]], members: int, batch: int, device: torch.device,
                 repeats: int) -> float:
    """GFLOP/s of `torch.bmm` alone on a step's products: per layer (in, out), the forward
    (M,B,in)x(M,in,out), the input gradient (M,B,out)x(M,out,in) and the weight gradient (M,in,B)x(M,B,out)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    products = []
    for fan_in, fan_out in shapes:
        products += [(rand(members, batch, fan_in), rand(members, fan_in, fan_out)),
                     (rand(members, batch, fan_out), rand(members, fan_out, fan_in)),
                     (rand(members, fan_in, batch), rand(members, batch, fan_out))]

    def run() -> None:
        for a, b in products:
            torch.bmm(a, b)

    block_seconds(run, 3, device)
    seconds = statistics.median(block_seconds(run, 5, device) for _ in range(repeats))
    return step_flops(shapes, members, batch) / seconds / 1e9


def step_flops(shapes: list[tuple[int, int]], members: int, batch: int) -> float:
    return 6.0 * members * batch * sum(fan_in * fan_out for fan_in, fan_out in shapes)


def measure(case: Case, members: int, device: torch.device, data_root: Path, steps: int,
            repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        trainer = group_trainer(case, members, device, Path(folder), data_root)
        cfg = trainer.configs[0]
        hand = HandStep(trainer, cfg["loss"]["beta"], cfg["optim"]["lr"], cfg["optim"]["eps"])
        batch = trainer.data.batch_size
        generator = torch.Generator().manual_seed(1)
        batches = [torch.rand(members, batch, *case.input_shape, generator=generator).to(device) for _ in range(4)]
        ours, theirs = first_losses(trainer, hand, batches[0])
        if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"{case.name}, M={members}: first losses differ: ensemble {ours.tolist()}, "
                                 f"hand-written {theirs.tolist()}")
        counter = iter(range(10 ** 9))

        def ensemble_step() -> None:
            trainer._step(batches[next(counter) % len(batches)])

        def hand_step() -> None:
            hand.step(batches[next(counter) % len(batches)])

        for step in (ensemble_step, hand_step):  # warm-up
            block_seconds(step, 3, device)
        times: dict[str, list[float]] = {"ensemble": [], "hand": []}
        for _ in range(repeats):  # interleaved: each block of one is followed by a block of the other
            times["ensemble"].append(block_seconds(ensemble_step, steps, device))
            times["hand"].append(block_seconds(hand_step, steps, device))
        shapes = [(layer[0].shape[1], layer[0].shape[2]) for layer in hand.layers]
        ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}
        flops = step_flops(shapes, members, batch)
        return {"ensemble_ms": ms["ensemble"], "hand_ms": ms["hand"], "ratio": ms["hand"] / ms["ensemble"],
                "ensemble_gflops": flops / ms["ensemble"] / 1e6, "hand_gflops": flops / ms["hand"] / 1e6,
                "roofline_gflops": bmm_roofline(shapes, members, batch, device, repeats),
                "first_loss_gap": float(((ours - theirs).abs() / theirs.abs()).max()),
                "path": trainer.ensemble.path, "load": os.getloadavg()[0]}


def report(rows: list[tuple[Case, int, dict[str, float]]], device: torch.device, args: argparse.Namespace,
           seconds: float) -> str:
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    lines = [
        SECTION, "",
        f"Command: `python benchmarks/ensemble_step.py --device {device.type}{' --quick' if args.quick else ''}` "
        f"({seconds:.0f} s). Machine: {machine}; torch {torch.__version__}. Load average (1 min) when each row "
        f"was measured in the last column. Both steps are timed alternately, {args.repeats} blocks of "
        f"{args.steps} steps each, medians; on a CPU in process CPU time (a shared machine's waits left out)"
        f", on a GPU in wall time.", "",
        "Hand-written: weights as (M, in, out) tensors, `torch.baddbmm`, ReLU, BCE with logits (+ KL), "
        "`torch.optim.Adam(fused=True)`; its first step's loss equals the ensemble's for every member (largest "
        "relative gap in the `gap` column). Speed = hand ms / ensemble ms (goal >= 0.8). GFLOP/s: matrix "
        "products only, 6 M B sum(in*out) per step; roofline: `torch.bmm` alone on the same products. "
        "`path`: the ensemble's step (`Ensemble.path`).", "",
        "| model | M | path | ensemble (ms/step) | hand-written (ms/step) | speed vs hand | ensemble GFLOP/s | "
        "hand GFLOP/s | bmm roofline GFLOP/s | gap | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, members, r in rows:
        lines.append(f"| {case.name} | {members} | {r['path']} | {r['ensemble_ms']:.2f} | {r['hand_ms']:.2f} | "
                     f"**{r['ratio']:.2f}** | {r['ensemble_gflops']:.0f} | {r['hand_gflops']:.0f} | "
                     f"{r['roofline_gflops']:.0f} | {r['first_loss_gap']:.0e} | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(output: Path, section: str) -> None:
    """Replace this benchmark's section of `output` (up to the next `## ` heading), or append it."""
    text = output.read_text() if output.exists() else ""
    if SECTION in text:
        before, rest = text.split(SECTION, 1)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    output.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repository = Path(__file__).resolve().parent.parent
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="M = 4 only, few steps: checks the script runs")
    parser.add_argument("--data-root", type=Path, default=repository.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=None, help="steps a timed block (default 3, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks of each step (default 15, quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on a CPU (default 1: CPU time then measures a step's work)")
    parser.add_argument("--members", type=int, nargs="+", default=None, help="M values (default 4 16 64)")
    parser.add_argument("--output", type=Path, default=None, help="a Markdown file to write the section into")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 15)
    counts = args.members or ([4] if args.quick else [4, 16, 64])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    register_configs()
    began = time.perf_counter()
    rows = []
    for case in CASES:
        for members in counts:
            rows.append((case, members, measure(case, members, device, args.data_root, args.steps, args.repeats)))
            print(case.name, members, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1][2].items()},
                  flush=True)
    section = report(rows, device, args, time.perf_counter() - began)
    print(section)
    if args.output:
        write_section(args.output, section)


if __name__ == "__main__":
    main()
