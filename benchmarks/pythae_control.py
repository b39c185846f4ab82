"""Control for the pythae VAE fidelity row: pythae's own reproduction, trained on *our* arrays.

Our `experiment=pythae_vae_mnist` at 500 epochs misses pythae's published 89.78 nats. This script
separates the two possible causes: it trains pythae's own network, trainer and learning-rate schedule
(as in its `examples/scripts/reproducibility/vae.py`) on exactly the binarised training, validation and
test arrays our preset uses, and estimates the test NLL with pythae's own `get_nll` (k = 200). If
pythae lands where we do on our arrays, the gap is the data (Larochelle's binarisation and split), not
our training; if it lands near 89.78, the gap is ours.

Two steps, in two environments (pythae is not an ae_lab dependency):

    python benchmarks/pythae_control.py export --data-root DATA --out arrays.npz        # ae_lab's venv
    python benchmarks/pythae_control.py train --arrays arrays.npz --out result/ --epochs 500  # with pythae

`train` writes `history.csv` (pythae's per-epoch train and validation loss, i.e. the negative ELBO per
image) and `result.json` (test NLL, −ELBO, wall time, versions) into `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parent.parent


def export(data_root: Path, out: Path) -> None:
    """Our preset's three splits as uint8 {0, 1} arrays of shape (N, 784)."""
    from hydra import compose, initialize_config_dir

    from ae_lab.config import register_configs
    from ae_lab.data import build_datamodule

    register_configs()
    with initialize_config_dir(config_dir=str(REPOSITORY / "conf"), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["experiment=pythae_vae_mnist", f"dataset.root={data_root}"])
    data = build_datamodule(cfg.dataset)
    arrays = {}
    for name in ("train", "val", "test"):
        split = data.splits[name]
        images = split.batch(torch.arange(len(split)))["x"]
        assert set(images.unique().tolist()) <= {0.0, 1.0}, "the preset's splits are binary"
        arrays[name] = images.reshape(len(split), -1).to(torch.uint8).numpy()
    np.savez_compressed(out, **arrays, checksum=np.array(data.checksum))
    print(f"wrote {out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


def train(arrays_path: Path, out: Path, epochs: int, nll_rounds: int) -> None:
    """pythae's reproduction script for the VAE of Rezende & Mohamed (2015), on the given arrays."""
    import torch.nn as nn
    from pythae.data.preprocessors import DataProcessor
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    class Encoder(BaseEncoder):  # 784-400-(2x40), ReLU: the script's network
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Sequential(nn.Linear(784, 400), nn.ReLU())
            self.embedding, self.log_var = nn.Linear(400, 40), nn.Linear(400, 40)

        def forward(self, x: torch.Tensor) -> ModelOutput:
            h = self.hidden(x.reshape(x.shape[0], -1))
            return ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):  # 40-400-784, sigmoid output
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(40, 400), nn.ReLU(), nn.Linear(400, 784), nn.Sigmoid())

        def forward(self, z: torch.Tensor) -> ModelOutput:
            return ModelOutput(reconstruction=self.net(z).reshape(z.shape[0], 1, 28, 28))

    class History(TrainingCallback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_log(self, training_config, logs, **kwargs) -> None:
            self.rows.append({"epoch": kwargs["global_step"], **logs})

    data = np.load(arrays_path)
    as_images = lambda a: torch.from_numpy(a.astype(np.float32)).reshape(-1, 1, 28, 28)  # noqa: E731
    train_set, val_set, test_set = (as_images(data[k]) for k in ("train", "val", "test"))

    out.mkdir(parents=True, exist_ok=True)
    model_config = VAEConfig(input_dim=(1, 28, 28), latent_dim=40, reconstruction_loss="bce")
    torch.manual_seed(123)  # as the script
    model = VAE(model_config=model_config, encoder=Encoder(), decoder=Decoder())
    training_config = BaseTrainerConfig(
        output_dir=str(out / "pythae"), per_device_train_batch_size=100, per_device_eval_batch_size=100,
        num_epochs=epochs, learning_rate=1e-4, steps_saving=None, steps_predict=None, no_cuda=True,
        scheduler_cls="MultiStepLR",
        scheduler_params={"milestones": [200, 350, 500, 750, 1000], "gamma": 10 ** (-1 / 5)})
    history = History()
    start = time.perf_counter()
    processor = DataProcessor()
    trainer = BaseTrainer(model=model, train_dataset=processor.to_dataset(train_set),
                          eval_dataset=processor.to_dataset(val_set),
                          training_config=training_config, callbacks=[history])
    trainer.train()
    fit_seconds = time.perf_counter() - start

    best = trainer._best_model.eval()  # what the script reloads as `final_model`: best by validation loss
    with torch.no_grad():
        # get_nll returns the mean log-likelihood bound (negative); its script reports it as the NLL
        nll = [-float(best.get_nll(test_set, n_samples=200)) for _ in range(nll_rounds)]
        neg_elbo = float(np.mean([best(_as_input(test_set[i:i + 1000])).loss.item()
                                  for i in range(0, len(test_set), 1000)]))
    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history.rows[0]))
        writer.writeheader()
        writer.writerows(history.rows)
    best_epoch = min(history.rows, key=lambda row: row["eval_epoch_loss"])["epoch"]
    from importlib.metadata import version

    result = {"epochs": epochs, "test_nll_k200": float(np.mean(nll)), "test_nll_rounds": nll,
              "test_neg_elbo": neg_elbo, "best_epoch": best_epoch, "fit_seconds": fit_seconds,
              "arrays_checksum": str(data["checksum"]), "pythae": version("pythae"),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}"}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _as_input(images: torch.Tensor):
    from pythae.data.datasets import DatasetOutput

    return DatasetOutput(data=images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    exporting = steps.add_parser("export", help="write our preset's arrays (run with ae_lab installed)")
    exporting.add_argument("--data-root", type=Path, required=True, help="the folder holding mnist/")
    exporting.add_argument("--out", type=Path, required=True)
    training = steps.add_parser("train", help="train pythae's VAE on them (run with pythae installed)")
    training.add_argument("--arrays", type=Path, required=True)
    training.add_argument("--out", type=Path, required=True)
    training.add_argument("--epochs", type=int, default=500)
    training.add_argument("--nll-rounds", type=int, default=1, help="pythae's script averages 5")
    args = parser.parse_args()
    if args.step == "export":
        export(args.data_root, args.out)
    else:
        train(args.arrays, args.out, args.epochs, args.nll_rounds)


if __name__ == "__main__":
    main()
