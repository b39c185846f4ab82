"""The ensemble's training step eager against `torch.compile` (CUDA graphs), printed as a Markdown section.

    python benchmarks/gpu_step.py [--device cuda] [--members 16 64] [--quick]

A small model's step on a GPU is bound by kernel launches (hundreds of small kernels, each a few
microseconds of work), which CUDA graphs replay in one launch. Timed on one fixed (M, B, 784) batch of
the MNIST 784-400-40 MLP VAE (random 28x28 pixels in [0, 1] as `dataset=array`: the speed does not depend on
their values, and no MNIST files are needed), each
a mean over timed blocks after warm-up, synchronised before every clock read:

- `ensemble step`: `GroupTrainer._step`, the step a vectorised sweep runs (with its NaN check, epoch
  sums and per-member history, which read values back to the host);
- `vmapped step, eager`: the same loss, `vmap(grad(...))` of one member's terms (`Ensemble._member_terms`,
  the model's own sampling, `randomness="different"`) and Adam (`torch.optim.Adam(fused=True)` on the
  GPU) over the stacked parameters, nothing read back;
- `vmapped step, torch.compile`: that function under `torch.compile(mode="reduce-overhead")` (CUDA
  graphs; on a CPU plain inductor), its compile time beside it; a failure to compile is reported as such.

Examples/s count every member's examples (M x B per step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

VAE = ["model=vae", "model.hidden_dims=[400]", "model.latent_dim=40", "logger=none", "dataset.batch_size=64"]


def timed(step: Callable[[], None], device: torch.device, steps: int, repeats: int) -> float:
    """Seconds per step: the best mean of `repeats` blocks of `steps` steps, after 3 warm-up steps."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def measure(members: int, device: torch.device, steps: int, repeats: int, compile_mode: str) -> dict[str, object]:
    import numpy as np
    from run import config  # benchmarks/run.py

    from ae_lab.config import register_configs
    from ae_lab.data import build_datamodule
    from ae_lab.ensemble.group import GroupTrainer, Member

    register_configs()
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images.npy"  # MNIST's shape, so that no MNIST files are needed
        np.save(images, np.random.default_rng(0).random((1000, 1, 28, 28), dtype=np.float32))
        accelerator = "trainer.accelerator=" + ("gpu" if device.type == "cuda" else "cpu")
        cfgs = [config([*VAE, "dataset=array", f"dataset.path={images}", f"seed={seed}", accelerator])
                for seed in range(members)]
        data = build_datamodule(cfgs[0].dataset)
        trainer = GroupTrainer([Member(c, Path(folder) / str(i)) for i, c in enumerate(cfgs)], data,
                               Path(folder) / "g.pt", device)
    ensemble = trainer.ensemble
    batch = data.batch_size
    x = torch.rand(members, batch, *data.input_shape, device=device)
    weights, strength = ensemble.weights(0), ensemble.strength

    def run_ensemble() -> None:
        trainer._step(x)

    params = {name: value.detach().clone().requires_grad_(True) for name, value in ensemble.unflatten(ensemble.flat).items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3, fused=device.type == "cuda")

    def member_loss(own: dict[str, torch.Tensor], x: torch.Tensor, weights: dict[str, torch.Tensor],
                    strength: torch.Tensor) -> torch.Tensor:
        return ensemble._member_terms(own, x, weights, strength, train=True)["loss"]

    gradients = torch.func.vmap(torch.func.grad(member_loss), randomness="different")

    def vmapped_step(x: torch.Tensor) -> None:
        grads = gradients({name: value.detach() for name, value in params.items()}, x, weights, strength)
        for name, value in params.items():
            value.grad = grads[name]
        optimizer.step()

    rows = {"members": members, "batch": batch}
    rows["ensemble step"] = timed(run_ensemble, device, steps, repeats)
    rows["vmapped step, eager"] = timed(lambda: vmapped_step(x), device, steps, repeats)
    try:
        compiled = torch.compile(vmapped_step, mode=compile_mode)
        started = time.perf_counter()
        compiled(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows["compile seconds"] = time.perf_counter() - started
        rows["vmapped step, torch.compile"] = timed(lambda: compiled(x), device, steps, repeats)
    except Exception as error:  # noqa: BLE001 - reported in the table: what failed to compile, not a crash
        rows["compile error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    return rows


def section(results: list[dict[str, object]], device: torch.device, compile_mode: str) -> str:
    variants = ["ensemble step", "vmapped step, eager", "vmapped step, torch.compile"]
    lines = [f"Device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
             f"`torch.compile(mode={compile_mode!r})`.", "",
             "| M | " + " | ".join(f"{name}: ms, member examples/s" for name in variants) +
             " | eager / compiled (> 1: compiling wins) | compile (s) |", "|---|" + "---|" * (len(variants) + 2)]
    for row in results:
        cells = []
        for name in variants:
            seconds = row.get(name)
            cells.append("n/a" if seconds is None else f"{1000 * seconds:.2f}, {row['members'] * row['batch'] / seconds:,.0f}")
        eager, compiled = row["vmapped step, eager"], row.get("vmapped step, torch.compile")
        ratio = f"{eager / compiled:.2f}x" if compiled else f"failed: {row.get('compile error')}"
        compile_time = f"{row['compile seconds']:.1f}" if "compile seconds" in row else "n/a"
        lines.append(f"| {row['members']} | " + " | ".join(cells) + f" | {ratio} | {compile_time} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--members", type=int, nargs="+", default=None, help="M values (default 16 64; quick: 2)")
    parser.add_argument("--quick", action="store_true", help="M = 2, 2 steps a block: checks the script runs")
    parser.add_argument("--output", type=Path, default=None, help="a Markdown file to write the section into")
    args = parser.parse_args()
    device = torch.device(args.device)
    members = args.members or ([2] if args.quick else [16, 64])
    steps, repeats = (2, 1) if args.quick else (20, 5)
    compile_mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs exist on GPUs only
    results = []
    for count in members:
        results.append(measure(count, device, steps, repeats, compile_mode))
        print(results[-1], flush=True)
        if args.output:  # after each M: a run stopped by a time limit keeps the rows it finished
            args.output.write_text(section(results, device, compile_mode))
    print(section(results, device, compile_mode))


if __name__ == "__main__":
    main()
