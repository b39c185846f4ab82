from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ae_lab.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# the smallest real training: a couple of batches of one epoch
QUICK = ["trainer=debug"]
# verified MNIST and Fashion-MNIST files beside the checkout (see shared/data/README.md)
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir() or not (SHARED / "fashion_mnist").is_dir(),
    reason=f"the MNIST and Fashion-MNIST files are not in {SHARED} (see shared/data/README.md)")

register_configs()

# user caches (the Fréchet distance's feature classifier, W&B's artifact cache) go to a folder of this test
# session, not the user's ~/.cache: a test never reads a cache an earlier session or another version left
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ae_lab-test-cache-")

# pytest-xdist's workers (pyproject.toml) share the cores: each trains, and the runs it starts train, with
# its share of them rather than all of them each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    import torch

    torch.set_num_threads(_THREADS)


def ctrl_c_by_default() -> None:
    """`preexec_fn` of a process a test will interrupt: Ctrl-C back to its default. A shell runs a
    background command (`pytest ... &`, as CI systems and nohup do) with SIGINT ignored, and an ignored
    signal stays ignored in every process started from it: the interrupt would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python -m ae_lab OVERRIDES` would train, composed in-process with Hydra's API."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def train_in_process(overrides: list[str], run_dir: Path) -> dict[str, float]:
    from ae_lab.run import train

    return train(compose_config(overrides), run_dir)


def train_and_load(overrides: list[str], run_dir: Path):
    """`train_in_process`, then the run's trained model (`ae_lab.load`)."""
    import ae_lab

    train_in_process(overrides, run_dir)
    return ae_lab.load(run_dir)


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m ae_lab ARGS` as a user runs it, in `cwd` (so outputs/ lands there)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    return subprocess.run([sys.executable, "-m", "ae_lab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kill_after_step(args: list[str], cwd: Path, step: int, extra_env: dict[str, str] | None = None) -> None:
    """Run `python -m ae_lab ARGS` in `cwd` (its environment with `extra_env`) until training step `step`
    has ended, then SIGKILL it (tests/stall/sitecustomize.py stops the run there and leaves a marker
    file); its output goes to `cwd/killed-after-<step>.log`."""
    marker = cwd / f"stalled-after-{step}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(extra_env or {})
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests" / "stall"), os.environ.get("PYTHONPATH")])),
               AE_LAB_STALL_AFTER_STEP=str(step), AE_LAB_STALL_MARKER=str(marker))
    log = cwd / f"killed-after-{step}.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "ae_lab", *args], cwd=cwd, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while not marker.exists():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, f"the run did not reach step {step}"
                time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:  # never leave a training process behind
                process.kill()
                process.wait()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def quick() -> list[str]:
    return list(QUICK)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster on this machine (tests/slurm_cluster.py), started once per test session
    and stopped at its end; the tests that use it are skipped, with the reason, where it cannot be had."""
    from slurm_cluster import ClusterUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as why:
        pytest.skip(f"no test SLURM cluster: {why}")
    yield cluster
    cluster.stop()


# the arguments of `cli_run`: one short epoch of a default run (W&B offline, default evaluation), with
# Lightning's default batch limits (1.0), whose notes a quiet console must not show
CLI_RUN = ["trainer.max_epochs=1", "model.latent_dim=12"]


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m ae_lab CLI_RUN` as a user runs it, once per test process (per pytest-xdist worker), shared
    by the tests that read a run made from the command line (not to be changed): its output and folder."""
    cwd = tmp_path_factory.mktemp("cli_run")
    done = run_cli(CLI_RUN, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    [run_dir] = (cwd / "outputs" / "runs").iterdir()
    return done, run_dir
