"""`ae_lab.load` and the trained model's operations in the data's own units, checked against what the
run's evaluation recorded (metrics.json, evaluation.json, scores.npz, the codes it computed) and
against hand-written torch, numpy and scikit-learn; every refusal in one line."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import roc_auc_score

import ae_lab
from ae_lab.data import build_datamodule, units
from ae_lab.data.base import Split
from ae_lab.ensemble.group import Member, run_group
from ae_lab.evaluation import downstream, evaluate as evaluate_module
from ae_lab.trained import InputError, LoadError
from paths import SHARED, needs_shared

SMALL = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "model.hidden_dims=[32]", "model.latent_dim=4", "eval.jacobian_examples=0"]
ANOMALY = ["dataset.held_out_class=0"]
FIGURES = ["eval.num_reconstructions=3", "eval.traversal_dims=2", "eval.traversal_steps=3", "eval.interpolation_steps=3"]
loaded = lru_cache(ae_lab.load)  # the tests that only read a model share one load of it


@pytest.fixture(scope="module")
def vae(tmp_path_factory, train_in_process) -> Path:
    """A digits VAE (Bernoulli decoder: recon and -ELBO scores) with class 0 held out, its figures drawn."""
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    train_in_process([*SMALL, *ANOMALY, *FIGURES, "model=vae", "trainer.max_epochs=2", "eval.iw_samples=3",
                      "eval.probe_train_size=0"], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def members(tmp_path_factory, compose_config) -> tuple[list[Path], dict[int, torch.Tensor]]:
    """Two plain autoencoders trained as one vectorised group (seeds 0 and 1), class 0 held out, no
    figures; and the test codes their evaluation computed, by seed."""
    folder = tmp_path_factory.mktemp("members")
    members = [Member(compose_config([*SMALL, *ANOMALY, "trainer.max_epochs=2", "eval.figures=false",
                                      f"seed={seed}"]), folder / str(seed)) for seed in (0, 1)]
    codes = {}
    encode_split = evaluate_module.encode_split

    def recording(module, split, cfg):
        encoded = encode_split(module, split, cfg)
        codes[cfg.seed] = encoded.codes
        return encoded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "encode_split", recording)
        run_group(members, "g", folder / "g.pt")
    return [member.run_dir for member in members], codes


@pytest.fixture(scope="module")
def rows(tmp_path_factory, train_in_process) -> tuple[Path, np.ndarray]:
    """A linear-output AE on rows of three columns of very different ranges, `normalize=standard`, with a
    test file of its own; and that file's rows."""
    folder = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(260, 2))
    mixing = np.array([[3.0, 0.5], [-1.0, 2.0], [0.2, -0.7]])
    x = (factors @ mixing.T * [40.0, 0.02, 5.0] + [1000.0, -3.0, 0.0] + rng.normal(0, 0.1, (260, 3))).astype(np.float32)
    np.save(folder / "train.npy", x[:200])
    np.save(folder / "test.npy", x[200:])
    run_dir = folder / "run"
    train_in_process(["dataset=array", f"dataset.path={folder / 'train.npy'}", f"dataset.test_path={folder / 'test.npy'}",
                      "dataset.normalize=standard", "loss.recon=mse", "model.output=linear", *SMALL,
                      "model.latent_dim=2", "trainer.max_epochs=3", "eval.figures=false"], run_dir)
    return run_dir, x[200:]


# ----- the same numbers as the run's evaluation

def test_encode_gives_the_codes_evaluation_used_and_its_probe_accuracy(members, read_json):
    """A vectorised sweep's member: its codes of the raw test split are those its evaluation computed
    (and have the per-unit variances of evaluation.json); the probe refitted on codes from `encode`
    scores what metrics.json says."""
    (run_dir, _), codes = members
    model = loaded(run_dir)
    assert model.record["ensemble"]["members"] == 2
    test = model.encode(model.split_inputs("test"))
    assert np.allclose(test, codes[0].numpy(), rtol=0, atol=1e-6)
    details = read_json(run_dir / "evaluation.json")
    assert np.allclose(test.var(0), details["code_variance_per_unit"], rtol=1e-5)
    # the probe as evaluation fits it: its training examples drawn first from eval.seed (a plain AE
    # draws nothing before), the test split's classes trained on
    torch.manual_seed(model.cfg.eval.seed)
    train, train_labels = model.split_inputs("train"), model.split_labels("train")
    positions = torch.randperm(len(train))[:model.cfg.eval.probe_train_size].numpy()
    labels = model.split_labels("test")
    known = labels != model.cfg.dataset.held_out_class
    downstream._FITTED.clear()  # fit it again rather than find evaluation's result for equal inputs
    accuracy = downstream.probe_accuracy(model.encode(train[positions]), train_labels[positions], test[known],
                                         labels[known])
    assert accuracy == read_json(run_dir / "metrics.json")["eval/probe_accuracy"]


