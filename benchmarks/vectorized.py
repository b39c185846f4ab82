"""The vectorised launcher against the basic one, measured side by side, written to benchmarks/VECTORIZED.md.

    python benchmarks/vectorized.py [--data-root ../shared/data]

Each row runs the same sweep (β × seed, M jobs, same epochs, `eval=default`) as real `python -m ae_lab -m`
processes: with `hydra/launcher=vectorized`, with Hydra's basic launcher, and with Hydra's joblib
launcher (2 workers, one torch thread each), and divides the wall times (start-up, evaluation and
writing every run folder included). Where the basic or joblib sweep of M jobs would take too long for
this machine, it is timed on fewer jobs and scaled to M (marked "scaled"): its cost grows linearly in
the jobs, each being the same run. Also: the ensemble's training examples/s per member against a
hand-written loop for one model, and what a member's evaluation and writing cost against its group's
training, from the same sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from ensemble_step import SECTION as STEP_SECTION  # benchmarks/ensemble_step.py

REPOSITORY = Path(__file__).resolve().parent.parent
ENVIRONMENT = dict(os.environ)  # OMP_NUM_THREADS set by --threads, the same for every process
QUIET = ["logger=none", "eval=default", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
LAUNCHERS = {"vectorized": ["hydra/launcher=vectorized"], "basic": [],
             "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def sweep_values(members: int) -> list[str]:
    """β × seed with `members` jobs: 4 values of β, members / 4 seeds."""
    seeds = max(1, members // 4)
    return ["loss.beta=" + ",".join(["1", "2", "4", "8"][:min(4, members)]), "seed=" + ",".join(map(str, range(seeds)))]


LAUNCHED: dict[Path, float] = {}  # sweep folder -> the Unix time its process was started


def timed_sweep(overrides: list[str], folder: Path, launcher: str) -> float:
    command = [sys.executable, "-m", "ae_lab", "-m", *LAUNCHERS[launcher], *overrides, *QUIET,
               f"hydra.sweep.dir={folder}"]
    # joblib's 2 workers get one thread each (the machine's cores shared between them)
    environment = {**ENVIRONMENT, "OMP_NUM_THREADS": "1"} if launcher == "joblib" else ENVIRONMENT
    LAUNCHED[folder] = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def breakdown(folder: Path, wall: float, imports: float) -> dict[str, float]:
    """Where a vectorised sweep's wall time went (one group): the imports (measured apart), composition and
    set-up (every job composed, checked and grouped, the data loaded, the ensemble built: from the process's
    start to the first member's run.json, less the imports), the group's training, the members' write-out
    (their run.json `writeout_seconds` summed) and the rest (the final val/test passes, the sweep's
    summary, the process's exit)."""
    records = [json.loads(path.read_text()) for path in folder.glob("*/run.json")]
    first = min(datetime.fromisoformat(record["started"]).timestamp() for record in records)
    parts = {"imports": imports, "composition and set-up": first - LAUNCHED[folder] - imports,
             "training": records[0]["timings"]["fit_seconds"],
             "write-out": sum(record["timings"]["writeout_seconds"] for record in records)}
    return {**parts, "rest": wall - sum(parts.values())}


def timings(folder: Path) -> list[dict[str, float]]:
    found = [json.loads(path.read_text())["timings"] for path in folder.glob("*/run.json")]
    if not found:
        raise RuntimeError(f"no run folders in {folder}")
    return found


def writeout_share(folder: Path) -> tuple[float, float]:
    """(mean seconds of a member's evaluation and writing, the group's training seconds)."""
    found = timings(folder)
    return sum(t["writeout_seconds"] for t in found) / len(found), found[0]["fit_seconds"]


def import_seconds() -> float:
    """What every sweep process pays before its first job: importing torch, Lightning and ae_lab (the
    fastest of 3 fresh interpreters)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ae_lab.run"], cwd=REPOSITORY, check=True, env=ENVIRONMENT)
        times.append(time.perf_counter() - started)
    return min(times)


def hand_loop_vs_ensemble(members: int, steps: int = 30) -> tuple[float, float]:
    """Examples/s of one digits MLP AE trained by a hand-written loop, and of the ensemble counted per
    member (M × batch per step) with the same batch size and Adam."""
    from omegaconf import OmegaConf
    from run import config  # benchmarks/run.py

    from ae_lab.config import register_configs
    from ae_lab.data import build_datamodule
    from ae_lab.ensemble.group import GroupTrainer, Member
    from ae_lab.module import Autoencoder

    register_configs()
    cfgs = [config([f"seed={seed}", "logger=none"]) for seed in range(members)]
    data = build_datamodule(cfgs[0].dataset)
    images = data.splits["train"].batch(torch.arange(len(data.splits["train"])))["x"]
    batch = data.batch_size
    module = Autoencoder.from_config(OmegaConf.to_container(cfgs[0], resolve=True), data.input_shape)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def hand_step(i: int) -> None:
        x = images[(i * batch) % (len(images) - batch):][:batch]
        logits, latent = module(x)
        loss = module.objective(logits, x, latent, x, module.objective.weights(0), create_graph=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as folder:
        trainer = GroupTrainer([Member(c, Path(folder) / str(i)) for i, c in enumerate(cfgs)], data,
                               Path(folder) / "g.pt", torch.device("cpu"))
        positions = trainer._epoch_positions(0)

        def ensemble_step(i: int) -> None:
            chosen = positions[:, (i % 19) * batch:(i % 19 + 1) * batch]
            x = data.splits["train"].batch(chosen.flatten())["x"]
            trainer._step(x.view(*chosen.shape, *x.shape[1:]))

        rates = []
        for step, count in ((hand_step, 1), (ensemble_step, members)):
            for i in range(5):
                step(i)
            started = time.perf_counter()
            for i in range(steps):
                step(i)
            rates.append(steps * batch * count / (time.perf_counter() - started))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = next((folder / "shared" / "data" for folder in REPOSITORY.parents if (folder / "shared" / "data").is_dir()),
                  REPOSITORY.parent / "shared" / "data")
    parser.add_argument("--data-root", type=Path, default=shared)
    parser.add_argument("--output", type=Path, default=REPOSITORY / "benchmarks" / "VECTORIZED.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the basic and vectorised sweeps (default: torch's, one per core; "
                             "on a CPU shared with other work, OpenMP's waits make multi-threaded ops many "
                             "times slower, and 1 is the fair setting)")
    parser.add_argument("--only", nargs="+", default=None, help="run the sweeps whose names start with these "
                        "words only (digits, MNIST, shapes)")
    parser.add_argument("--members", type=int, nargs="+", default=None, help="M values (default: each sweep's own)")
    args = parser.parse_args()
    if args.threads is not None:
        ENVIRONMENT["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    mnist = ["dataset=mnist", f"dataset.root={args.data_root}", "dataset.download=false"]
    cases = [  # name, overrides, member counts, the most jobs the basic and joblib launchers are timed on
        ("digits, MLP AE (default), 20 epochs", ["trainer.max_epochs=20"], (4, 16, 64), 16),
        ("MNIST, 784-400-40 MLP VAE, 1 epoch of 100 batches",
         [*mnist, "model=vae", "model.hidden_dims=[400]", "model.latent_dim=40", "trainer.max_epochs=1",
          "trainer.limit_train_batches=100", "trainer.limit_val_batches=5", "trainer.limit_test_batches=5",
          "eval.test_examples=500"], (4, 16, 64) if gpu else (4, 16), 4),
        ("shapes (2,000 images), conv VAE, 2 epochs",
         ["dataset=shapes", "dataset.subsample=2000", "model=vae", "model.arch=conv", "trainer.max_epochs=2",
          "eval.test_examples=200"], (4,), 4),
    ]
    if args.only:
        cases = [case for case in cases if case[0].startswith(tuple(args.only))]
    imports = import_seconds()
    rows, parts = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides, counts, cap in cases:
            for members in args.members or counts:
                folders = {launcher: Path(scratch) / f"{launcher}{len(rows)}" for launcher in LAUNCHERS}
                timed = min(members, cap)
                seconds = {"vectorized": timed_sweep(overrides + sweep_values(members), folders["vectorized"],
                                                     "vectorized")}
                for launcher in ("basic", "joblib"):
                    seconds[launcher] = timed_sweep(overrides + sweep_values(timed), folders[launcher],
                                                    launcher) * members / timed
                writeout, fit = writeout_share(folders["vectorized"])
                basic_fit = sum(t["fit_seconds"] for t in timings(folders["basic"])) * members / timed
                rows.append((name, members, seconds, timed < members, writeout, fit, basic_fit))
                parts.append((name, members, breakdown(folders["vectorized"], seconds["vectorized"], imports),
                              os.getloadavg()[0]))
                print(rows[-1], parts[-1], os.getloadavg(), flush=True)
    hand, ensemble = {}, {}
    for members in (4, 16, 64):
        hand[members], ensemble[members] = hand_loop_vs_ensemble(members)

    threads = args.threads or torch.get_num_threads()
    lines = [
        "# The vectorised launcher against the basic one", "",
        f"Command: `python benchmarks/vectorized.py{' ' + ' '.join(sys.argv[1:]) if len(sys.argv) > 1 else ''}` "
        f"({time.perf_counter() - began:.0f} s). Machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}, {threads} thread(s) in the basic and "
        f"vectorised sweeps (`--threads`), 1 in each of joblib's 2 workers; device: {gpu or 'CPU'}.", "",
        *([] if gpu else ["**GPU figures are still to come**: no GPU was lent to the session that ran this (goal "
                          "there: the MNIST VAE at M = 16 and 64, >= 10x the basic launcher).", ""]),
        "## Wall time of a sweep (beta x seed)", "",
        "The same sweep as real `python -m ae_lab -m ...` processes with `logger=none eval=default` (so every "
        "run's evaluation, figures and folder are paid), run one after the other through each launcher; "
        "speed-up = the other launcher's wall time / the vectorised launcher's. \"scaled\": timed on fewer "
        "jobs and multiplied up to M (identical jobs cost the same).", "",
        "Training only: the basic launcher's jobs' `fit` seconds summed (run.json `timings.fit_seconds`, "
        "Lightning's `fit`) against the group's training. Member write-out: a member's evaluation, figures, "
        "checkpoints and records after the group's training (run.json `timings.writeout_seconds`), its mean, "
        "and all M of them against the group's training.", "",
        "| sweep | M | vs basic, wall | vs joblib (2 workers), wall | vs basic, training only | vectorised (s) | "
        "basic (s) | joblib (s) | group training (s) | member write-out: mean (s), all M / group training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, members, seconds, scaled, writeout, fit, basic_fit in rows:
        mark = " (scaled)" if scaled else ""
        vectorized = seconds["vectorized"]
        lines.append(
            f"| {name} | {members} | **{seconds['basic'] / vectorized:.1f}x** | "
            f"**{seconds['joblib'] / vectorized:.1f}x** | {basic_fit / fit:.1f}x | {vectorized:.1f} | "
            f"{seconds['basic']:.1f}{mark} | {seconds['joblib']:.1f}{mark} | {fit:.1f} | "
            f"{writeout:.2f}, {members * writeout / fit:.2f} |")
    names = list(parts[0][2]) if parts else []
    lines += [
        "", "## Where the vectorised sweep's time goes", "",
        "Seconds of each vectorised sweep above (`breakdown` in benchmarks/vectorized.py): the imports (`python -c "
        "'import ae_lab.run'`, the fastest of 3), composition and set-up (every job composed, checked and grouped, "
        "the data loaded, the ensemble built), the group's training, all members' write-out, and the rest (val/test "
        "passes with the best weights, the summary).", "",
        "| sweep | M | wall (s) | " + " | ".join(names) + " | load (1 min) after its sweeps |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for (name, members, seconds, *_), (_, _, part, load) in zip(rows, parts):
        lines.append(f"| {name} | {members} | {seconds['vectorized']:.1f} | "
                     + " | ".join(f"{part[key]:.1f}" for key in names) + f" | {load:.1f} |")
    lines += [
        "", "## Training examples/s: ensemble (per member) against a hand-written loop for one model", "",
        "digits MLP AE, batch 64, Adam, 30 timed steps after 5 warm-up steps. The ensemble's rate counts "
        "every member's examples (M x batch per step).", "",
        "| M | hand loop, one model (examples/s) | ensemble (member examples/s) | ratio |", "|---|---|---|---|",
    ]
    for members in hand:
        lines.append(f"| {members} | {hand[members]:,.0f} | {ensemble[members]:,.0f} | "
                     f"{ensemble[members] / hand[members]:.2f} |")
    lines += [
        "", "## What a 5x speed-up over the basic launcher leaves (digits)", "",
        "For 5x the vectorised sweep must end within a fifth of the basic launcher's wall time. Before any "
        f"member is evaluated or written it pays the imports every sweep process pays ({imports:.1f} s: "
        "`python -c 'import ae_lab.run'`, torch, Lightning and ae_lab, the fastest of 3) and its group's "
        "training (measured above).", "",
        "| M | basic (s) | 5x needs the vectorised sweep within (s) | imports + group training (s) | 5x possible here |",
        "|---|---|---|---|---|",
    ]
    for name, members, seconds, scaled, writeout, fit, basic_fit in rows:
        if name.startswith("digits"):
            floor = imports + fit
            lines.append(f"| {members} | {seconds['basic']:.1f} | {seconds['basic'] / 5:.1f} | {floor:.1f} | "
                         f"{'no' if floor > seconds['basic'] / 5 else 'not excluded'} |")
    previous = args.output.read_text() if args.output.exists() else ""
    step_section = previous[previous.find(STEP_SECTION):] if STEP_SECTION in previous else ""  # ensemble_step.py's
    args.output.write_text("\n".join(lines) + "\n" + ("\n" + step_section if step_section else ""))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
