"""The GPU benchmarks' sweep timings and the report benchmarks/GPU.md; `benchmarks/gpu.sh` calls both.

    python benchmarks/gpu.py sweeps --output SECTION.md [--data-root DIR] [--members 16 64] [--toy]
    python benchmarks/gpu.py report --steps STEPS.tsv --sections DIR --output benchmarks/GPU.md [--mode gpu]

`sweeps`: the MNIST 784-400-40 MLP VAE sweep (β × seed, 1 epoch of 100 batches, `eval=default` on 500
test examples: the VECTORIZED.md case) at each M through the vectorised and the basic launcher, as real
`python -m ae_lab -m` processes (benchmarks/vectorized.py's `timed_sweep`). The basic launcher is timed
on at most `--basic-cap` jobs and scaled to M (identical jobs cost the same; marked "scaled"). An
untimed one-job sweep first fills the caches both launchers read (the evaluation's feature classifier,
MNIST's decoded arrays), so that neither pays them in its time. Without the MNIST files: digits with
the same network (marked). `--toy`: 2 members, 2 steps, digits, `eval=minimal` (the CPU check).

`report`: GPU.md from the steps gpu.sh ran (STEPS.tsv: step, status, seconds, note) and the Markdown
sections they wrote into DIR (`sweeps.md`, `ensemble_step.md`, `gpu_step.md`, `tests.txt`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

VAE = ["model=vae", "model.hidden_dims=[400]", "model.latent_dim=40", "trainer.max_epochs=1",
       "trainer.limit_train_batches=100", "trainer.limit_val_batches=5", "trainer.limit_test_batches=5",
       "eval.test_examples=500"]
TOY = ["model=vae", "model.hidden_dims=[16]", "model.latent_dim=2", "trainer.max_epochs=1",
       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "eval=minimal"]


def sweeps(args: argparse.Namespace) -> None:
    import vectorized  # benchmarks/vectorized.py: the same sweep processes VECTORIZED.md times

    mnist = (args.data_root / "mnist" / "train-images-idx3-ubyte.gz").exists()
    data = ["dataset=mnist", f"dataset.root={args.data_root}", "dataset.download=false"] if mnist and not args.toy else []
    accelerator = ["trainer.accelerator=gpu"] if torch.cuda.is_available() else ["trainer.accelerator=cpu"]
    overrides = [*(TOY if args.toy else VAE), *data, *accelerator]
    if args.toy:
        vectorized.QUIET[:] = [item for item in vectorized.QUIET if not item.startswith("eval=")]
    members = [2] if args.toy else args.members
    cap = 1 if args.toy else args.basic_cap
    name = ("digits, toy VAE (the CPU check)" if args.toy else
            ("MNIST" if data else "digits (no MNIST files found)") + ", 784-400-40 MLP VAE")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        vectorized.timed_sweep([*overrides, "seed=0"], Path(scratch) / "warm-up", "basic")  # fills the caches
        basic_per_job = None
        for count in members:
            folders = {launcher: Path(scratch) / f"{launcher}{count}" for launcher in ("vectorized", "basic")}
            vectorised = vectorized.timed_sweep([*overrides, *vectorized.sweep_values(count)], folders["vectorized"],
                                                "vectorized")
            timed = min(count, cap)
            if basic_per_job is None or timed == count:
                basic_per_job = vectorized.timed_sweep([*overrides, *vectorized.sweep_values(timed)], folders["basic"],
                                                       "basic") / timed
                basic_fit = sum(t["fit_seconds"] for t in vectorized.timings(folders["basic"])) / timed
            writeout, fit = vectorized.writeout_share(folders["vectorized"])
            rows.append((count, vectorised, basic_per_job * count, timed < count, fit, basic_fit * count, writeout))
            print(rows[-1], flush=True)
            write_sweeps(args.output, name, overrides, rows)  # after each M: a step cut by its limit keeps these
    print(args.output.read_text())


def write_sweeps(output: Path, name: str, overrides: list[str], rows: list[tuple]) -> None:
    """The sweep section, a row per M (members, the two wall times, scaled or not, the parts)."""
    lines = [f"Sweep: {name}; `{' '.join(overrides)}`, β × seed.", "",
             "| M | vs basic, wall | vectorised (s) | basic (s) | group training (s) | basic jobs' fit (s) | "
             "member write-out: mean (s), all M / group training |", "|---|---|---|---|---|---|---|"]
    for count, vectorised, basic, scaled, fit, basic_fit, writeout in rows:
        lines.append(f"| {count} | **{basic / vectorised:.1f}x** | {vectorised:.1f} | {basic:.1f}"
                     f"{' (scaled)' if scaled else ''} | {fit:.1f} | {basic_fit:.1f}{' (scaled)' if scaled else ''} | "
                     f"{writeout:.2f}, {count * writeout / fit:.2f} |")
    output.write_text("\n".join(lines) + "\n")


def machine() -> list[str]:
    """The GPU, driver, torch and CUDA, the CPU and the date, as lines of the report."""
    smi = "nvidia-smi: not found"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        smi = done.stdout.strip() or done.stderr.strip() or smi
    except (OSError, subprocess.TimeoutExpired):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)"
    return [f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- GPU (torch): {gpu}; nvidia-smi (name, driver, memory): {smi}",
            f"- torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'}, cuDNN "
            f"{torch.backends.cudnn.version() if torch.cuda.is_available() else 'n/a'}) from {Path(torch.__file__).parent}",
            f"- Python {platform.python_version()} ({sys.executable}); {os.cpu_count()} CPU cores"]


def report(args: argparse.Namespace) -> None:
    steps = [line.split("\t") for line in args.steps.read_text().splitlines() if line.strip()]
    total = sum(float(seconds) for _, _, seconds, _ in steps)
    # the hand-written text above the results stays; the results are replaced
    intro = args.output.read_text().split("<!-- results -->")[0] if args.output.exists() else ""
    lines = [intro.rstrip(), "", "<!-- results -->", "## Results", "",
             f"Written by `benchmarks/gpu.sh{' --cpu-check' if args.mode == 'cpu-check' else ''}` "
             f"({args.seconds or total:.0f} s in all).", *(["", "**A CPU check at toy sizes: no figure below is a GPU measurement.**"]
                                           if args.mode == "cpu-check" else []), "", *machine(), "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {step} | {status} | {float(seconds):.0f} | {note} |" for step, status, seconds, note in steps]
    titles = {"tests.txt": "`pytest -m gpu tests/test_gpu.py` (the summary)",
              "sweeps.md": "Sweep wall time: vectorised against basic launcher",
              "ensemble_step.md": "The ensemble step against the hand-written stacked step (benchmarks/ensemble_step.py)",
              "gpu_step.md": "The ensemble step eager against torch.compile (benchmarks/gpu_step.py)"}
    for file, title in titles.items():
        path = args.sections / file
        if path.exists() and path.read_text().strip():
            body = path.read_text().rstrip()
            lines += ["", f"### {title}", "", f"```\n{body}\n```" if file.endswith(".txt") else body]
    args.output.write_text("\n".join(lines).lstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweeps")
    sweep.add_argument("--output", type=Path, required=True)
    sweep.add_argument("--data-root", type=Path, default=Path(os.environ.get("AE_LAB_DATA", "data")))
    sweep.add_argument("--members", type=int, nargs="+", default=[16, 64])
    sweep.add_argument("--basic-cap", type=int, default=16, help="most jobs the basic launcher is timed on (default 16)")
    sweep.add_argument("--toy", action="store_true")
    written = commands.add_parser("report")
    written.add_argument("--steps", type=Path, required=True)
    written.add_argument("--sections", type=Path, required=True)
    written.add_argument("--output", type=Path, required=True)
    written.add_argument("--mode", choices=("gpu", "cpu-check"), default="gpu")
    written.add_argument("--seconds", type=float, default=None, help="the script's wall time (default: the steps' sum)")
    args = parser.parse_args()
    sweeps(args) if args.command == "sweeps" else report(args)


if __name__ == "__main__":
    main()