def test_score_ranks_the_test_split_as_the_anomaly_aurocs_of_metrics_json(members, vae, read_json):
    for run_dir in (members[0][1], vae):
        model, metrics = loaded(run_dir), read_json(run_dir / "metrics.json")
        x, is_anomaly = model.split_inputs("test"), model.split_labels("test") == 0
        assert model.score_kinds == (("recon", "elbo") if run_dir == vae else ("recon",))
        for kind in model.score_kinds:
            assert roc_auc_score(is_anomaly, model.score(x, kind=kind)) == metrics[f"eval/anomaly_auroc_{kind}"]
        assert np.array_equal(model.score(x), model.score(x, kind=model.score_kinds[-1]))


def test_scores_npz_holds_every_test_example_and_gives_the_aurocs_of_metrics_json(members, vae, read_json):
    """Written for a single run and for each member of a vectorised group; the ROC figure with figures on."""
    for run_dir in (*members[0], vae):
        scores, metrics = np.load(run_dir / "scores.npz"), read_json(run_dir / "metrics.json")
        model = loaded(run_dir)
        assert set(scores.files) == {*model.score_kinds, "labels", "is_anomaly"}
        assert np.array_equal(scores["labels"], model.split_labels("test"))
        assert np.array_equal(scores["is_anomaly"], scores["labels"] == 0) and scores["is_anomaly"].any()
        for kind in model.score_kinds:
            assert roc_auc_score(scores["is_anomaly"], scores[kind]) == metrics[f"eval/anomaly_auroc_{kind}"]
            assert np.allclose(scores[kind], model.score(model.split_inputs("test"), kind=kind), rtol=1e-5)
        assert (run_dir / "figures" / "roc.png").is_file() == (run_dir == vae)
    roc = np.asarray(Image.open(vae / "figures" / "roc.png").convert("L"), dtype=np.float32)
    assert roc.std() > 20  # drawn, not blank


def test_the_scores_are_the_bce_and_minus_elbo_written_out_by_hand(members, vae):
    """recon: the Bernoulli NLL of the reconstruction (digits / 16); elbo: the closed-form KL plus that
    NLL at z = mean + sd * eps for k = eval.iw_samples draws eps from eval.seed, shared by all examples."""
    plain, model = loaded(members[0][0]), loaded(vae)
    x = torch.from_numpy(plain.split_inputs("test")[:50]) / 16

    def bce(p: torch.Tensor) -> torch.Tensor:
        return -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(1)

    assert torch.allclose(plain.score(x * 16), bce(plain.reconstruct(x * 16) / 16), rtol=1e-4)
    mean, logvar = model.encode_params(x * 16)
    eps = torch.randn(model.cfg.eval.iw_samples, model.latent_dim, generator=torch.Generator().manual_seed(model.cfg.eval.seed))
    nll = torch.stack([bce(model.decode(mean + torch.exp(logvar / 2) * e) / 16) for e in eps]).mean(0)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(model.score(x * 16, kind="elbo"), nll + kl, rtol=1e-4)
    assert torch.allclose(model.score(x * 16, kind="recon"), bce(model.reconstruct(x * 16) / 16), rtol=1e-4)


