"""The suite's shared fixtures: a test takes what it needs as an argument (never `from conftest import`).

- `quick`: the smallest real run's overrides (QUICK); a test adds on top only what its check needs
- `compose_config`, `train_in_process`, `train_and_load`: a config, a run, a trained model, in this process
- `run_cli`: `python -m ae_lab ARGS` as a user runs it, a process of its own; `run_cli_many`: many command
  lines for one start-up (tests/forked_cli.py); `kill_after_step`: a run SIGKILLed after a given step
- `read_json`, `ctrl_c_by_default`
- `cli_run`: a default run made from the command line, once per worker; `slurm_cluster`: once per session

Constants a test module needs when it is collected (ROOT, CONF, SHARED, `needs_shared`) are in tests/paths.py;
tests/wandb_records.py reads W&B's offline files. The markers (pyproject.toml): `slurm`, `gpu` (skipped here
where torch sees no CUDA device), `slow`.

The module-level names (QUICK, compose_config, run_cli, ...) stay importable for tests written before the
fixtures; new tests take the fixtures.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

import paths
from ae_lab.config import register_configs

ROOT, CONF = paths.ROOT, paths.CONF
SHARED, needs_shared = paths.SHARED, paths.needs_shared  # importable from here as before

# The smallest real training, one set for the whole suite: one epoch of two training batches, one validation
# and one test batch, no progress bar or model summary. conf/trainer/debug.yaml written as keys (tests/
# test_config.py checks that they agree), so that it also holds with another trainer group (trainer=ddp)
# and with an experiment preset, whose trainer keys would override a group choice. A test adds on top only
# what its check needs (more epochs or batches, logger=none, eval=minimal, ...), after these: the later
# value of a key wins.
QUICK = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")

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


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `gpu` is skipped, with the reason, where torch sees no CUDA device, unless
    AE_LAB_GPU_TESTS_DEVICE=cpu asks for the GPU tests on the CPU (tests/test_gpu.py, benchmarks/gpu.sh)."""
    if item.get_closest_marker("gpu") is not None and os.environ.get("AE_LAB_GPU_TESTS_DEVICE", "cuda") == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("marked gpu: torch sees no CUDA device here")


def ctrl_c_by_default() -> None:
    """`preexec_fn` of a process a test will interrupt: Ctrl-C back to its default. A shell runs a
    background command (`pytest ... &`, as CI systems and nohup do) with SIGINT ignored, and an ignored
    signal stays ignored in every process started from it: the interrupt would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config `python -m ae_lab OVERRIDES` would train, composed in-process with Hydra's API."""
    from ae_lab.compose import compose_config as compose

    return compose(overrides)


def train_in_process(overrides: Sequence[str], run_dir: Path) -> dict[str, float]:
    """Train the config `python -m ae_lab OVERRIDES` would train, in this process, into `run_dir`: its
    metrics."""
    from ae_lab.run import train

    return train(compose_config(overrides), run_dir)


def train_and_load(overrides: Sequence[str], run_dir: Path):
    """`train_in_process`, then the run's trained model (`ae_lab.load`)."""
    import ae_lab

    train_in_process(overrides, run_dir)
    return ae_lab.load(run_dir)


def _user_environment() -> dict[str, str]:
    """This process's environment as a user's shell has it: no W&B settings of the test session."""
    return {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m ae_lab ARGS` as a user runs it, in `cwd` (so outputs/ lands there)."""
    return subprocess.run([sys.executable, "-m", "ae_lab", *args], cwd=cwd, env=_user_environment(),
                          capture_output=True, text=True, timeout=timeout)


def run_cli_many(cases: Sequence[tuple[Sequence[str], Path]],
                 timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`run_cli(ARGS, cwd=CWD)` for each (ARGS, CWD) of `cases`, each a process of its own forked from one
    that has imported ae_lab once (tests/forked_cli.py): for command lines that end before training (a
    refusal) most of a process's time is its start-up, paid here once. Each result as `run_cli`'s (its
    args, exit code, stdout, stderr); a case's output is also left in CWD/forked-cli.stdout and .stderr."""
    from forked_cli import STDERR, STDOUT

    request = json.dumps([[list(args), str(cwd)] for args, cwd in cases])
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_cli.py")], input=request,
                          env=_user_environment(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.splitlines()[-1])
    return [subprocess.CompletedProcess([sys.executable, "-m", "ae_lab", *args], code,
                                        (cwd / STDOUT).read_text(), (cwd / STDERR).read_text())
            for (args, cwd), code in zip(cases, codes, strict=True)]


def kill_after_step(args: list[str], cwd: Path, step: int, extra_env: dict[str, str] | None = None) -> None:
    """Run `python -m ae_lab ARGS` in `cwd` (its environment with `extra_env`) until training step `step`
    has ended, then SIGKILL it (tests/stall/sitecustomize.py stops the run there and leaves a marker
    file); its output goes to `cwd/killed-after-<step>.log`."""
    marker = cwd / f"stalled-after-{step}"
    env = {**_user_environment(), **(extra_env or {})}
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
    """The JSON file at `path`."""
    return json.loads(path.read_text())


# ----- the fixtures: each hands out the function or constant above of its name

@pytest.fixture(scope="session")
def quick() -> tuple[str, ...]:
    """QUICK, the smallest real run's overrides (a tuple: a test adds its own with `[*quick, ...]`)."""
    return QUICK


def _fixture_of(helper):
    """A session fixture named as `helper` that hands it out, with its docstring (`pytest --fixtures`)."""
    def fixture():
        return helper

    fixture.__doc__ = helper.__doc__
    return pytest.fixture(scope="session", name=helper.__name__)(fixture)


compose_config_fixture = _fixture_of(compose_config)
train_in_process_fixture = _fixture_of(train_in_process)
train_and_load_fixture = _fixture_of(train_and_load)
run_cli_fixture = _fixture_of(run_cli)
run_cli_many_fixture = _fixture_of(run_cli_many)
kill_after_step_fixture = _fixture_of(kill_after_step)
read_json_fixture = _fixture_of(read_json)
ctrl_c_by_default_fixture = _fixture_of(ctrl_c_by_default)


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
def cli_run(tmp_path_factory, worker_id) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m ae_lab CLI_RUN` as a user runs it, once per test session (the pytest-xdist workers share it,
    the first to ask makes it), for the tests that read a run made from the command line (not to be changed):
    its output and folder."""
    if worker_id == "master":  # no pytest-xdist: this process is the session
        return _cli_run(tmp_path_factory.mktemp("cli_run"))
    shared = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
    with open(shared / "cli_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cli_run(shared / "cli_run")


def _cli_run(cwd: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`cli_run` in `cwd`: made there, or read back from there when an earlier caller made it."""
    result = cwd / "cli_run.json"
    if not result.exists():
        cwd.mkdir(exist_ok=True)
        done = run_cli(CLI_RUN, cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        result.write_text(json.dumps({"args": done.args, "returncode": done.returncode, "stdout": done.stdout,
                                      "stderr": done.stderr}))
    [run_dir] = (cwd / "outputs" / "runs").iterdir()
    return subprocess.CompletedProcess(**read_json(result)), run_dir
