"""W&B runs as a sweep groups them, and `python -m ae_lab.compare` on real run folders."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from wandb_records import read_records, run_contents

TWO_EPOCHS = ["trainer.max_epochs=2", "trainer.limit_train_batches=3"]  # on top of `quick`: learning curves


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, run_cli, quick):
    """A real 2x2 sweep of VAEs over beta and seed, plus a job that fails (its loss turns NaN)."""
    cwd = tmp_path_factory.mktemp("compare")
    sweep_dir = cwd / "outputs" / "sweeps" / "beta_seed"
    done = run_cli(["-m", "model=vae", "loss.beta=1,4", "seed=0,1", *quick, *TWO_EPOCHS, f"hydra.sweep.dir={sweep_dir}"],
                   cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    failing = run_cli(["-m", "model=vae", "loss.beta=2", "optim.name=sgd", "optim.lr=1e30", *quick, *TWO_EPOCHS,
                       "logger=none", f"hydra.sweep.dir={cwd / 'outputs' / 'sweeps' / 'broken'}"], cwd=cwd)
    assert failing.returncode == 1
    return {"cwd": cwd, "dir": sweep_dir, "stdout": done.stdout}


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ae_lab.compare", *args], capture_output=True, text=True,
                          timeout=120)


def jobs(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir())


def test_each_job_is_one_wandb_run_in_the_sweeps_group(sweep, read_json):
    runs = []
    for job in jobs(sweep["dir"]):
        wandb = run_contents(job)
        config = read_json(job / "run.json")
        metrics = read_json(job / "metrics.json")
        run = wandb["run"]
        assert run.run_group == "beta+seed beta_seed"  # the swept keys, then the sweep folder's name
        assert wandb["config"]["sweep/keys"] == ["loss.beta", "seed"]
        artifacts = [record.artifact for record in read_records(next(job.glob("wandb/offline-run-*/run-*.wandb")))
                     if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "model"]
        # best.ckpt as the artifact's version aliased `best` (W&B adds `latest`)
        assert [(artifact.name, "best" in artifact.aliases) for artifact in artifacts] == [(f"model-{run.run_id}", True)]
        assert [entry.path for entry in artifacts[0].manifest.contents] == ["best.ckpt"]
        # evaluation.json's per-unit vectors: a table (unit, kl, code variance) and a bar chart of each
        units = next(row for row in wandb["history"] if "eval/per_unit/_type" in row)
        assert (units["eval/per_unit/nrows"], units["eval/per_unit/ncols"]) == (wandb["config"]["model.latent_dim"], 3)
        assert {"eval/kl_per_unit_table/_type", "eval/code_variance_per_unit_table/_type"} <= units.keys()
        assert run.job_type == ("vae" if wandb["config"]["loss.beta"] == 1 else "beta_vae")
        assert run.display_name == f"vae_beta={wandb['config']['loss.beta']:g}_seed={wandb['config']['seed']}"
        assert {"mlp", "digits"} <= set(run.tags)
        assert run.run_id == config["wandb_run_id"]
        # the summary holds the final metrics under metrics.json's names, and only this job's
        for name, value in metrics.items():
            assert wandb["summary"][name] == pytest.approx(value)
        image = wandb["summary"]["figures/reconstructions/_type"]
        assert image == "image-file"
        [stored] = (job / "wandb").glob("offline-run-*/files/media/images/figures/reconstructions_*.png")
        assert stored.read_bytes()[:4] == b"\x89PNG"
        assert sum(1 for row in wandb["history"] if "train/loss" in row) == 2  # one per epoch
        runs.append((wandb["config"]["loss.beta"], wandb["config"]["seed"], metrics["test/loss"]))
    assert sorted((beta, seed) for beta, seed, _ in runs) == [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert len({loss for _, _, loss in runs}) == 4
    assert f"wandb sync {sweep['dir']}/*/wandb/offline-run-*" in sweep["stdout"]


def test_table_numbers_equal_the_jobs_metrics(sweep):
    done = compare(str(sweep["dir"]), "--by-seed", "--format", "json", "--metrics", "test/loss,test/kl")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 4
    for row in rows:
        [folder] = row["folders"]
        metrics = json.loads((sweep["dir"] / folder.rsplit("/", 1)[-1] / "metrics.json").read_text())
        assert row["test/loss"] == pytest.approx(metrics["test/loss"])
        assert row["test/kl"] == pytest.approx(metrics["test/kl"])
        assert row["status"] == "completed"


def test_seeds_are_aggregated_as_mean_std_and_count(sweep, read_json):
    done = compare(str(sweep["dir"]), "--format", "json", "--metrics", "test/loss")
    rows = json.loads(done.stdout)
    assert len(rows) == 2 and all("seed" not in row for row in rows)
    for row in rows:
        values = [read_json(sweep["dir"] / f.rsplit("/", 1)[-1] / "metrics.json")["test/loss"]
                  for f in row["folders"]]
        mean = sum(values) / 2
        std = (sum((v - mean) ** 2 for v in values) / 1) ** 0.5  # sample std over the two seeds
        assert row["test/loss"] == {"mean": pytest.approx(mean), "std": pytest.approx(std), "n": 2}


def test_every_export_format_parses_and_failed_jobs_are_marked(sweep):
    paths = [str(sweep["dir"]), str(sweep["cwd"] / "outputs" / "sweeps" / "broken")]
    as_csv = list(csv.DictReader(io.StringIO(compare(*paths, "--format", "csv").stdout)))
    assert len(as_csv) == 3 and {row["status"] for row in as_csv} == {"2 completed", "failed"}
    markdown = compare(*paths, "--format", "markdown", "--sort", "test/loss").stdout.splitlines()
    assert markdown[0].startswith("| run | loss.beta |") and len(markdown) == 5
    assert "failed" in markdown[-1]  # no value: sorted last
    descending = compare(*paths, "--format", "markdown", "--sort", "test/loss", "--descending").stdout.splitlines()
    assert "failed" in descending[-1] and descending[2:4] == markdown[3:1:-1]
    table = compare(*paths)
    assert table.returncode == 0 and "failed" in table.stdout and "± " in table.stdout


def test_plots_are_written(sweep, tmp_path):
    done = compare(str(sweep["dir"]), "--plot", str(tmp_path), "--metrics", "test/recon")
    assert done.returncode == 0, done.stderr
    names = {p.name for p in tmp_path.iterdir()}
    # one swept key: no heat map; the runs' learning curves over each other
    assert names == {"test_recon_vs_loss.beta.png", "rate_distortion.png", "curves.png"}
    for path in tmp_path.iterdir():
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"


def test_heat_map_over_two_swept_keys(tmp_path, run_cli):
    done = run_cli(["-m", "loss.beta=0,1", "model.latent_dim=2,4", "trainer=debug", "logger=none"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    plots = tmp_path / "plots"
    assert compare(str(tmp_path / "outputs"), "--plot", str(plots)).returncode == 0
    assert (plots / "heatmap_test_loss_model.latent_dim_loss.beta.png").stat().st_size > 5000


def test_bad_arguments_get_one_clear_line(tmp_path):
    done = compare(str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no such folder" in done.stderr and "Traceback" not in done.stderr
    empty = compare(str(tmp_path))
    assert empty.returncode == 2 and "no run folders" in empty.stderr


def test_runs_measured_on_different_sample_sizes_are_flagged(sweep, tmp_path, read_json):
    # two completed runs whose SAP was fitted on 1,333 and on 10,000 codes (their records edited so)
    first, second = (tmp_path / name for name in ("a", "b"))
    for folder, size in ((first, 1333), (second, 10000)):
        subprocess.run(["cp", "-r", str(jobs(sweep["dir"])[0]), str(folder)], check=True)
        metrics = read_json(folder / "metrics.json")
        (folder / "metrics.json").write_text(json.dumps({**metrics, "eval/sap": 0.4, "eval/sap_n_train": size}))
    done = compare(str(first), str(second))
    assert done.returncode == 0
    [warning] = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert "eval/sap_n_train: 1333 (1 runs), 10000 (1 runs)" in warning
    assert "warning" not in compare(str(first)).stderr  # one size: nothing to flag


def test_jobs_are_listed_in_job_order_not_name_order(tmp_path):
    from ae_lab.compare import find_runs
    from ae_lab.sweep import jobs_in

    for number in (0, 1, 2, 10, 11):
        folder = tmp_path / f"{number}_abcd{number}"
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"status": "completed"}))
    expected = ["0_abcd0", "1_abcd1", "2_abcd2", "10_abcd10", "11_abcd11"]
    assert [job.folder.name for job in jobs_in(tmp_path)] == expected
    assert [run.folder.name for run in find_runs([tmp_path])] == expected


def test_rows_name_their_runs_and_keys_that_cannot_change_a_result_are_not_swept(sweep, tmp_path):
    """Two sweeps of the same keys, the second's configs differing in where data and logs go and how often
    it checkpointed: one row per sweep and beta, named by its folder, and only loss.beta swept."""
    again = tmp_path / "beta_seed_again"
    subprocess.run(["cp", "-r", str(sweep["dir"]), str(again)], check=True)
    for job in jobs(again):
        path = job / ".hydra" / "config.yaml"
        config = path.read_text().replace("project: ae_lab", "project: elsewhere")
        path.write_text(config.replace("checkpoint_every_n_steps: 500", "checkpoint_every_n_steps: 7")
                        .replace("verbose: false", "verbose: true"))
    rows = list(csv.DictReader(io.StringIO(compare(str(sweep["dir"]), str(again), "--format", "csv").stdout)))
    assert list(rows[0])[:3] == ["run", "loss.beta", "status"]
    # each run named by its path below the folder holding both sweeps; a row's runs are of one sweep
    names = [row["run"].split(", ") for row in rows]
    assert len(rows) == 4 and all(len(row) == 2 for row in names)
    folders = [*jobs(sweep["dir"]), *jobs(again)]
    assert sorted(name.rsplit("/", 2)[-2:] for row in names for name in row) == sorted(
        [folder.parent.name, folder.name] for folder in folders)
    assert all(len({name.rsplit("/", 2)[-2] for name in row}) == 1 for row in names)
    from ae_lab.compare import find_runs, swept_keys

    runs = find_runs([sweep["dir"], again])
    assert swept_keys(runs) == ["loss.beta", "seed"]
    runs[0].config["optim.lr"] = 0.5  # a key that changes results is swept
    assert swept_keys(runs) == ["loss.beta", "optim.lr", "seed"]


def test_metric_columns_keep_their_names_and_numbers_on_a_narrow_terminal(sweep):
    from rich.console import Console

    from ae_lab.compare import build_rows, find_runs, print_table, swept_keys

    runs = find_runs([sweep["dir"]])
    metrics = ["test/loss", "test/recon", "test/kl", "test/elbo", "val/loss", "val/recon"]
    rows = build_rows(runs, swept_keys(runs), metrics, by_seed=True)
    console = Console(width=60, record=True, file=io.StringIO())
    print_table(rows, swept_keys(runs), metrics, False, console)
    text = console.export_text()
    assert "…" not in text and all(len(line) <= 60 for line in text.splitlines()), text
    assert all(metric in text for metric in metrics)
    assert all(f"{row.mean(metric):.4f}" in text for row in rows for metric in metrics)


def test_an_unknown_metric_is_refused_naming_the_closest(sweep):
    done = compare(str(sweep["dir"]), "--metrics", "test/loss,test/elbow")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "--metrics 'test/elbow' is not a metric of these runs (did you mean test/elbo?)")


def test_plot_of_a_single_run_draws_its_curves_and_says_why_nothing_else(sweep, tmp_path, read_json):
    single = tmp_path / "single"
    subprocess.run(["cp", "-r", str(jobs(sweep["dir"])[0]), str(single)], check=True)
    metrics = {key: value for key, value in read_json(single / "metrics.json").items() if not key.endswith("/kl")}
    (single / "metrics.json").write_text(json.dumps(metrics))  # as a plain autoencoder's: no rate
    done = compare(str(single), "--plot", str(tmp_path / "plots"))
    assert done.returncode == 0
    assert "no metric plot: no key that changes a result differs between these runs" in done.stderr
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == ["curves.png"]  # its learning curves
    (single / "history.csv").unlink()
    again = compare(str(single), "--plot", str(tmp_path / "nothing"))
    assert again.returncode == 0 and "nothing written (no run has a history.csv)" in again.stderr
    assert not (tmp_path / "nothing").exists()


def test_an_axis_over_a_decade_or_more_is_logarithmic():
    from ae_lab.compare import log_scale

    assert log_scale([1, 10]) and log_scale([0.001, 0.003, 0.01]) and log_scale([2, 8, 32])
    assert not log_scale([1, 4, 9]) and not log_scale([0, 1, 100]) and not log_scale([-1, 10])


def test_a_sweeps_own_messages_are_tagged_by_who_said_them(sweep):
    """The sweep process's logging (conf/hydra/hydra_logging/ae_lab.yaml) names the logger, not [HYDRA]."""
    assert "[HYDRA]" not in sweep["stdout"]
    assert any("][hydra." in line and "][INFO] - Launching 4 jobs locally" in line
               for line in sweep["stdout"].splitlines()), sweep["stdout"][:2000]