def test_a_model_on_standardised_rows_takes_and_gives_raw_values(rows, read_json):
    """Fed the test file's raw rows, it reconstructs them in raw units: the squared error mapped through
    scaling.json's scale is the test MSE of metrics.json (which evaluation measured in model units)."""
    run_dir, raw = rows
    model = loaded(run_dir)
    assert np.array_equal(model.split_inputs("test"), raw)
    scaling = read_json(run_dir / "scaling.json")
    shift, scale = np.asarray(scaling["shift"]), np.asarray(scaling["scale"])
    assert np.allclose(model.to_model(raw).numpy(), (raw - shift) / scale, atol=1e-5)
    reconstruction = model.reconstruct(raw)
    assert abs(reconstruction[:, 0].mean() - 1000) < 50  # raw units, not standardised ones
    mse = (((reconstruction - raw) / scale) ** 2).sum(1).mean()
    assert mse == pytest.approx(read_json(run_dir / "metrics.json")["eval/mse"], rel=1e-5)
    assert np.allclose(model.from_model(model.to_model(raw)).numpy(), raw, rtol=1e-5, atol=1e-4)


def test_to_model_gives_what_the_loader_gave(vae):
    model = loaded(vae)
    raw = model.split_inputs("test")
    assert raw.max() == 16 and np.array_equal(raw, raw.round())  # digits' pixel counts
    test = build_datamodule(model.cfg.dataset).splits["test"]
    assert torch.equal(model.to_model(raw), test.batch(torch.arange(len(test)))["x"])
    assert len(model.training_codes()) == len(model.split_inputs("train")) == len(build_datamodule(model.cfg.dataset).splits["train"])


@pytest.mark.parametrize("binarize,expected", [("none", [0, 127 / 255, 128 / 255, 1]), ("threshold", [0, 0, 1, 1]),
                                               ("static", [0, 127 / 255, 128 / 255, 1])])
def test_mnist_raw_pixels_become_what_each_binarisation_trained_on(tmp_path, binarize, expected, compose_config):
    cfg = compose_config(["dataset=mnist", f"dataset.binarize={binarize}"]).dataset
    mnist = units(cfg, tmp_path, (1, 28, 28))
    pixels = torch.tensor([0.0, 127, 128, 255])
    assert torch.allclose(mnist.to_model(pixels), torch.tensor(expected, dtype=torch.float32))
    # a split that holds a fixed binary draw ({0, 1}) gives raw 0 or 255; one drawn per batch its intensities
    drawn = Split(torch.tensor([[0, 1]], dtype=torch.uint8), pixel_scale=1.0)
    assert mnist.raw(drawn, torch.arange(1)).tolist() == [[0.0, 255.0]]
    intensities = Split(torch.tensor([[0, 200]], dtype=torch.uint8), pixel_scale=255.0, resample_binary=True)
    assert mnist.raw(intensities, torch.arange(1)).tolist() == [[0.0, 200.0]]


def _folder_of_images(folder: Path) -> None:
    """Two classes of six random 12 x 10 RGB images."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / label / f"{k}.png")


@pytest.mark.parametrize("overrides", [
    ["dataset=digits"],
    ["dataset=image_folder", "dataset.path={tmp}/images", "dataset.root={tmp}", "dataset.size=[6,5]",
     "dataset.normalize=standard"],
    ["dataset=array", "dataset.path={tmp}/rows.npy", "dataset.normalize=minmax"],
    *[pytest.param(["dataset=mnist", f"dataset.root={SHARED}", f"dataset.binarize={mode}"], marks=needs_shared, id=mode)
      for mode in ("dynamic",)],  # its evaluation splits a fixed draw, its training split drawn per batch
], ids=lambda overrides: overrides[0] if isinstance(overrides, list) else None)
def test_each_data_sets_raw_examples_become_what_its_loader_serves(tmp_path, overrides, compose_config):
    """Every split as raw examples (`Units.raw`), mapped by `to_model`, equals the loader's own batches:
    the preprocessing rebuilt from the config and the run folder (scaling.json) is the loader's."""
    np.save(tmp_path / "rows.npy", np.random.default_rng(1).normal(50, 20, (40, 3)).astype(np.float32))
    _folder_of_images(tmp_path / "images")
    cfg = compose_config([override.format(tmp=tmp_path) for override in overrides]).dataset
    data = build_datamodule(cfg)
    if data.scaling is not None:  # what the run writes into its folder
        (tmp_path / "scaling.json").write_text(json.dumps(data.scaling.record()))
    data_units = units(cfg, tmp_path, data.input_shape)
    for name, split in data.splits.items():
        if split.resample_binary:  # drawn afresh per batch: raw gives the draws' expectation
            continue
        positions = torch.arange(min(len(split), 300))
        served = split.batch(positions)["x"]
        assert torch.allclose(data_units.to_model(data_units.raw(split, positions)), served, atol=1e-6), name
        assert torch.allclose(data_units.from_model(served), data_units.raw(split, positions), rtol=1e-5, atol=1e-4)


