"""Every CUDA path of ae_lab, run on the GPU: a single run in 32-bit and `bf16-mixed` precision,
`dataset.on_device=true`, DDP on one GPU (NCCL), a vectorised group equal to separate GPU runs, one group
per GPU through the worker (`hydra.launcher.gpus=[0]`), `ae_lab.apply` and `ae_lab.export` of a model
loaded on CUDA. Marked `gpu`; skipped where `torch.cuda.is_available()` is False (every CPU machine, CI).
`benchmarks/gpu.sh` runs this file on a GPU machine.

`AE_LAB_GPU_TESTS_DEVICE=cpu` runs the same tests on the CPU instead (what `benchmarks/gpu.sh --cpu-check`
does): that checks the tests' own logic where no GPU is lent; it proves nothing about CUDA.

Tolerances. Runs compared on the same device and the same kernels (DDP on one rank against the plain
run, on-device data against host data) must agree to float rounding, relative 1e-5. A vectorised member
against its separate run is the CPU test's tolerance (tests/test_vectorized.py, relative 1e-4): the
same float32 arithmetic, with batched matrix products (`bmm`) where the single run has `mm`, whose
sums are ordered differently. That holds only with TF32 off: TF32 rounds matmul inputs to 10 mantissa
bits (relative 1e-3 per product), and cuDNN enables it for convolutions by default, so `deterministic_gpu`
turns it off for matmuls and cuDNN and sets CUBLAS_WORKSPACE_CONFIG so that cuBLAS picks the same
reduction order every call. A GPU run against the CPU run (the reference for the GPU run's numbers;
the AE, which draws nothing: a VAE draws its noise from the GPU's generator there, the CPU's here):
relative 1e-3, because cuBLAS and oneDNN order every sum differently and Adam, which divides each step by
the root of the squared gradients, turns rounding-level differences in near-zero gradients into
whole-step differences (test_vectorized notes 1e-4 within one epoch on CPU alone); 20 steps stay far
within 1e-3. `bf16-mixed` against 32-bit: relative 5e-2 (bf16 keeps 8 significant bits, a relative
rounding of 4e-3 per operation, over 20 steps), and not equal to it (the precision took effect).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

# before CUDA starts in this process: cuBLAS then reduces in one fixed order on every call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from conftest import SHARED, compose_config, read_json, run_cli, train_in_process  # noqa: E402

ON = os.environ.get("AE_LAB_GPU_TESTS_DEVICE", "cuda")
DEVICE = torch.device(ON)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    ON == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA: torch.cuda.is_available() is False (AE_LAB_GPU_TESTS_DEVICE=cpu runs these on the CPU)")]

ACCELERATOR = f"trainer.accelerator={'gpu' if DEVICE.type == 'cuda' else 'cpu'}"
# digits, 2 epochs of 10 steps, the cheap evaluation, no figures, no logger
RUN = ["trainer.max_epochs=2", "trainer.limit_train_batches=10", "trainer.limit_val_batches=3",
       "trainer.limit_test_batches=3", "eval=minimal", "logger=none", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "trainer.devices=1"]
# the linear probe reads the training split where `dataset.on_device` holds it (an accuracy: one test
# example classified otherwise moves it by 1/n, so it is compared only between runs of the same kernels)
PROBE = ["eval.probe_train_size=200"]
VAE = ["model=vae", "model.hidden_dims=[64]", "model.latent_dim=6"]


@pytest.fixture(autouse=True)
def deterministic_gpu():
    """Full float32 matmuls and convolutions (no TF32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def close(ours: dict[str, float], reference: dict[str, float], rel: float) -> None:
    """The same metrics, each within `rel` of the reference's (an absolute floor of rel / 10 of its
    split's loss for terms near 0, whose rounding error is a part of that loss's)."""
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        scale = abs(reference.get(key.split("/")[0] + "/loss", 0.0))
        assert ours[key] == pytest.approx(value, rel=rel, abs=max(1e-6, rel / 10 * scale)), key


AE_MEMBERS = [["seed=0"], ["seed=1"]]  # the worker test's sweep `seed=0,1`
VAE_MEMBERS = [[*VAE, "seed=0", "loss.beta=1"], [*VAE, "seed=1", "loss.beta=4"]]  # draw on the GPU's generator


@pytest.fixture(scope="module")
def separate_runs(tmp_path_factory) -> list[tuple[Path, dict[str, float]]]:
    """Each AE then each VAE member trained as a separate 32-bit run on the device: folder and metrics."""
    folder = tmp_path_factory.mktemp("separate")
    return [(folder / str(i), train_in_process([*RUN, ACCELERATOR, *member], folder / str(i)))
            for i, member in enumerate(AE_MEMBERS + VAE_MEMBERS)]


def test_a_32_bit_run_on_the_gpu_trains_on_it_and_equals_the_cpu_run(separate_runs, tmp_path):
    """The AE (a VAE would draw its noise from the GPU's generator there and from the CPU's here)."""
    run_dir, metrics = separate_runs[0]
    assert read_json(run_dir / "run.json")["status"] == "completed"
    # the checkpoint Lightning wrote holds the weights as trained: on the device
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {value.device.type for value in weights.values()} == {DEVICE.type}
    on_cpu = train_in_process([*RUN, *AE_MEMBERS[0], "trainer.accelerator=cpu"], tmp_path / "cpu")
    close(metrics, on_cpu, rel=1e-3)


def test_a_bf16_mixed_run_on_the_gpu_is_close_to_the_32_bit_run_but_not_equal(separate_runs, tmp_path):
    metrics = train_in_process([*RUN, *AE_MEMBERS[0], ACCELERATOR, "trainer.precision=bf16-mixed"], tmp_path / "bf16")
    reference = separate_runs[0][1]
    assert OmegaConf.load(tmp_path / "bf16" / ".hydra" / "config.yaml").trainer.precision == "bf16-mixed"
    assert metrics["train/loss"] != reference["train/loss"]  # the precision took effect
    close({key: metrics[key] for key in ("train/loss", "val/loss", "test/loss")},
          {key: reference[key] for key in ("train/loss", "val/loss", "test/loss")}, rel=5e-2)


# `dataset.on_device` is a key of the file data sets (MNIST, Fashion-MNIST, dSprites): MNIST from
# AE_LAB_DATA (what benchmarks/gpu.sh sets) or the shared folder; grey levels, so that no pixel is drawn
# (a drawn batch would come from the GPU's generator when held there, the CPU's otherwise)
DATA = Path(os.environ.get("AE_LAB_DATA") or SHARED)
MNIST = ["dataset=mnist", f"dataset.root={DATA}", "dataset.download=false", "eval.test_examples=500"]


@pytest.mark.skipif(not (DATA / "mnist" / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"needs the MNIST files in {DATA}/mnist (AE_LAB_DATA names their parent folder)")
def test_data_held_on_the_gpu_serve_batches_there_and_train_as_host_data_do(tmp_path):
    import pytorch_lightning as pl

    from ae_lab.data import build_datamodule

    data = build_datamodule(compose_config([*RUN, *MNIST, "dataset.on_device=true"]).dataset)
    data.trainer = pl.Trainer(accelerator=DEVICE.type if DEVICE.type == "cpu" else "gpu", devices=1, logger=False)
    data.setup("fit")
    assert data.splits["train"].images.device.type == DEVICE.type
    batch = next(iter(data.train_dataloader()))
    assert batch["x"].device.type == batch["label"].device.type == DEVICE.type
    # trained and evaluated (the probe reads the training split where it is held) as with host data
    held = train_in_process([*RUN, *MNIST, *VAE, *PROBE, ACCELERATOR, "dataset.on_device=true"], tmp_path / "held")
    host = train_in_process([*RUN, *MNIST, *VAE, *PROBE, ACCELERATOR], tmp_path / "host")
    assert held["eval/probe_accuracy"] > 0.2  # the probe ran (chance: 0.1)
    close(held, host, rel=1e-5)


def test_ddp_on_one_gpu_initialises_nccl_and_equals_the_plain_run(separate_runs, tmp_path):
    """The plain AE (its first separate run, seed 0): DDP reseeds the global generator after the model is
    built (Lightning's `reset_seed`), so a VAE's draws would differ from the plain run's; an AE draws none."""
    run_dir = tmp_path / "ddp"
    done = run_cli([*RUN, *AE_MEMBERS[0], "trainer=ddp", "trainer.devices=1", ACCELERATOR, "verbose=true",
                    f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    assert f"distributed_backend={backend}" in (run_dir / "ae_lab.log").read_text()
    close(read_json(run_dir / "metrics.json"), separate_runs[0][1], rel=1e-5)


def test_a_vectorised_group_on_the_gpu_equals_separate_gpu_runs(separate_runs, tmp_path, caplog):
    from ae_lab.ensemble.group import Member, run_group

    for name, variants, singles in (("ae", AE_MEMBERS, separate_runs[:2]), ("vae", VAE_MEMBERS, separate_runs[2:])):
        members = [Member(compose_config([*RUN, ACCELERATOR, *v]), tmp_path / name / str(i))
                   for i, v in enumerate(variants)]
        with caplog.at_level(logging.INFO, logger="ae_lab.ensemble.group"):
            run_group(members, name, tmp_path / f"{name}.pt")
        assert f"ensemble {name}: 2 members on {DEVICE.type}" in caplog.text
        for member, (_, single) in zip(members, singles):
            close(read_json(member.run_dir / "metrics.json"), single, rel=1e-4)


def test_a_group_trains_in_a_worker_on_the_named_gpu_and_equals_separate_gpu_runs(separate_runs, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", "hydra/launcher=vectorized", "hydra.launcher.gpus=[0]", "hydra.launcher.poll_seconds=0.1",
                    *RUN, ACCELERATOR, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [worker_log] = (sweep / ".ensembles").glob("*.log")
    assert re.search(r"worker \d+, CUDA_VISIBLE_DEVICES=0, 2 members", worker_log.read_text())
    members = sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert len(members) == 2
    for member, (_, single) in zip(members, separate_runs[:2]):  # jobs 0 and 1: seed=0, seed=1 as AE_MEMBERS
        assert read_json(member / "run.json")["ensemble"]["members"] == 2
        assert f"2 members on {DEVICE.type}" in (member / "ae_lab.log").read_text()
        close(read_json(member / "metrics.json"), single, rel=1e-4)


@pytest.fixture(scope="module")
def loaded(separate_runs):
    """The first VAE's separate device run (its score is -ELBO), loaded on the device and on the CPU."""
    import ae_lab

    run_dir = separate_runs[2][0]
    return ae_lab.load(run_dir, device=ON), ae_lab.load(run_dir, device="cpu")


def test_a_model_loaded_on_the_gpu_computes_what_it_computes_on_the_cpu(loaded):
    on_device, on_cpu = loaded
    assert on_device.device.type == DEVICE.type
    x = on_cpu.split_inputs("test")
    for operation in ("encode", "reconstruct", "score"):
        ours, reference = getattr(on_device, operation)(x), getattr(on_cpu, operation)(x)
        assert isinstance(ours, np.ndarray)  # numpy in, numpy out, from the device
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4, err_msg=operation)
    tensor = torch.from_numpy(x).to(DEVICE)
    assert on_device.encode(tensor).device.type == DEVICE.type  # torch in, torch out on its device
    np.testing.assert_allclose(on_device.sample(8, seed=1), on_cpu.sample(8, seed=1), rtol=1e-4, atol=1e-4)


def test_apply_on_the_gpu_writes_what_it_writes_on_the_cpu(loaded, tmp_path):
    from ae_lab.apply import main

    on_device, on_cpu = loaded
    np.save(tmp_path / "x.npy", on_cpu.split_inputs("test"))
    for where, device in (("device", ON), ("cpu", "cpu")):
        for operation, options in (("encode", []), ("score", ["--fpr", "0.1"])):  # score: calibrated on val
            assert main([str(on_cpu.run_dir), operation, "--input", str(tmp_path / "x.npy"), "--device", device,
                         "--output", str(tmp_path / f"{operation}-{where}.npy"), *options]) == 0
    for operation in ("encode", "score"):
        np.testing.assert_allclose(np.load(tmp_path / f"{operation}-device.npy"), np.load(tmp_path / f"{operation}-cpu.npy"),
                                   rtol=1e-4, atol=1e-4, err_msg=operation)


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_a_model_loaded_on_the_gpu_exports_a_file_that_runs_on_the_cpu(loaded, tmp_path, format):
    from ae_lab.export import export, run_onnx

    on_device, on_cpu = loaded
    x = on_cpu.split_inputs("test")
    path = export(on_device, "score", format, tmp_path / f"score.{format}")
    if format == "onnx":
        got = run_onnx(path, x)
    else:
        with torch.no_grad():
            got = torch.jit.load(str(path), map_location="cpu")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, on_cpu.score(x), rtol=1e-4, atol=1e-4)
