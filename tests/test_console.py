"""What a user sees: the console of a run, the final metrics table, and one-line errors that point at
the fix."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from ae_lab.report import format_value, metrics_tables
from conftest import CLI_RUN, ROOT, read_json, run_cli

# what libraries say that a user cannot act on: on the console only with verbose=true
NOISE = ("litlogger", "anonymous setting", "was configured so", "srun", "GPU available")


def test_default_run_shows_config_progress_and_results_only(cli_run):
    done, run_dir = cli_run
    metrics = read_json(run_dir / "metrics.json")
    console = done.stdout + done.stderr
    assert "config: " in done.stdout and "model=ae" in done.stdout and "dataset=digits" in done.stdout
    assert f"overrides: {' '.join(CLI_RUN)}" in done.stdout
    assert f"run folder: {run_dir}" in done.stdout
    assert "evaluation (test split)" in done.stdout
    for key in ("eval/bce", "eval/psnr", "eval/probe_accuracy"):  # each value as the table writes it
        assert f" {format_value(metrics[key])} " in done.stdout, key
    for message in NOISE:
        assert message not in console, message
    log = (run_dir / "ae_lab.log").read_text()  # the run's log keeps them
    assert "litlogger" in log and log.count("was configured so") == 4


def test_verbose_brings_library_messages_back(tmp_path):
    done = run_cli(["trainer=debug", "logger=none", "eval=minimal", "verbose=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "litlogger" in done.stdout and "was configured so" in done.stdout


ERRORS = [
    (["model=vea"], "model=vea is not an option of model: choose one of ae, vae (did you mean vae?)"),
    (["dataset=minst"], "choose one of array, custom, digits, dsprites, fashion_mnist, image_folder, mnist, shapes "
                          "(did you mean mnist?)"),
    (["model.latnt_dim=8"], "model.latnt_dim is not a key of model (did you mean model.latent_dim?)"),
    (["noise.prob=0.2"], "noise.prob is not a key of noise (did you mean noise.p? it is a key of noise=masking"),
    (["noise=masking", "noise.pp=0.2"], "noise.pp is not a key of noise (did you mean noise.p?)"),
    (["noise=gaussian", "noise.p=0.2"], "noise.p is not a key of noise=gaussian (did you mean noise.std? noise.p is "
                                        "a key of noise=masking and noise=salt_pepper)"),
    (["loss.beta=1,4"], "loss.beta=1,4 lists 2 values, which is a sweep: a sweep needs -m"),
    (["seeed=1"], "seeed is not a key at the top level (did you mean seed?)"),
    (["seed=abc"], "seed=abc is not allowed: seed takes an integer"),
    (["eval.figures=maybe"], "eval.figures=maybe is not allowed: eval.figures takes true or false"),
    (["model.arch=mpl"], "model.arch=mpl is not allowed: model.arch is one of mlp, conv (did you mean mlp?)"),
]


@pytest.mark.parametrize("overrides,message", ERRORS)
def test_composition_errors_are_one_line_that_points_at_the_fix(overrides, message, tmp_path):
    done = run_cli(overrides, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and message in lines[0], done.stderr
    assert "schema" not in done.stderr and "search path" not in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_values_get_the_digits_they_need():
    assert [format_value(v) for v in (0.91234, 35.1234, 1234.56, 0.0012345, 3.0, 10000.0, float("nan"))] == [
        "0.9123", "35.12", "1235", "0.001234", "3", "10000", "nan"]


def test_eval_metrics_have_their_own_table_with_their_sample_sizes():
    metrics = {"train/loss": 2.0, "val/loss": 1.5, "test/loss": 1.25, "eval/psnr": 18.4321, "eval/sap": 0.04321,
               "eval/sap_n_train": 1333.0, "eval/sap_n_test": 667.0, "eval/dci_completeness": 0.5,
               "eval/dci_n_train": 1333.0}
    splits, evaluation = metrics_tables(metrics)
    assert [cell for column in splits.columns for cell in column._cells] == ["loss", "2", "1.500", "1.250"]
    names, values, samples = (list(column._cells) for column in evaluation.columns)
    assert names == ["dci_completeness", "psnr", "sap"]  # the sizes sit beside their metric, not as rows
    assert values == ["0.5000", "18.43", "0.04321"]
    assert samples == ["train 1333", "", "test 667, train 1333"]


def test_ci_runs_the_readme_command_and_writes_the_suite_time(tmp_path):
    command = 'python -m pip install -e ".[test]" -c constraints.txt && python -m pytest'
    for shown in ("README.md", "docs/getting-started.md", ".ci/run"):  # the quick start, its page, CI
        assert command in (ROOT / shown).read_text(), shown
    # run .ci/run with a `python` that only records what it is asked to do
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "-m pytest"
    assert "ci: test suite (the README's test command, install included) took" in done.stdout + done.stderr


def test_schemas_are_not_offered_as_options():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ae_lab.config import SCHEMAS

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in SCHEMAS:  # what Hydra offers in each group is its YAML options, nothing else
            assert loader.get_group_options(group) == sorted(path.stem for path in (ROOT / "conf" / group).glob("*.yaml"))


def test_help_is_ae_labs_own_page_generated_from_the_config_folder(tmp_path):
    from omegaconf import OmegaConf

    from ae_lab.help import MOST_USED
    from conftest import compose_config

    done = run_cli(["--help"], cwd=tmp_path, timeout=120)  # walking .git, .venv or outputs/ took minutes
    assert done.returncode == 0 and "schema" not in done.stdout and "Powered by Hydra" not in done.stdout
    lines = done.stdout.splitlines()
    start = lines.index("Config groups (group=option; the first is the default):")
    groups = [line.split(":", 1)[0].strip() for line in lines[start + 1:lines.index("", start)]]
    assert not [group for group in groups if group.startswith((".", "outputs", "tests", "ae_lab"))]
    [ready] = [line for line in lines if line.strip().startswith("+sweeps:")]
    assert ready.split(":", 1)[1].strip().split(", ") == sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
    for folder in (path for path in (ROOT / "conf").iterdir() if path.is_dir() and path.name != "hydra"):
        [line] = [line for line in lines if line.strip().startswith(f"{folder.name}:")]
        assert sorted(line.split(":", 1)[1].strip().split(", ")) == sorted(p.stem for p in folder.glob("*.yaml"))
    assert "model:          ae, vae" in lines[start + 7]
    launchers = next(line for line in lines if line.strip().startswith("hydra/launcher:"))
    assert all(name in launchers for name in ("basic", "gpu_queue", "vectorized", "slurm"))
    assert "python -m ae_lab.compare: runs and sweeps side by side" in done.stdout
    assert "python -m ae_lab.reproduce: run a finished run again" in done.stdout
    assert "python -m ae_lab.export: one file a deployer feeds raw data, with the run's preprocessing inside." in done.stdout
    pages = [*(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").glob("*.md")]  # the site's pages
    assert pages and all(f"({page.relative_to(ROOT)})" in " ".join(done.stdout.split()) for page in pages)
    assert "Getting started (docs/getting-started.md)" in " ".join(done.stdout.split())
    config = compose_config([])
    assert all(OmegaConf.select(config, key, default="absent") != "absent" for key in MOST_USED)


def test_the_resolution_of_an_accuracy_is_one_test_example(cli_run):
    _, run_dir = cli_run
    resolution = read_json(run_dir / "evaluation.json")["resolution"]
    accuracy = read_json(run_dir / "metrics.json")["eval/probe_accuracy"]
    from ae_lab.data import build_datamodule
    from conftest import compose_config

    tested = len(build_datamodule(compose_config([]).dataset).splits["test"])  # digits: no class held out
    assert resolution["eval/probe_accuracy"] == resolution["eval/probe_accuracy_pixels"] == 1 / tested
    assert accuracy * tested == pytest.approx(round(accuracy * tested), abs=1e-9)  # a whole number right