# ----- the operations

def test_interpolation_ends_and_a_traversal_to_the_codes_own_value_are_reconstructions(vae):
    model = loaded(vae)
    a, b = model.split_inputs("test")[:2]
    path = model.interpolate(a, b, steps=5)
    assert path.shape == (5, 1, 8, 8)
    ends = model.reconstruct(np.stack([a, b]))
    assert np.allclose(path[[0, -1]], ends, atol=1e-5)
    assert not np.allclose(path[2], ends[0], atol=1e-2)
    code = model.encode(a)
    swept = model.traverse(a, 1, [code[1], code[1] + 3])
    assert swept.shape == (2, 1, 8, 8) and np.allclose(swept[0], ends[0], atol=1e-5)
    shifted = code.copy()
    shifted[1] += 3
    assert np.allclose(swept[1], model.decode(shifted), atol=1e-5)


def test_numpy_in_numpy_out_torch_in_torch_out_one_example_without_its_batch_axis(vae):
    model = loaded(vae)
    x = model.split_inputs("test")[:6]
    codes = model.encode(x)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.float32 and codes.shape == (6, 4)
    as_torch = model.encode(torch.from_numpy(x))
    assert isinstance(as_torch, torch.Tensor) and np.array_equal(as_torch.numpy(), codes)
    assert np.allclose(model.encode(x[0]), codes[0], atol=1e-6) and model.encode(x[0]).shape == (4,)
    assert model.score(x[0]).shape == () and model.reconstruct(x[0]).shape == (1, 8, 8)
    mean, logvar = model.encode_params(x)
    assert np.array_equal(mean, codes) and logvar.shape == (6, 4)
    torch.manual_seed(0)
    drawn = model.encode(x, sample=True)
    torch.manual_seed(0)
    assert np.array_equal(drawn, model.encode(x, sample=True)) and not np.allclose(drawn, codes)
    assert isinstance(model.decode(torch.from_numpy(codes)), torch.Tensor)


def test_batches_give_what_one_batch_gives(vae):
    model = loaded(vae)
    x = model.split_inputs("test")[:40]
    for operation in (model.encode, model.reconstruct, model.score):
        assert np.allclose(operation(x, batch_size=7), operation(x), rtol=1e-5, atol=1e-6)


def test_loading_and_scoring_change_no_global_random_state(vae):
    state = torch.get_rng_state()
    model = ae_lab.load(vae)
    model.score(model.split_inputs("test")[:10])
    assert torch.equal(torch.get_rng_state(), state)


def test_image_files_round_trip_in_the_data_sets_units(vae, tmp_path):
    """Raw digits (0..16) to PNG and back, within half a PNG level; a larger colour file is turned grey
    (ITU-R 601 luma, as Pillow) and resized to 8 x 8, as dataset=image_folder does."""
    model = loaded(vae)
    x = model.split_inputs("test")[:3]
    paths = [tmp_path / f"{k}.png" for k in range(3)]
    model.write_images(x, paths)
    assert np.asarray(Image.open(paths[0])).shape == (8, 8)
    assert np.abs(model.read_images(paths) - x).max() <= 16 / 255 / 2 + 1e-6
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    red = model.read_images([tmp_path / "red.png"])
    assert red.shape == (1, 1, 8, 8) and np.allclose(red, round(255 * 299 / 1000) * 16 / 255)


# ----- refusals, each in one line

