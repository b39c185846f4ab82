"""Training one ensemble: M members of one structure, stacked and trained together, then each written
out as an ordinary run folder.

Why a plain loop and not a Lightning Trainer: what Lightning's loop would give (best checkpoint by
val/loss, epoch metrics, the NaN stop, checkpoints of one model) would all have to be rewritten per
member anyway, and its per-step overhead (about a millisecond) is what a vectorised sweep removes.
The loop below reproduces, per member, exactly what the single run's Trainer does on one device:
the data order of `EpochSampler` (a permutation from seed + epoch), epoch means weighted by batch
size, validation after every whole epoch, `best.ckpt` by val/loss (strictly lower, NaN never best),
`trainer.max_steps` (an epoch it cuts short is not validated), MultiStepLR per epoch, gradient
clipping, `limit_*_batches`; val/* and test/* from the best weights.

Member i starts from the weights a single run with its seed starts from: `pl.seed_everything(seed)`
then `Autoencoder.from_config`, as `ae_lab.run` does, and draws its random numbers (noise, VAE
sampling, contractive projections, resampled binary pixels) from its own stream, as that run draws
them (`ae_lab.ensemble.streams`): the same numbers in the same order (a batch is fetched just before
its step, as Lightning fetches from a loader of known length; Lightning's sanity check draws from a
copy of the generator, `isolate_rng`, so there is nothing of it to repeat). So stochastic members,
too, equal their single runs up to float rounding.

A group checkpoint (`<sweep>/.ensembles/<name>.pt`) is written every `checkpoint_every_n_steps` steps
and after every validation; running the sweep again resumes the group from it (exactly, on CPU) and
removes it once every member is written out.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call, stack_module_state, vjp, vmap

from ae_lab.checkpoints import random_state, set_random_state
from ae_lab.data import ArrayDataModule, Split, build_datamodule
from ae_lab.ensemble.logs import MemberLogs
from ae_lab.ensemble.optim import StackedOptimizer, clip_gradients
from ae_lab.ensemble.stacked import STACKED, StackedMLP, choose_path
from ae_lab.ensemble.streams import Draw, MemberStreams, Replay
from ae_lab.history import STEP_LOSS, add_row, takes_step_loss
from ae_lab.job import JobContext
from ae_lab.lifecycle import NO_VALIDATION, Results, RunLifecycle, resumed_from, write_results
from ae_lab.module import Autoencoder
from ae_lab.nets import Latent
from ae_lab.noise import KINDS
from ae_lab.objectives import epoch_end_step, non_finite_message
from ae_lab.preemption import ClusterSignal
from ae_lab.storage import atomic_torch_save
from ae_lab.trainer_check import limited_batches

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One job of the group: its config (without `hydra`), its run folder, and its job context (its
    `.hydra/` files, log file and W&B name come from there; without one, a job outside Hydra)."""

    cfg: DictConfig
    run_dir: Path
    job: JobContext | None = None

    def __post_init__(self) -> None:
        if self.job is None:
            self.job = JobContext.outside_hydra(self.run_dir)


@dataclass
class Outcome:
    metrics: dict[str, float] | None  # None when the member failed
    error: str | None = None


CPU_CONV_CHUNK = 2  # members per vmapped chunk for conv nets on a CPU (measured best of 1, 2, 4, all)


