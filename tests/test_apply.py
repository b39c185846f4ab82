"""`python -m ae_lab.apply`: a trained run on a memory-mapped file and on an image folder, equal to the
same operations computed in-process; the score threshold's false-positive rate on validation; every
refusal in one line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ae_lab.apply import calibrate, main, read_inputs

AE = ["model.hidden_dims=[32]", "model.latent_dim=4", "trainer=debug", "logger=none", "eval=minimal"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, train_and_load):
    return train_and_load(AE, tmp_path_factory.mktemp("apply") / "run")


@pytest.fixture(scope="module")
def digits(model) -> np.ndarray:
    """The test split in raw units (counts 0..16), with a Gaussian noise to denoise."""
    test = model.split_inputs("test")
    return np.clip(test + np.random.default_rng(0).normal(0, 2, test.shape), 0, 16).astype(np.float32)


def apply(*arguments: str) -> None:
    assert main([str(argument) for argument in arguments]) == 0


def test_encode_and_reconstruct_a_memory_mapped_file_batch_by_batch(model, digits, tmp_path):
    np.save(tmp_path / "x.npy", digits)
    assert isinstance(read_inputs(tmp_path / "x.npy", "x").array, np.memmap)
    apply(model.run_dir, "encode", "--input", tmp_path / "x.npy", "--output", tmp_path / "codes.npy", "--batch-size", 100)
    np.testing.assert_allclose(np.load(tmp_path / "codes.npy"), model.encode(digits), rtol=1e-6, atol=1e-6)
    np.savez(tmp_path / "x.npz", noisy=digits)  # a named array of a .npz
    apply(model.run_dir, "reconstruct", "--input", tmp_path / "x.npz", "--array", "noisy",
          "--output", tmp_path / "clean.npy", "--batch-size", 64)
    np.testing.assert_allclose(np.load(tmp_path / "clean.npy"), model.reconstruct(digits), rtol=1e-6, atol=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clean.npy", "codes.npy", "x.npy", "x.npz"]


def test_an_image_folder_is_reconstructed_into_pngs_of_the_same_names(model, digits, tmp_path):
    inputs = tmp_path / "noisy"
    names = ["a/one.png", "a/two.png", "b/three.png", "four.png", "five.png"]
    for name in names:
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
    model.write_images(digits[:5], [inputs / name for name in names])
    apply(model.run_dir, "reconstruct", "--input", inputs, "--output", tmp_path / "clean", "--batch-size", 2)
    written = sorted(str(path.relative_to(tmp_path / "clean")) for path in (tmp_path / "clean").rglob("*.png"))
    assert written == sorted(names)
    # in-process, from the same files: read, reconstruct, written as PNG the same way
    expected = tmp_path / "expected"
    expected.mkdir()
    model.write_images(model.reconstruct(model.read_images([inputs / name for name in names])),
                       [expected / f"{index}.png" for index in range(len(names))])
    for index, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "clean" / name)),
                                      np.asarray(Image.open(expected / f"{index}.png")))
    # --overwrite replaces the images of the same names and keeps what else the folder holds
    (tmp_path / "clean" / "notes.txt").write_text("mine")
    (tmp_path / "clean" / "four.png").write_bytes(b"old")
    apply(model.run_dir, "reconstruct", "--input", inputs, "--output", tmp_path / "clean", "--overwrite")
    assert (tmp_path / "clean" / "notes.txt").read_text() == "mine"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "clean" / "four.png")),
                                  np.asarray(Image.open(expected / "3.png")))
    # an array output of a folder lists the files in its order
    apply(model.run_dir, "encode", "--input", inputs, "--output", tmp_path / "codes.npy")
    order = (tmp_path / "codes.files.txt").read_text().split()
    np.testing.assert_allclose(np.load(tmp_path / "codes.npy"),
                               model.encode(model.read_images([inputs / name for name in order])), rtol=1e-6, atol=1e-6)


def test_score_with_a_threshold_at_a_false_positive_rate_of_the_validation_split(model, digits, tmp_path):
    np.save(tmp_path / "x.npy", digits)
    apply(model.run_dir, "score", "--input", tmp_path / "x.npy", "--output", tmp_path / "scores.npy", "--fpr", 0.1)
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(scores, model.score(digits), rtol=1e-6)
    record = json.loads((tmp_path / "scores.json").read_text())
    threshold = record["threshold"]
    np.testing.assert_array_equal(np.load(tmp_path / "scores.flags.npy"), scores > threshold)
    assert record["flagged"] == int((scores > threshold).sum()) and record["fpr"] == 0.1
    # by hand: the share of the validation split above the threshold is the rate asked for
    validation = model.score(model.split_inputs("val"))
    rate = float((validation > threshold).mean())
    assert 0.1 - 1 / len(validation) < rate <= 0.1
    assert record["calibration"]["examples"] == len(validation) and record["calibration"]["observed_fpr"] == rate


def test_calibrate_flags_at_most_the_rate_even_with_ties():
    assert calibrate(np.arange(10.0), 0.2)["threshold"] == 7.0  # 8 and 9 above it
    tied = calibrate(np.array([1.0, 2.0, 2.0, 2.0, 3.0]), 0.5)  # 2 may be flagged; 3 of the 5 tie at 2
    assert tied["threshold"] == 2.0 and tied["calibration"]["flagged"] == 1


def test_decode_and_interpolate_give_the_models_own(model, digits, tmp_path):
    np.save(tmp_path / "z.npy", model.encode(digits[:7]))
    apply(model.run_dir, "decode", "--input", tmp_path / "z.npy", "--output", tmp_path / "x.npy")
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), model.decode(model.encode(digits[:7])), rtol=1e-6, atol=1e-6)
    np.save(tmp_path / "ends.npy", digits[:4])
    apply(model.run_dir, "interpolate", "--input", tmp_path / "ends.npy", "--between", 1, 3, "--steps", 5,
          "--output", tmp_path / "path.npy")
    np.testing.assert_allclose(np.load(tmp_path / "path.npy"), model.interpolate(digits[1], digits[3], 5), atol=1e-6)


def test_samples_from_a_gaussian_mixture_as_an_array_and_as_images(model, tmp_path):
    apply(model.run_dir, "sample", "--n", 6, "--sampler", "gmm", "--components", 2, "--seed", 1,
          "--output", tmp_path / "samples.npy")
    samples = np.load(tmp_path / "samples.npy")
    np.testing.assert_allclose(samples, model.sample(6, sampler="gmm", seed=1, components=2), atol=1e-6)
    apply(model.run_dir, "sample", "--n", 6, "--sampler", "gmm", "--components", 2, "--seed", 1,
          "--output", tmp_path / "samples")
    assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    np.testing.assert_allclose(model.read_images(sorted((tmp_path / "samples").iterdir())), samples,
                               atol=16 / 255 / 2 + 1e-6)  # the PNGs' 8-bit rounding of counts 0..16


def test_existing_outputs_are_replaced_only_with_overwrite(model, digits, tmp_path):
    np.save(tmp_path / "x.npy", digits[:10])
    (tmp_path / "codes.npy").write_bytes(b"mine")
    arguments = [model.run_dir, "encode", "--input", tmp_path / "x.npy", "--output", tmp_path / "codes.npy"]
    with pytest.raises(SystemExit):
        apply(*arguments)
    assert (tmp_path / "codes.npy").read_bytes() == b"mine"
    apply(*arguments, "--overwrite")
    assert np.load(tmp_path / "codes.npy").shape == (10, 4)


def refusals(run: Path, data: Path) -> dict[str, tuple[list, str]]:
    return {
        "unknown operation": ([run, "denoise", "--input", data / "x.npy", "--output", "o.npy"], "invalid choice: 'denoise'"),
        "missing input file": ([run, "encode", "--input", data / "nope.npy", "--output", "o.npy"], "no such file"),
        "no input": ([run, "score", "--output", "o.npy"], "--input is missing"),
        "wrong shape": ([run, "reconstruct", "--input", data / "rows.npy", "--output", "o.npy"], "shape (20, 5); reconstruct takes examples of shape (1, 8, 8)"),
        "codes of another size": ([run, "decode", "--input", data / "x.npy", "--output", "o.npy"], "decode takes codes of shape (N, 4)"),
        "existing output": ([run, "encode", "--input", data / "x.npy", "--output", data / "x.npy"], "it exists"),
        "not a run": ([data, "encode", "--input", data / "x.npy", "--output", "o.npy"], "is not a run folder"),
        "unknown array": ([run, "encode", "--input", data / "x.npz", "--array", "y", "--output", "o.npy"], "holds 'x'"),
        "fpr out of range": ([run, "score", "--input", data / "x.npy", "--fpr", "1.5", "--output", "o.npy"], "--fpr=1.5"),
        "fpr of encode": ([run, "encode", "--input", data / "x.npy", "--fpr", "0.1", "--output", "o.npy"], "score only"),
        "folder output of score": ([run, "score", "--input", data / "x.npy", "--output", "out"], "a .npy file"),
        "other output suffix": ([run, "encode", "--input", data / "x.npy", "--output", "o.csv"], "a .npy file"),
        "prior of a plain autoencoder": ([run, "sample", "--output", "o.npy"], "sampler='prior' is not allowed"),
        "interpolation beyond the input": ([run, "interpolate", "--input", data / "x.npy", "--between", "0", "30",
                                            "--output", "o.npy"], "--between=0 30"),
    }


@pytest.mark.parametrize("case", list(refusals(Path(), Path())))
def test_every_bad_input_is_refused_in_one_line_with_nothing_written(model, tmp_path, monkeypatch, capsys, case):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.zeros((20, 1, 8, 8), np.float32))
    np.savez(data / "x.npz", x=np.zeros((20, 1, 8, 8), np.float32))
    np.save(data / "rows.npy", np.zeros((20, 5), np.float32))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    arguments, message = refusals(model.run_dir, data)[case]
    with pytest.raises(SystemExit) as stop:
        main([str(argument) for argument in arguments])
    error = capsys.readouterr().err
    assert stop.value.code == 2
    assert error.startswith("ae_lab: error: ") and len(error.strip().splitlines()) == 1 and message in error, error
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before  # nothing written or changed