def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def _refused(path, *, which: str = "best") -> str:
    with pytest.raises(LoadError) as error:
        ae_lab.load(path, which=which)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_load_refuses_what_is_not_a_finished_run_in_one_line_naming_the_path_and_the_fix(vae, tmp_path, read_json):
    assert "no such folder" in _refused(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} is not a run folder" in _refused(tmp_path / "empty")
    sweep = tmp_path / "sweep"
    shutil.copytree(vae, sweep / "0_abc")
    assert f"a sweep folder? give one of its runs, e.g. {sweep / '0_abc'}" in _refused(sweep)
    assert "which='middle' is not allowed" in _refused(vae, which="middle")
    run = _copy(vae, tmp_path)
    record = read_json(run / "run.json")
    (run / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    message = _refused(run)
    assert f"{run} is not a finished run (status interrupted)" in message and f"resume={run}" in message
    (run / "run.json").write_text(json.dumps({**record, "data": {**record["data"], "sha256": "0" * 64}}))
    with pytest.raises(LoadError, match=f"^{run}'s data set digits has changed since the run .*run.json's"):
        ae_lab.load(run).split_inputs("test")
    (run / "run.json").write_text(json.dumps(record))
    shutil.copy(run / "checkpoints" / "best.ckpt", tmp_path / "loose.ckpt")
    assert "checkpoints/ folder" in _refused(tmp_path / "loose.ckpt")
    (run / "checkpoints" / "best.ckpt").unlink()
    assert _refused(run) == f"{run} has no checkpoints/best.ckpt: it has checkpoints/last.ckpt: load that with which='last'"
    assert ae_lab.load(run, which="last").checkpoint.name == ae_lab.load(run / "checkpoints" / "last.ckpt").checkpoint.name


def test_load_refuses_a_checkpoint_of_another_config_and_a_data_set_it_cannot_rebuild(vae, tmp_path):
    run = _copy(vae, tmp_path)
    config = run / ".hydra" / "config.yaml"
    recorded = OmegaConf.load(config)
    changed = OmegaConf.merge(recorded, {"model": {"latent_dim": 5}})
    OmegaConf.save(changed, config)
    message = _refused(run)
    assert f"{run / 'checkpoints' / 'best.ckpt'} is a checkpoint of another config" in message
    assert "model.latent_dim=4 there, 5 in the run" in message
    recorded.dataset = {"_target_": "my_module.make_data", "kwargs": {}, "held_out_class": None}
    OmegaConf.save(recorded, config)
    message = _refused(run)
    assert f"{run}: its data set's preprocessing cannot be rebuilt" in message and "dataset=array" in message
    recorded.dataset = {"name": "faces"}
    OmegaConf.save(recorded, config)
    assert "dataset.name='faces' is not allowed: one of digits" in _refused(run)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"not a checkpoint")
    assert "is not an ae_lab checkpoint that can be read" in _refused(run / "checkpoints" / "best.ckpt")


def test_a_call_the_model_cannot_serve_is_refused_in_one_line(members, vae, rows):
    plain, model, table = loaded(members[0][0]), loaded(vae), loaded(rows[0])
    refusals = {
        "x of shape (3, 5) is not allowed: this model takes a batch of shape (N, 1, 8, 8) or one example of shape (1, 8, 8)":
            lambda: model.encode(np.zeros((3, 5))),
        "z of shape (2, 3) is not allowed: this model takes a batch of shape (N, 4)": lambda: model.decode(np.zeros((2, 3))),
        "unit=4 is not allowed: a code unit of 0..3": lambda: model.traverse(np.zeros((1, 8, 8)), 4, [0.0]),
        "encode_params is not allowed": lambda: plain.encode_params(np.zeros((1, 8, 8))),
        "encode(sample=True) is not allowed": lambda: plain.encode(np.zeros((1, 8, 8)), sample=True),
        "kind='elbo' is not allowed: this model scores 'recon'": lambda: plain.score(np.zeros((1, 8, 8)), kind="elbo"),
        "image files are not allowed": lambda: table.read_images(["x.png"]),
        "split 'dev' is not allowed: one of train, val, test": lambda: model.split_inputs("dev"),
    }
    for expected, call in refusals.items():
        with pytest.raises(InputError) as error:
            call()
        assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_operations_give_what_they_give_on_the_cpu(vae):
    cpu, gpu = loaded(vae), ae_lab.load(vae, device="cuda")
    x = cpu.split_inputs("test")
    assert np.allclose(gpu.encode(x), cpu.encode(x), atol=1e-5)
    for kind in cpu.score_kinds:
        assert np.allclose(gpu.score(x, kind=kind), cpu.score(x, kind=kind), rtol=1e-4)
    reconstruction = gpu.reconstruct(torch.from_numpy(x).cuda())
    assert reconstruction.device.type == "cuda" and np.allclose(reconstruction.cpu().numpy(), cpu.reconstruct(x), atol=1e-5)
    assert gpu.training_codes().device.type == "cpu"