class Ensemble:
    """M `Autoencoder`s of one structure as stacked parameters, run by one `functional_call` under vmap."""

    def __init__(self, configs: list[dict[str, Any]], input_shape: tuple[int, ...], dataset_size: int,
                 device: torch.device) -> None:
        self.configs = configs
        self.modules, states = [], []
        if device.type == "cuda":
            torch.cuda.init()  # so that each member's stream holds its GPU generator's state too
        for plain in configs:  # what ae_lab.run does before it builds a single run's module
            pl.seed_everything(plain["seed"], workers=True, verbose=False)
            self.modules.append(Autoencoder.from_config(plain, input_shape, dataset_size=dataset_size))
            states.append(random_state())
        self.streams = MemberStreams(states)
        self._plans: dict[tuple[bool, tuple[int, ...]], list[Draw]] = {}
        self.base = self.modules[0]
        self.term_names = self.base.objective.term_names
        stacked, _ = stack_module_state(self.modules)
        self.shapes = {name: value.shape[1:] for name, value in stacked.items()}
        # all of a member's parameters in one row: the optimiser then updates the ensemble in a few ops
        self.flat = torch.cat([value.detach().flatten(1) for value in stacked.values()], 1).to(device)
        self.flat.requires_grad_(True)
        # the step's gradient (M, P), written in place through views of its rows (see `gradient`)
        self._gradient = torch.empty_like(self.flat)
        self._gradient_parts = list(self.unflatten(self._gradient).values())
        self.device = device
        self.input_shape = tuple(input_shape)
        # conv nets on a CPU: vmap turns M convolutions into one grouped convolution, which oneDNN runs
        # slower than M separate ones (benchmarks/VECTORIZED.md); in chunks of CPU_CONV_CHUNK it is faster
        on_cpu_conv = device.type == "cpu" and configs[0]["model"]["arch"] == "conv"
        self.chunk = CPU_CONV_CHUNK if on_cpu_conv else None
        kind = configs[0]["noise"]["kind"]
        self.corrupt, strength_key = KINDS.get(kind, (None, None))
        self.strength = self.per_member([c["noise"][strength_key] if strength_key else 0.0 for c in configs])
        self.fixed_weights = None
        if not any(module.objective.scheduled_names for module in self.modules):
            self.fixed_weights = self.weights(0)
        # the step's path: batched products on the stacked MLP where it applies, else vmap (ensemble/stacked.py)
        self.path, reason = choose_path(configs[0], self.base)
        self.stacked = StackedMLP(self.base, self.unflatten(self._gradient)) if self.path == STACKED else None
        log.debug("ensemble step: %s path (%s)", self.path, reason)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named, stacked parameters (M, *shape) as views of the rows of `flat` (M, P)."""
        sizes = [shape.numel() for shape in self.shapes.values()]
        return {name: part.view(-1, *shape)
                for (name, shape), part in zip(self.shapes.items(), flat.split(sizes, dim=1))}

    def per_member(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def weights(self, step: int) -> dict[str, torch.Tensor]:
        """Every member's `Objective.weights(step)`, stacked: the per-member scalars of the loss. Without a
        schedule that moves they are the same at every step, stacked once (no per-step tensors to build)."""
        if self.fixed_weights is not None:
            return self.fixed_weights
        each = [module.objective.weights(step) for module in self.modules]
        return {key: self.per_member([float(w[key]) for w in each]) for key in each[0]}

    def _terms(self, params: dict[str, torch.Tensor], x: torch.Tensor, weights: dict[str, torch.Tensor],
               strength: torch.Tensor, draws: list[torch.Tensor], plan: list[Draw],
               train: bool) -> dict[str, torch.Tensor]:
        """One member's loss terms on its batch (`_member_terms`), its random calls answered by `draws`
        (made in its stream; `plan`: what they are). A step that draws nothing runs without `Replay`,
        whose hook would otherwise see every operation of the step."""
        if not plan:
            return self._member_terms(params, x, weights, strength, train)
        with Replay(plan, draws):
            return self._member_terms(params, x, weights, strength, train)

    def _member_terms(self, params: dict[str, torch.Tensor], x: torch.Tensor, weights: dict[str, torch.Tensor],
                      strength: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        """One member's loss terms on its batch: the single run's `Autoencoder._step`, per member.

        With the contractive penalty, the network runs once under `torch.func.vjp` with respect to the
        inputs: the code is its output, the logits and latent come back as auxiliary outputs, and the
        code's pullback, vmapped over directions, gives the Jacobian rows (vmap cannot batch the single
        run's `torch.autograd.grad`). The training step's gradient differentiates through the pullback."""
        inputs = self.corrupt(x, strength) if train and self.corrupt is not None else x
        if not self.base.objective.needs_input_grad:
            logits, latent = functional_call(self.base, params, (inputs,))
            return self.base.objective(logits, x, latent, inputs, weights, create_graph=train)

        def code_of(inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
            logits, latent = functional_call(self.base, params, (inputs,))
            # vjp's auxiliary outputs must be tensors: the fields a deterministic head leaves None stay out
            fields = {name: value for name, value in latent._asdict().items() if value is not None}
            return latent.code, (logits, fields)

        _, pullback, (logits, fields) = vjp(code_of, inputs, has_aux=True)
        return self.base.objective(logits, x, Latent(**fields), inputs, weights, create_graph=train,
                                   jacobian_rows=lambda directions: vmap(pullback)(directions)[0])

    def _vmapped_terms(self, params: dict[str, torch.Tensor], x: torch.Tensor, step: int,
                       train: bool) -> dict[str, torch.Tensor]:
        """Every member's terms: `x` is (M, B, ...), a batch per member, or (B, ...), one for all. The
        step's draws are recorded once per batch shape (running it for member 0), then made in each
        member's stream."""
        weights = self.weights(step)
        per_member_x = x.dim() == len(self.input_shape) + 2
        key = (train, tuple(x.shape))
        if key not in self._plans:
            first = {name: value[0] for name, value in params.items()}
            self._plans[key] = self.streams.record(lambda: self._member_terms(
                first, x[0] if per_member_x else x, {k: v[0] for k, v in weights.items()}, self.strength[0], train))
        plan = self._plans[key]
        draws = self.streams.draw(plan, range(len(self.modules)))
        if self.stacked is not None:
            return self.stacked.terms(params, x, weights, plan, draws, per_member_x, train)
        terms = vmap(partial(self._terms, plan=plan, train=train), in_dims=(0, 0 if per_member_x else None, 0, 0, 0),
                     randomness="different", chunk_size=self.chunk)
        return terms(params, x, weights, self.strength, draws)

    def train_terms(self, x: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The training step's terms, and the parameters (views of `flat`) they were computed from."""
        params = self.unflatten(self.flat)
        return self._vmapped_terms(params, x, step, train=True), params

    def gradient(self, loss: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """d loss / d flat, (M, P), in the rows of one buffer kept for every step (the optimiser uses it
        within the step only). The stacked path's backward writes it there itself; the vmap path's is taken
        with respect to the parameter views, then copied there: autograd's own way back through the views
        (reshape, then concatenate) copies it twice."""
        if self.stacked is not None:
            torch.autograd.backward(loss, inputs=[self.flat])  # flat's own .grad stays None (see _Linear)
            return self._gradient
        grads = torch.autograd.grad(loss, list(params.values()))
        for row_part, grad in zip(self._gradient_parts, grads):
            row_part.copy_(grad)
        return self._gradient

    @torch.no_grad()
    def eval_terms(self, flat: torch.Tensor, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return self._vmapped_terms(self.unflatten(flat), x, step, train=False)

    def member_state(self, flat: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s parameters as a state dict of the ordinary module."""
        return {name: value[index].detach().cpu().clone() for name, value in self.unflatten(flat).items()}


class EpochSums:
    """Per-member running sums of each term over an epoch, weighted by batch size (Lightning's epoch means)."""

    def __init__(self, names: list[str], members: int, device: torch.device) -> None:
        self.sums = {name: torch.zeros(members, dtype=torch.float64, device=device) for name in names}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, total in self.sums.items():
            total += terms[name].detach().double() * batch_size
        self.count += batch_size

    def means(self, stage: str) -> list[dict[str, float]]:
        columns = {f"{stage}/{name}": (total / self.count).tolist() for name, total in self.sums.items()}
        members = len(next(iter(self.sums.values())))
        return [{key: values[m] for key, values in columns.items()} for m in range(members)]


@dataclass
class Progress:
    """Where the group's training stands; with the tensors, what a group checkpoint holds."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` done
    global_step: int = 0
    history: list[list[dict[str, float]]] = field(default_factory=list)  # per member: its ae_lab.history rows
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)  # member -> step, epoch, terms
    fit_seconds: float = 0.0


class GroupTrainer:
    """The training loop of one group (see the module docstring)."""

    def __init__(self, members: list[Member], data: ArrayDataModule, checkpoint_path: Path,
                 device: torch.device) -> None:
        self.members = members
        self.data = data
        self.checkpoint_path = checkpoint_path
        self.configs = [OmegaConf.to_container(m.cfg, resolve=True, enum_to_str=True) for m in members]
        first = self.configs[0]
        self.trainer_cfg = first["trainer"]
        self.every_n_steps = first["checkpoint_every_n_steps"]
        self.ensemble = Ensemble(self.configs, data.input_shape, len(data.splits["train"]), device)
        optim = [c["optim"] for c in self.configs]
        self.optimizer = StackedOptimizer(
            self.ensemble.flat, first["optim"]["name"], [o["lr"] for o in optim], [o["weight_decay"] for o in optim],
            [o["eps"] for o in optim], [o["momentum"] for o in optim])
        clip = [c["trainer"]["gradient_clip_val"] for c in self.configs]
        self.clip = None if clip[0] is None else self.ensemble.per_member([float(v) for v in clip])
        count = len(members)
        self.alive = torch.ones(count, dtype=torch.bool, device=device)
        self.best_params = self.ensemble.flat.detach().clone()
        self.best_val = torch.full((count,), math.inf, dtype=torch.float64, device=device)
        self.best_epoch = [-1] * count
        self.progress = Progress(history=[[] for _ in members])
        self.sums = EpochSums(self.ensemble.term_names, count, device)
        self.device = device
        self.cluster_signal: ClusterSignal | None = None  # on a cluster: see `_requeue_if_signalled`

    # ----- data
    def _epoch_positions(self, epoch: int) -> torch.Tensor:
        """(M, N): each member's training order of `epoch`, the permutation EpochSampler draws."""
        n = len(self.data.splits["train"])
        return torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(c["seed"] + epoch))
                            for c in self.configs])

    def _train_batches(self) -> int:
        return limited_batches(math.ceil(len(self.data.splits["train"]) / self.data.batch_size),
                               self.trainer_cfg["limit_train_batches"])

    def _fetch(self, split: Split, positions: torch.Tensor) -> torch.Tensor:
        """The examples at `positions`: (B,) for every member gives (B, ...); (M, B), a batch per member,
        gives (M, B, ...). A split that draws while fetching (binary pixels resampled) is fetched member
        by member, each in its own stream, giving (M, B, ...) either way."""
        if split.resample_binary:
            return torch.stack(self.ensemble.streams.in_each(
                lambda member: split.batch(positions[member] if positions.dim() == 2 else positions)["x"],
                range(len(self.members)))).to(self.device)
        x = split.batch(positions.flatten())["x"]
        return x.view(*positions.shape, *x.shape[1:]).to(self.device)

    def _split_batches(self, split: Split, limit: Any) -> Iterator[torch.Tensor]:
        """An evaluation split's batches, in order, as many as `limit_*_batches` lets Lightning run."""
        size = self.data.batch_size
        for index in range(limited_batches(math.ceil(len(split) / size), limit)):
            yield self._fetch(split, torch.arange(index * size, min((index + 1) * size, len(split))))

    # ----- training
    def _lr_scale(self, epoch: int) -> list[float]:
        """MultiStepLR's factor at `epoch` for every member: gamma ** (milestones passed)."""
        return [c["optim"]["gamma"] ** sum(milestone <= epoch for milestone in c["optim"]["milestones"])
                for c in self.configs]

    def _step(self, x: torch.Tensor) -> None:
        step = self.progress.global_step
        terms, params = self.ensemble.train_terms(x, step)
        loss = terms["loss"]
        finite = torch.isfinite(loss)
        if bool((self.alive & ~finite).any()):
            self._record_failures(terms, self.alive & ~finite)
            self.alive &= finite
        grad = self.ensemble.gradient(torch.where(self.alive, loss, torch.zeros_like(loss)).sum(), params)
        if self.clip is not None:
            grad = clip_gradients(grad, self.clip, self.trainer_cfg["gradient_clip_algorithm"])
        self.optimizer.step(grad, self.alive.tolist())
        self.sums.add(terms, x.shape[1])
        if takes_step_loss(step, self.trainer_cfg["log_every_n_steps"]):  # a single run's HistoryRecorder
            for member, value in enumerate(loss.detach().tolist()):
                if self.alive[member]:
                    add_row(self.progress.history[member], self.progress.epoch, step, {STEP_LOSS: value})
        self.progress.global_step += 1

    def _record_failures(self, terms: dict[str, torch.Tensor], failed: torch.Tensor) -> None:
        for member in failed.nonzero().flatten().tolist():
            values = {name: float(value[member].detach()) for name, value in terms.items()}
            message = non_finite_message(values, self.progress.global_step, self.progress.epoch)
            self.progress.failures[member] = {"step": self.progress.global_step, "epoch": self.progress.epoch,
                                              "terms": values, "message": message}
            log.error("member %d (%s) failed and is frozen: %s", member, self.members[member].run_dir.name, message)

    def _validate(self, epoch: int) -> None:
        """The end of a whole epoch: validate, keep each member's best weights, record the epoch."""
        val = self._evaluate(self.ensemble.flat, "val")
        val_loss = torch.tensor([m["val/loss"] for m in val], dtype=torch.float64, device=self.device)
        improved = torch.isfinite(val_loss) & (val_loss < self.best_val) & self.alive
        self.best_val = torch.where(improved, val_loss, self.best_val)
        with torch.no_grad():
            self.best_params = torch.where(improved.unsqueeze(1), self.ensemble.flat, self.best_params)
        for member, is_better in enumerate(improved.tolist()):
            if is_better:
                self.best_epoch[member] = epoch
        self._record_epoch(epoch, val)

    def _end_cut_epoch(self, epoch: int) -> None:
        """The end of an epoch cut short by `trainer.max_steps`: recorded without validation."""
        self._record_epoch(epoch, [{} for _ in self.members])

    def _record_epoch(self, epoch: int, val: list[dict[str, float]]) -> None:
        """Each member's history row of `epoch`: its train means, `val` and its scheduled weights."""
        train = self.sums.means("train")
        # the epoch's last step: Lightning logs the epoch's metrics (and a single run's scheduled weights) at it
        last_step = epoch_end_step(self.progress.global_step)
        for member, module in enumerate(self.ensemble.modules):
            scheduled = module.objective.scheduled_values(self.progress.global_step)
            add_row(self.progress.history[member], epoch, last_step, {**val[member], **train[member], **scheduled})

    def _evaluate(self, flat: torch.Tensor, stage: str) -> list[dict[str, float]]:
        sums = EpochSums(self.ensemble.term_names, len(self.members), self.device)
        for x in self._split_batches(self.data.splits[stage], self.trainer_cfg[f"limit_{stage}_batches"]):
            batch_size = x.shape[-len(self.data.input_shape) - 1]  # x: (B, ...), or (M, B, ...) a batch per member
            sums.add(self.ensemble.eval_terms(flat, x, self.progress.global_step), batch_size)
        return sums.means(stage)

    def _steps_reached(self) -> bool:
        """`trainer.max_steps` reached (-1: no limit), Lightning's test."""
        max_steps = self.trainer_cfg["max_steps"]
        return max_steps != -1 and self.progress.global_step >= max_steps

    def fit(self) -> None:
        """Train every epoch (from where a loaded checkpoint left off) until `trainer.max_epochs` epochs
        or `trainer.max_steps` steps, whichever comes first (-1: no limit), as Lightning's fit loop does.

        An epoch cut short by max_steps is not validated (Lightning validates at an epoch's last batch
        only), so it cannot become the best epoch; its train/* means are recorded (the single run's
        `on_train_epoch_end` logs them, and metrics.json takes train/* from there) and it counts in
        `epochs` (Lightning's `current_epoch` counts it as completed).
        """
        started = time.time() - self.progress.fit_seconds
        batches, train = self._train_batches(), self.data.splits["train"]
        size = self.data.batch_size
        max_epochs = self.trainer_cfg["max_epochs"]
        while (max_epochs == -1 or self.progress.epoch < max_epochs) and not self._steps_reached():
            epoch = self.progress.epoch
            self.optimizer.lr_scale = self._lr_scale(epoch)
            positions = self._epoch_positions(epoch)
            while self.progress.batch < batches and not self._steps_reached():
                self._step(self._fetch(train, positions[:, self.progress.batch * size:(self.progress.batch + 1) * size]))
                self.progress.batch += 1
                if self.every_n_steps and self.progress.global_step % self.every_n_steps == 0 \
                        and self.progress.batch < batches:  # the epoch's end is saved after its validation
                    self.progress.fit_seconds = time.time() - started
                    self.save_checkpoint()
                if self.progress.batch < batches:
                    self._requeue_if_signalled(started)
            if self.progress.batch == batches:
                self._validate(epoch)
                losses = [history[-1]["val/loss"] for history, alive in
                          zip(self.progress.history, self.alive.tolist()) if alive]
                log.info("epoch %d: %d of %d members training, val/loss %.4g to %.4g", epoch, len(losses),
                         len(self.members), min(losses, default=math.nan), max(losses, default=math.nan))
            else:
                self._end_cut_epoch(epoch)
                log.info("epoch %d: stopped at trainer.max_steps=%d, not validated", epoch,
                         self.trainer_cfg["max_steps"])
            self.progress.epoch, self.progress.batch = epoch + 1, 0
            self.sums = EpochSums(self.ensemble.term_names, len(self.members), self.device)
            self.progress.fit_seconds = time.time() - started
            self.save_checkpoint()
            if not bool(self.alive.any()):
                break
            self._requeue_if_signalled(started)
        if not any("val/loss" in entry for entry in self.progress.history[0]):  # as `ae_lab.run` then does
            log.warning(NO_VALIDATION)
            self.best_params = self.ensemble.flat.detach().clone()

    def _requeue_if_signalled(self, started: float) -> None:
        """The cluster's signal hook (ae_lab.preemption.ClusterSignal), called between two steps: once the
        signal has come, write the group checkpoint here and stop with `Requeued`. Any step boundary resumes
        exactly (the checkpoint holds the epoch's position, its sums and every random stream); the loop calls
        this only where the periodic checkpoint may be written too, not between an epoch's last step and
        its validation."""
        if self.cluster_signal is not None and self.cluster_signal.signalled:
            self.progress.fit_seconds = time.time() - started
            self.save_checkpoint()
            raise self.cluster_signal.stop(self.checkpoint_path)

    # ----- group checkpoint
    def save_checkpoint(self) -> None:
        state = {"members": [str(m.run_dir) for m in self.members], "configs": self.configs,
                 "params": self.ensemble.flat.detach(),
                 "best_params": self.best_params, "best_val": self.best_val, "best_epoch": self.best_epoch,
                 "alive": self.alive, "optimizer": self.optimizer.state_dict(), "progress": self.progress.__dict__,
                 "sums": {"sums": self.sums.sums, "count": self.sums.count}, "random": random_state(),
                 "streams": self.ensemble.streams.states}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.checkpoint_path, state)

    def load_checkpoint(self) -> bool:
        """Go on from the group checkpoint when there is one of these same members and configs."""
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        if state["members"] != [str(m.run_dir) for m in self.members] or state["configs"] != self.configs:
            log.warning("%s is of another group: not resumed from", self.checkpoint_path)
            return False
        with torch.no_grad():
            self.ensemble.flat.copy_(state["params"])
        self.best_params, self.best_val, self.best_epoch = state["best_params"], state["best_val"], state["best_epoch"]
        self.alive = state["alive"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.sums.sums, self.sums.count = state["sums"]["sums"], state["sums"]["count"]
        set_random_state(state["random"])
        self.ensemble.streams.states = state["streams"]
        return True

    # ----- results
    def final_metrics(self) -> list[dict[str, float]]:
        """Per member: train/* of the last epoch, val/* and test/* with its best weights, `epochs`."""
        val, test = self._evaluate(self.best_params, "val"), self._evaluate(self.best_params, "test")
        results = []
        for member, history in enumerate(self.progress.history):
            train = {k: v for k, v in history[-1].items() if k.startswith("train/") and k != STEP_LOSS} if history else {}
            results.append({**train, **val[member], **test[member], "epochs": self.progress.epoch})
        return results


def _checkpoint(module: Autoencoder, state: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, Any]:
    """A checkpoint `Autoencoder.load_from_checkpoint` reads: weights and the module's hyperparameters."""
    return {"epoch": epoch, "global_step": step, "pytorch-lightning_version": pl.__version__,
            "state_dict": state, "hyper_parameters": dict(module.hparams)}


def _save(path: Path, checkpoint: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, checkpoint)


def run_group(members: list[Member], group: str, checkpoint_path: Path,
              cluster_signal: ClusterSignal | None = None) -> list[Outcome]:
    """Train the members (configs of one structure, already validated) as one ensemble, resuming from
    `checkpoint_path` when it holds this group; write each member's run folder; return their outcomes.
    With `cluster_signal` (a group run as a SLURM job), the cluster's signal stops training at the next
    step boundary with the group checkpoint written and the members recorded `requeued` (`Requeued`).

    Each member's files and states belong to its `RunLifecycle`, started before training. How the run
    ends is decided in one place per phase (`RunLifecycle.ended_by`: requeued, interrupted or failed):
    while the group trains, for every member; while the members are written out, for the member being
    written and those after it.
    """
    first = members[0].cfg
    data = build_datamodule(first.dataset)
    accelerator = str(first.trainer.accelerator)
    device = torch.device("cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    trainer = GroupTrainer(members, data, checkpoint_path, device)
    trainer.cluster_signal = cluster_signal
    resumed = trainer.load_checkpoint()
    lives = []
    for index, member in enumerate(members):
        life = RunLifecycle(member.job, member.cfg, data, sweep=member.job.sweep_identity,
                            config_files=not resumed or not (member.run_dir / ".hydra" / "config.yaml").exists(),
                            resumed=resumed_from(checkpoint_path, trainer.progress.global_step, trainer.progress.epoch)
                            if resumed else None)
        life.update(ensemble={"group": group, "member": index, "members": len(members)})
        lives.append(life)
    with MemberLogs([member.job.log_file for member in members]).attached() as logs:
        log.info("ensemble %s: %d members on %s%s", group, len(members), device,
                 f", resumed at step {trainer.progress.global_step}" if resumed else "")
        try:
            trainer.fit()
        except BaseException as error:
            _ended_by(lives, error, checkpoint_path)
            raise
        finals = trainer.final_metrics()
        outcomes = []
        try:
            for index, (member, life) in enumerate(zip(members, lives)):
                with logs.only(index):
                    try:
                        outcomes.append(_write_member(trainer, index, life, finals[index]))
                    except Exception as error:  # noqa: BLE001 - its run.json says so; the others are written
                        log.exception("member %d (%s) failed after training: %s", index, member.run_dir.name, error)
                        outcomes.append(Outcome(None, f"failed after training: {error}"))
        except KeyboardInterrupt as error:  # the member being written and those after it: a re-run trains them again
            if outcomes:  # as a group without the members written, which cannot resume from this checkpoint
                checkpoint_path.unlink(missing_ok=True)
            _ended_by(lives[len(outcomes):], error, checkpoint_path)
            raise
    checkpoint_path.unlink(missing_ok=True)  # every member has its own checkpoints now
    return outcomes


def _ended_by(lives: list[RunLifecycle], error: BaseException, checkpoint_path: Path) -> None:
    """Record in each of `lives` how `error` ended it (`RunLifecycle.ended_by`); an interrupted member goes
    on from the group checkpoint, when there is one."""
    for life in lives:
        life.ended_by(error, checkpoint_path if checkpoint_path.exists() else None)


def _write_member(trainer: GroupTrainer, index: int, life: RunLifecycle, metrics: dict[str, float]) -> Outcome:
    """Member `index`'s run folder through the single run's code: checkpoints, evaluation, metrics.json,
    figures, its W&B run (its epoch history, then its summary) and run.json."""
    started = time.time()
    cfg, run_dir, data = life.cfg, life.run_dir, life.data
    try:
        life.open_logger(run_id=life.previous_wandb_run(), trained_rows=trainer.progress.history[index])
        failure = trainer.progress.failures.get(index)
        if failure is not None:
            life.history.write(run_dir)
            life.failed(FloatingPointError(failure["message"]),
                        failure={key: failure[key] for key in ("step", "epoch", "terms")})
            return Outcome(None, failure["message"])
        module = trainer.ensemble.modules[index]
        step, epochs = trainer.progress.global_step, trainer.progress.epoch
        folder = run_dir / "checkpoints"
        _save(folder / "last.ckpt", _checkpoint(module, trainer.ensemble.member_state(trainer.ensemble.flat, index),
                                                epochs, step))
        best = trainer.ensemble.member_state(trainer.best_params, index)
        best_checkpoint = None  # none when no validation made a best epoch, as in a single run
        if trainer.best_epoch[index] >= 0:
            best_checkpoint = folder / "best.ckpt"
            _save(best_checkpoint, _checkpoint(module, best, trainer.best_epoch[index], step))
        module.load_state_dict(best)
        module.to(trainer.device)  # evaluated where the group trained (its modules were built on the CPU)
        figures = write_results(module, data, cfg, run_dir, metrics, life.history, best_checkpoint)
        seconds = time.time() - started
        log.info("member %d (%s) written in %.2f s: test/loss %.4g", index, run_dir.name, seconds,
                 metrics.get("test/loss", math.nan))
        life.completed(Results(metrics, figures, best_checkpoint, {
            "fit_seconds": trainer.progress.fit_seconds, "writeout_seconds": seconds, "first_step_unix": None}))
        return Outcome(metrics)
    except Exception as error:
        life.failed(error)
        raise
    finally:
        life.close()
