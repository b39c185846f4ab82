"""A user's own data: array files of rank 2-4 (.npy, .npz, .pt), image folders, a `_target_` loader,
scaling fitted on the training split only, and every bad input refused before training in one line."""

from __future__ import annotations

import hashlib
import logging
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from ae_lab.checks import validate
from ae_lab.data import build_datamodule, input_shape
from ae_lab.data.arrays import MappedRows
from ae_lab.errors import ConfigError
from conftest import compose_config, read_json, run_cli, train_in_process

QUICK = ["trainer=debug", "logger=none", "eval.jacobian_examples=8", "eval.num_reconstructions=3",
         "eval.traversal_dims=2", "eval.traversal_steps=3", "eval.interpolation_steps=3"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def array_config(path, *overrides: str):
    return compose_config(["dataset=array", f"dataset.path={path}", *overrides])


def check(cfg) -> list[str]:
    """What the command line runs before anything is written (ae_lab.hydra_callbacks.CheckBeforeRun)."""
    return validate(cfg, input_shape(cfg.dataset))


def test_sequences_through_the_command_line_conv_vae_with_val_and_test_files(tmp_path):
    rng = np.random.default_rng(0)
    time = np.linspace(0, 6, 24, dtype=np.float32)
    signals = lambda n: np.sin(time + rng.uniform(0, 6, (n, 2, 1))).astype(np.float32)  # noqa: E731
    torch.save({"x": torch.from_numpy(signals(40))}, tmp_path / "train.pt")
    np.save(tmp_path / "val.npy", signals(8))
    np.savez(tmp_path / "test.npz", x=signals(8))
    run_dir = tmp_path / "run"
    done = run_cli(["dataset=array", "dataset.path=train.pt", "dataset.val_path=val.npy", "dataset.test_path=test.npz",
                    "dataset.normalize=standard", "loss.recon=mse", "model.output=linear", "model=vae",
                    "model.arch=conv", "model.channels=[4,8]", *QUICK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = read_json(run_dir / "run.json")
    assert record["status"] == "completed" and record["data"]["name"] == "array"
    assert len(record["data"]["sha256"]) == 64
    scaling = read_json(run_dir / "scaling.json")
    assert scaling["normalize"] == "standard" and scaling["train_examples"] == 40
    assert {"reconstructions.png", "samples.png", "traversals.png"} <= {p.name for p in (run_dir / "figures").iterdir()}
    metrics = read_json(run_dir / "metrics.json")
    assert np.isfinite(metrics["eval/mse"]) and "eval/bce" not in metrics  # no Bernoulli NLL of a linear output


@pytest.mark.parametrize("shape,suffix,arch,model", [((60, 5), ".npz", "mlp", "vae"), ((60, 3, 8, 8), ".npy", "conv", "vae"),
                                                     ((60, 1, 16), ".npz", "conv", "ae"), ((60, 2, 6, 6), ".npz", "mlp", "ae")])
def test_each_rank_and_format_trains_and_records_the_file_checksum(tmp_path, shape, suffix, arch, model):
    rng = np.random.default_rng(1)
    x, labels = rng.uniform(0, 1, shape).astype(np.float32), rng.integers(0, 3, shape[0])
    path = tmp_path / f"data{suffix}"
    np.savez(path, x=x, labels=labels) if suffix == ".npz" else np.save(path, x)
    overrides = [f"dataset.path={path}", f"model={model}", f"model.arch={arch}", "model.channels=[4,8]", *QUICK]
    metrics = train_in_process(["dataset=array", *overrides], tmp_path / "run")
    assert np.isfinite(metrics["test/loss"]) and np.isfinite(metrics["eval/bce"])
    assert ("eval/probe_accuracy" in metrics) == (suffix == ".npz")
    assert read_json(tmp_path / "run" / "run.json")["data"]["sha256"] == sha256(path)
    assert (tmp_path / "run" / "figures" / "reconstructions.png").is_file()


def test_files_are_memory_mapped_not_copied(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((20, 4), np.float32))
    np.savez(tmp_path / "x.npz", x=np.zeros((20, 4), np.float32), labels=np.arange(20) % 2)
    for name in ("x.npy", "x.npz"):
        images = build_datamodule(array_config(tmp_path / name).dataset).splits["train"].images
        assert isinstance(images, MappedRows) and isinstance(images.array, np.memmap)
    # compressed members cannot be mapped: they are decompressed, with the same values
    x = np.random.default_rng(0).uniform(size=(20, 4)).astype(np.float32)
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    packed = build_datamodule(array_config(tmp_path / "packed.npz").dataset)
    rows = packed.splits["train"].index
    np.testing.assert_array_equal(packed.splits["train"].batch(torch.arange(len(rows)))["x"].numpy(), x[rows.numpy()])


def test_scaling_is_fitted_on_the_training_split_only(tmp_path):
    rng = np.random.default_rng(2)
    train = rng.normal([5.0, -2.0, 0.0], [2.0, 0.5, 10.0], (300, 3))
    val = rng.normal(50.0, 1.0, (40, 3))  # far from train: statistics over both would differ a lot
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "val.npy", val)
    base = [f"dataset.val_path={tmp_path / 'val.npy'}", "loss.recon=mse", "model.output=linear"]
    data = build_datamodule(array_config(tmp_path / "train.npy", "dataset.normalize=standard", *base).dataset)
    train_rows = data.splits["train"].index.numpy()
    np.testing.assert_allclose(data.scaling.shift.numpy(), train[train_rows].mean(0), rtol=1e-5)
    np.testing.assert_allclose(data.scaling.scale.numpy(), train[train_rows].std(0), rtol=1e-5)
    seen = data.splits["train"].batch(torch.arange(len(data.splits["train"])))["x"]
    np.testing.assert_allclose(seen.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(seen.std(0, unbiased=False), 1, atol=1e-4)
    val_seen = data.splits["val"].batch(torch.arange(40))["x"]
    np.testing.assert_allclose(val_seen.numpy(), (val - train[train_rows].mean(0)) / train[train_rows].std(0),
                               rtol=1e-4)
    minmax = build_datamodule(array_config(tmp_path / "train.npy", "dataset.normalize=minmax", *base).dataset)
    seen = minmax.splits["train"].batch(torch.arange(len(minmax.splits["train"])))["x"]
    assert seen.min() == pytest.approx(0, abs=1e-6) and seen.max() == pytest.approx(1, abs=1e-6)
    assert minmax.splits["val"].batch(torch.arange(40))["x"].min() > 1  # val is scaled by train's range
    # the run records train's statistics
    train_in_process(["dataset=array", f"dataset.path={tmp_path / 'train.npy'}", "dataset.normalize=standard",
                      *base, *QUICK, "eval.figures=false"], tmp_path / "run")
    recorded = read_json(tmp_path / "run" / "scaling.json")
    np.testing.assert_allclose(recorded["shift"], train[train_rows].mean(0), rtol=1e-5)
    assert recorded["fitted_on"] == "train" and recorded["train_examples"] == len(train_rows)


def test_scaling_is_fitted_without_the_held_out_class(tmp_path):
    """The anomalies are not trained on, so they do not shape the scaling either."""
    rng = np.random.default_rng(3)
    labels = np.arange(200) % 4 == 0  # class 1: a quarter of the records, far from the others
    x = np.where(labels[:, None], rng.normal(100.0, 1.0, (200, 3)), rng.normal(0.0, 1.0, (200, 3)))
    np.savez(tmp_path / "d.npz", x=x, labels=labels.astype(int))
    data = build_datamodule(array_config(tmp_path / "d.npz", "dataset.normalize=standard", "dataset.held_out_class=1",
                                         "loss.recon=mse", "model.output=linear").dataset)
    trained = data.splits["train"].index.numpy()  # the class held out, as training sees it
    assert len(trained) > 0 and not labels[trained].any()
    np.testing.assert_allclose(data.scaling.shift.numpy(), x[trained].mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.scaling.scale.numpy(), x[trained].std(0), rtol=1e-6)
    assert data.scaling.record()["train_examples"] == len(trained)


def test_breast_cancer_anomaly_detection_as_in_the_readme(tmp_path):
    """The example of docs/own-data.md: train on benign records only, score malignant ones by reconstruction error."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    np.savez(tmp_path / "breast_cancer.npz", x=table.data, labels=(table.target == 0).astype(int))  # 1: malignant
    metrics = train_in_process(
        ["dataset=array", f"dataset.path={tmp_path / 'breast_cancer.npz'}", "dataset.normalize=standard",
         "dataset.held_out_class=1", "dataset.test_fraction=0.3", "loss.recon=mse", "model.output=linear",
         "model.hidden_dims=[16]", "model.latent_dim=4", "trainer.max_epochs=60", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "logger=none", "eval.figures=false"], tmp_path / "run")
    assert metrics["eval/anomaly_auroc_recon"] > 0.85


BAD_ARRAYS = {
    "missing.npy": (None, "dataset.path='{dir}/missing.npy' is not allowed: no such file"),
    "not_numpy.npy": (b"just text", "not a .npy file"),
    "objects.npy": ("objects", "pickled Python objects"),
    "objects.pt": ("pt_objects", "pickled Python objects"),
    "wrong_key.npz": ({"inputs": np.zeros((10, 3))}, "unknown array 'inputs'"),
    "no_x.pt": ({"labels": torch.zeros(10, dtype=torch.long)}, "no tensor x"),
    "rank1.npy": (np.zeros(10), "rank 1"),
    "rank5.npy": (np.zeros((4, 1, 2, 2, 2)), "rank 5"),
    "short_labels.npz": ({"x": np.zeros((10, 3)), "labels": np.zeros(9, int)}, "9 labels for 10 examples"),
    "short_factors.npz": ({"x": np.zeros((10, 3)), "factors": np.zeros((8, 2))}, "factors have shape (8, 2)"),
    "nan.npy": ("nan", "3 NaN or infinite value(s), the first in example 4"),
    "tiny.npy": (np.zeros((3, 2)), "give train/val/test splits of 2/0/1"),
    "strings.npz": ({"x": np.array([["a", "b"]] * 10)}, "dtype <U1"),
}


def write_bad(path, content) -> None:
    if content is None:
        return
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str) and content == "objects":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif isinstance(content, str) and content == "pt_objects":
        torch.save({"x": torch.zeros(10, 3), "note": Fraction(1, 3)}, path)  # any Python object
    elif isinstance(content, str) and content == "nan":
        x = np.ones((20, 3))
        x[4, 1], x[4, 2], x[11, 0] = np.nan, np.inf, -np.inf
        np.save(path, x)
    elif isinstance(content, dict) and path.suffix == ".pt":
        torch.save(content, path)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, content)


@pytest.mark.parametrize("name", sorted(BAD_ARRAYS))
def test_bad_array_files_are_refused_naming_the_key(tmp_path, name):
    content, message = BAD_ARRAYS[name]
    write_bad(tmp_path / name, content)
    with pytest.raises(ConfigError, match=r"^dataset\.path=") as refused:
        check(array_config(tmp_path / name, "loss.recon=mse"))
    assert message.format(dir=tmp_path) in str(refused.value)
    assert "\n" not in str(refused.value)


def test_bad_combinations_with_the_data_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 3, (30, 4)), labels=np.arange(30) % 2)
    np.save(tmp_path / "other.npy", np.zeros((10, 5)))
    cases = [
        ([], r"^loss\.recon='bce' is not allowed: .*lie in .* use dataset\.normalize=minmax, or loss\.recon=mse"),
        (["loss.recon=mse"], r"^model\.output='sigmoid' is not allowed"),
        (["loss.recon=mse", "model.output=linear", "dataset.held_out_class=7"], r"^dataset\.held_out_class=7 .*\[0, 1\]"),
        (["loss.recon=mse", "model.output=linear", "model.arch=conv"], r"^model\.arch='conv' is not allowed"),
        (["loss.recon=mse", "model.output=linear", f"dataset.test_path={tmp_path / 'other.npy'}"],
         r"^dataset\.test_path=.*shape \(5,\)"),
        (["model.output=linear", "dataset.normalize=minmax"], r"^model\.output='linear' is not allowed"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            check(array_config(tmp_path / "d.npz", *overrides))
    check(array_config(tmp_path / "d.npz", "dataset.normalize=minmax"))  # the fix the message offers


@pytest.mark.parametrize("overrides,key", [
    (["dataset.path=nan.npy", "loss.recon=mse"], "dataset.path='nan.npy' is not allowed: x holds 1 NaN"),
    (["dataset.path=big.npy"], "loss.recon='bce' is not allowed"),
])
def test_the_command_line_refuses_bad_data_before_training(tmp_path, overrides, key):
    x = np.full((20, 3), 7.0)
    np.save(tmp_path / "big.npy", x)
    x[2, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    done = run_cli(["dataset=array", *overrides, "logger=none"], cwd=tmp_path)
    assert done.returncode == 2
    assert key in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def write_png(path, colour, size=(6, 5), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def folder_config(folder, tmp_path, *overrides: str):
    return compose_config(["dataset=image_folder", f"dataset.path={folder}", f"dataset.root={tmp_path / 'cache'}",
                           "dataset.size=[4,6]", "dataset.val_fraction=0.2", *overrides])


def test_image_folder_classes_resize_and_cache_that_notices_a_changed_file(tmp_path):
    folder = tmp_path / "photos"
    for index in range(6):
        write_png(folder / "cats" / f"{index}.png", (200, 10, 10))
        write_png(folder / "dogs" / f"{index}.jpg", (10, 10, 200))
    data = build_datamodule(folder_config(folder, tmp_path).dataset)
    assert data.input_shape == (3, 4, 6)
    every = torch.cat([data.splits[s].batch(torch.arange(len(data.splits[s])))["label"] for s in data.splits])
    assert sorted(every.tolist()) == [0] * 6 + [1] * 6
    train = data.splits["train"].batch(torch.arange(len(data.splits["train"])))
    red = train["x"][train["label"] == 0]
    assert torch.allclose(red[:, 0], torch.tensor(200 / 255)) and torch.allclose(red[:, 2], torch.tensor(10 / 255))
    assert len(list((tmp_path / "cache" / "image_folder_cache").glob("decoded-*"))) == 1
    write_png(folder / "cats" / "0.png", (0, 255, 0))  # a changed file: a new checksum, decoded afresh
    changed = build_datamodule(folder_config(folder, tmp_path).dataset)
    assert changed.checksum != data.checksum
    assert len(list((tmp_path / "cache" / "image_folder_cache").glob("decoded-*"))) == 2
    pixels = torch.cat([changed.splits[s].batch(torch.arange(len(changed.splits[s])))["x"] for s in changed.splits])
    assert (pixels[:, 1] == 1).all(1).all(1).sum() == 1  # the green cat is there


def test_rgb_image_folder_trains_a_colourisation_conv_net_with_colour_figures(tmp_path, caplog):
    folder = tmp_path / "mixed"
    for index in range(10):
        write_png(folder / f"{index}.png", (index * 20, 100, 50))
    write_png(folder / "grey.png", 128, mode="L")
    with caplog.at_level(logging.WARNING):
        metrics = train_in_process(["dataset=image_folder", f"dataset.path={folder}", f"dataset.root={tmp_path}",
                                    "dataset.size=8", "model.arch=conv", "model.channels=[4,8]", "noise=grayscale",
                                    *QUICK],
                                   tmp_path / "run")
    assert "mixes grey images (1, e.g. grey.png) and colour ones (10" in caplog.text
    assert np.isfinite(metrics["test/loss"]) and "eval/probe_accuracy" not in metrics
    assert np.isfinite(metrics["eval/psnr_corrupted"]) and np.isfinite(metrics["eval/psnr_denoised"])
    skipped = read_json(tmp_path / "run" / "evaluation.json")["skipped"]
    assert "the data have no labels" in skipped["probe_accuracy, anomaly_auroc"]
    assert (tmp_path / "run" / "figures" / "reconstructions.png").is_file()


def test_what_reading_the_data_says_is_said_in_each_run_not_at_the_checks(tmp_path, caplog):
    """The checks read a user's data before the run's logging exists (its console format, its ae_lab.log):
    the mixed-colour warning is said when a run builds its data, in every run of the process."""
    from ae_lab.data import own_data

    folder = tmp_path / "mixed"
    for index in range(4):
        write_png(folder / f"{index}.png", (index * 20, 100, 50))
    write_png(folder / "grey.png", 128, mode="L")
    cfg = folder_config(folder, tmp_path)
    with caplog.at_level(logging.INFO):
        own_data(cfg.dataset)  # as ae_lab.hydra_callbacks.CheckBeforeRun does
        assert "mixes grey images" not in caplog.text
        for run in (1, 2):
            build_datamodule(cfg.dataset)
            assert caplog.text.count("mixes grey images (1, e.g. grey.png) and colour ones (4") == run


def test_bad_image_folders_are_refused_naming_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    write_png(tmp_path / "notes" / "a.png", (1, 2, 3))
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    write_png(tmp_path / "broken" / "a.png", (1, 2, 3))
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    cases = {"empty": "holds no images", "notes": "readme.txt is not an image", "broken": "b.png is not a readable image",
             "absent": "no such folder"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=rf"^dataset\.path=.*{message}"):
            check(folder_config(tmp_path / name, tmp_path))


def test_target_loader_returns_a_data_module_that_trains(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "import torch\n"
        "from ae_lab.data import ArrayDataModule, Split\n\n"
        "def make_data(n: int, width: int) -> ArrayDataModule:\n"
        "    x = torch.rand(n, width)\n"
        "    splits = {'train': Split(x[: n - 8]), 'val': Split(x[n - 8: n - 4]), 'test': Split(x[n - 4:])}\n"
        "    return ArrayDataModule('my_data', splits, batch_size=16, num_workers=0, checksum='made-in-python')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["dataset=custom", "dataset._target_=my_data.make_data", "+dataset.kwargs.n=40", "+dataset.kwargs.width=5"]
    assert input_shape(compose_config(overrides).dataset) == (5,)
    metrics = train_in_process([*overrides, *QUICK, "eval.figures=false"], tmp_path / "run")
    assert np.isfinite(metrics["test/loss"])
    assert read_json(tmp_path / "run" / "run.json")["data"] == {"name": "my_data", "sha256": "made-in-python"}
    with pytest.raises(ConfigError, match=r"^dataset\._target_='my_data\.nothing' is not allowed"):
        check(compose_config(["dataset=custom", "dataset._target_=my_data.nothing"]))
    with pytest.raises(ConfigError, match=r"^dataset\._target_ is missing"):
        check(compose_config(["dataset=custom"]))
    sys.modules.pop("my_data", None)


def test_figures_show_a_users_data_in_its_own_units(tmp_path, monkeypatch):
    """The docs' promise (docs/own-data.md, Scaling): figures undo `dataset.normalize`. What the figure code is
    handed for the test split's (standardised) rows is the rows as they are in the file."""
    from ae_lab.evaluation import visual

    raw = np.random.default_rng(3).normal([5.0, -2.0, 0.0], [2.0, 0.5, 10.0], (200, 3))
    np.save(tmp_path / "rows.npy", raw)
    data = build_datamodule(array_config(tmp_path / "rows.npy", "dataset.normalize=standard", "loss.recon=mse",
                                         "model.output=linear").dataset)
    drawn = {}
    monkeypatch.setattr(visual, "signal_rows", lambda rows, path, **options: drawn.update(rows) or path)
    test = data.splits["test"]
    scaled = test.batch(torch.arange(len(test)))["x"]
    assert scaled.abs().max() < 5 and raw.std(0).max() > 9  # the model sees standardised rows
    visual._drawer(data)({"input": scaled}, tmp_path / "figure.png")
    np.testing.assert_allclose(drawn["input"].numpy(), raw[test.index.numpy()], rtol=1e-5, atol=1e-5)
