"""`python -m ae_lab.export`: each part as ONNX (run by onnxruntime) and TorchScript, raw data in, equal to
the torch model on the whole test split; refusals in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ae_lab.export import PARTS, export, main, run_onnx

# a digits VAE with a Bernoulli decoder: its score is -ELBO over fixed draws, the hardest part to export
VAE = ["model=vae", "model.hidden_dims=[32]", "model.latent_dim=3", "trainer=debug", "logger=none",
       "eval=minimal", "eval.iw_samples=4", "eval.seed=3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, train_and_load):
    return train_and_load(VAE, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def test_split(model) -> np.ndarray:
    return model.split_inputs("test")


def torch_result(model, part: str, x: np.ndarray) -> np.ndarray:
    return {"encoder": model.encode, "decoder": model.decode, "autoencoder": model.reconstruct,
            "score": model.score}[part](x)


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
@pytest.mark.parametrize("part", PARTS)
def test_each_part_equals_the_torch_model_on_the_raw_test_split(model, test_split, tmp_path, part, format):
    path = export(model, part, format, tmp_path / f"{part}.{format}")
    x = model.encode(test_split) if part == "decoder" else test_split  # raw digit counts 0..16 (codes to decode)
    assert len(x) > 2  # traced on 2 examples: the batch axis must be dynamic
    if format == "onnx":
        got = run_onnx(path, x)
    else:
        with torch.no_grad():
            got = torch.jit.load(str(path))(torch.from_numpy(x)).numpy()
    expected = torch_result(model, part, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_files_hold_the_preprocessing(model, test_split, tmp_path):
    """Fed raw counts, the encoder's output is the code of counts / 16, not of the counts themselves."""
    path = export(model, "encoder", "onnx", tmp_path / "encoder.onnx")
    module = model.module
    with torch.no_grad():
        by_hand = module.head.code(module.encoder(torch.from_numpy(test_split) / 16)).numpy()
    np.testing.assert_allclose(run_onnx(path, test_split), by_hand, rtol=1e-5, atol=1e-5)
    many = np.concatenate([test_split] * 4)  # more than TrainedModel's batch size (1024): not cut to one batch
    np.testing.assert_allclose(run_onnx(path, many), np.concatenate([by_hand] * 4), rtol=1e-5, atol=1e-5)
    reconstruction = run_onnx(export(model, "autoencoder", "onnx", tmp_path / "ae.onnx"), test_split)
    assert reconstruction.max() > 1.5  # in counts (0..16), not in [0, 1]


def test_the_command_writes_into_the_run_folder_and_refuses_in_one_line(model, tmp_path, capsys):
    assert main([str(model.run_dir), "--format", "torchscript", "--part", "decoder"]) == 0
    written = model.run_dir / "exports" / "decoder.pt"
    assert written.is_file() and capsys.readouterr().err.strip() == f"decoder (torchscript): {written}"
    before = written.stat().st_mtime_ns
    refusals = {("--format", "tflite", "--part", "encoder"): "--format",
                ("--format", "onnx", "--part", "head"): "--part",
                ("--format", "torchscript", "--part", "decoder"): "exists (add --overwrite",
                ("--format", "onnx", "--part", "encoder", "--which", "first"): "--which"}
    for arguments, message in refusals.items():
        with pytest.raises(SystemExit) as stop:
            main([str(model.run_dir), *arguments])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--format", "onnx", "--part", "encoder", "--output", str(tmp_path / "e.onnx")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "is not a run folder" in error and len(error.strip().splitlines()) == 1
    assert written.stat().st_mtime_ns == before and list(tmp_path.iterdir()) == []
    assert sorted(path.name for path in written.parent.iterdir()) == ["decoder.pt"]  # no partial file left
