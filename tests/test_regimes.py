"""Training regimes: weight schedules (closed forms, through a fit, across a resume), free bits, the
capacity objective, the beta-TCVAE decomposition, and the refusals of settings that make no sense."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ae_lab.checks import schedule_warnings, validate
from ae_lab.errors import ConfigError
from ae_lab.nets import Latent
from ae_lab.kl_forms import free_bits_kl, gaussian_log_density, kl_decomposition, log_importance_weights
from ae_lab.objectives import Objective
from ae_lab.schedules import scheduled_weight



def _schedule(**keys):
    base = dict(kind="constant", start=0.0, steps=100, cycles=4, rise=0.5, shape="linear", capacity=25.0)
    return OmegaConf.create({**base, **keys})


def test_linear_warm_up_against_its_closed_form():
    schedule = _schedule(kind="linear", start=0.2, steps=100)
    assert [scheduled_weight(schedule, 1.0, t) for t in (0, 25, 50, 99, 100, 250)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.992, 1.0, 1.0])


def test_cyclical_schedule_against_its_closed_form():
    # 4 cycles of 25 steps, rising over the first half (12.5 steps) of each, from 0 to 2
    linear = _schedule(kind="cyclical", start=0.0, steps=100, cycles=4, rise=0.5)
    steps = (0, 5, 10, 12, 13, 25, 30, 62, 99, 100, 400)
    expected = [0.0, 2 * 5 / 12.5, 2 * 10 / 12.5, 2 * 12 / 12.5, 2.0, 0.0, 2 * 5 / 12.5, 2 * 12 / 12.5, 2.0, 2.0, 2.0]
    assert [scheduled_weight(linear, 2.0, t) for t in steps] == pytest.approx(expected)
    cosine = _schedule(kind="cyclical", start=0.5, steps=100, cycles=4, rise=0.5, shape="cosine")
    assert scheduled_weight(cosine, 2.0, 30) == pytest.approx(0.5 + 1.5 * (1 - math.cos(math.pi * 0.4)) / 2)
    assert scheduled_weight(cosine, 2.0, 75) == pytest.approx(0.5)  # a new cycle starts from `start`


def test_constant_schedule_keeps_the_weight_and_capacity_rises_linearly(compose_config):
    objective = Objective(compose_config(["model=vae", "loss.beta=4"]).loss, gaussian_head=True)
    assert objective.weights(0)["beta"] == objective.weights(10**6)["beta"] == 4.0
    capacity = Objective(compose_config(["model=vae", "loss.beta=100", "loss.beta_schedule.kind=capacity",
                                         "loss.beta_schedule.capacity=20", "loss.beta_schedule.steps=400"]).loss,
                         gaussian_head=True)
    assert [capacity.weights(t)["capacity"] for t in (0, 100, 400, 800)] == [0.0, 5.0, 20.0, 20.0]
    assert capacity.weights(100)["beta"] == 100.0  # gamma stays constant
    assert objective.weights(100)["capacity"] == 0.0  # no capacity without its schedule
    # which weights move with the step (logged per epoch): none under the constant schedule
    assert objective.scheduled_names == [] and capacity.scheduled_names == ["capacity"]


# digits: 5 training batches an epoch, so epochs end after steps 4, 9, 14 and 19
FIT = ["model=vae", "model.hidden_dims=[32]", "model.latent_dim=4", "trainer.max_epochs=4",
       "trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "eval=minimal",
       "logger=csv", "loss.beta=2", "loss.beta_schedule.kind=cyclical", "loss.beta_schedule.steps=16",
       "loss.beta_schedule.cycles=2", "loss.beta_schedule.rise=0.75", "checkpoint_every_n_steps=3", "seed=1"]
# cycles of 8 steps rising over 6: the last steps of the epochs (4, 9, 14, 19) sit at 4/6, 1/6, past the
# rise, past the schedule
EXPECTED_BETA = {0: 2 * 4 / 6, 1: 2 * 1 / 6, 2: 2.0, 3: 2.0}


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return {int(row["epoch"]): float(row[key]) for row in rows if row.get(key)}


def test_scheduled_beta_is_logged_per_epoch_and_continues_exactly_after_a_resume_mid_cycle(tmp_path, kill_after_step,
                                                                                           read_json, run_cli):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run_cli([*FIT, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _logged(reference, "scheduled/beta") == pytest.approx(EXPECTED_BETA)
    # killed after step 8, in the second cycle's rise: the newest checkpoint is step 6's (mid-epoch)
    kill_after_step([*FIT, f"hydra.run.dir={killed}"], tmp_path, step=8)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    done = run_cli([f"resume={killed}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _logged(killed, "scheduled/beta")
    assert {1, 2, 3} <= set(resumed) and resumed == pytest.approx({e: EXPECTED_BETA[e] for e in resumed})
    assert read_json(killed / "metrics.json") == read_json(reference / "metrics.json")


def test_a_schedule_longer_than_the_run_is_warned(compose_config):
    cfg = compose_config([*FIT, "loss.beta_schedule.steps=1000"])
    assert validate(cfg, (1, 8, 8)) == []
    [warning] = schedule_warnings(cfg, train_size=1258)
    assert "loss.beta_schedule.steps=1000" in warning and "20 training steps" in warning
    assert schedule_warnings(compose_config(FIT), train_size=1258) == []


def _posterior(batch: int, units: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, units, generator=generator, dtype=torch.float64)
    logvar = torch.randn(batch, units, generator=generator, dtype=torch.float64) * 0.5
    return mean, logvar


def _kl_by_hand(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per example and unit."""
    std = torch.exp(0.5 * logvar)
    return torch.log(1 / std) + (std**2 + mean**2) / 2 - 0.5


def test_free_bits_take_the_max_per_unit_and_a_unit_below_them_gets_no_gradient():
    mean = torch.tensor([[0.01, 2.0], [-0.02, 1.5], [0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[0.0, -1.0], [0.01, -0.5], [-0.01, 0.3]], dtype=torch.float64, requires_grad=True)
    kl = _kl_by_hand(mean, logvar).detach()
    per_unit = kl.mean(0)
    assert per_unit[0] < 0.5 < per_unit[1]
    value = free_bits_kl(_kl_by_hand(mean, logvar), 0.5)
    assert value.item() == pytest.approx(0.5 + per_unit[1].item())
    value.backward()
    assert torch.all(mean.grad[:, 0] == 0) and torch.all(logvar.grad[:, 0] == 0)
    assert torch.all(mean.grad[:, 1] != 0)


@pytest.fixture(scope="session")
def vae_terms(compose_config):
    def vae_terms(overrides: list[str], step: int, batch: int = 6, units: int = 3, dataset_size: int | None = None):
        cfg = compose_config(["model=vae", *overrides])
        objective = Objective(cfg.loss, gaussian_head=True, dataset_size=dataset_size)
        mean, logvar = _posterior(batch, units, seed=2)
        generator = torch.Generator().manual_seed(5)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(batch, units, generator=generator, dtype=torch.float64)
        logits = torch.randn(batch, 1, 2, 2, generator=generator, dtype=torch.float64)
        x = torch.rand(batch, 1, 2, 2, generator=generator, dtype=torch.float64).round()
        terms = objective(logits, x, Latent(z=z, code=mean, mean=mean, logvar=logvar), x, objective.weights(step),
                          create_graph=False)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item() / batch
        return terms, recon, _kl_by_hand(mean, logvar).sum(1).mean().item()

    return vae_terms


def test_capacity_loss_is_gamma_times_the_distance_of_the_kl_to_the_capacity(vae_terms):
    # C rises to 4 nats over 100 steps: 1 nat at step 25, below this batch's KL, 4 at step 100, above it
    overrides = ["loss.beta=50", "loss.beta_schedule.kind=capacity", "loss.beta_schedule.capacity=4",
                 "loss.beta_schedule.steps=100"]
    for step, capacity in ((25, 1.0), (100, 4.0)):
        terms, recon, kl = vae_terms(overrides, step)
        assert terms["kl"].item() == pytest.approx(kl)
        assert terms["loss"].item() == pytest.approx(recon + 50 * abs(kl - capacity))
    assert 1.0 < kl < 4.0  # both sides of the absolute value are exercised


def test_free_bits_loss_by_hand_and_the_true_kl_still_reported(vae_terms):
    terms, recon, kl = vae_terms(["loss.beta=2", "loss.free_bits=1.0"], step=0)
    mean, logvar = _posterior(6, 3, seed=2)
    per_unit = _kl_by_hand(mean, logvar).mean(0)
    assert terms["kl"].item() == pytest.approx(kl) and terms["elbo"].item() == pytest.approx(-(recon + kl))
    assert terms["loss"].item() == pytest.approx(recon + 2 * per_unit.clamp(min=1.0).sum().item())


def _weight(estimator: str, i: int, j: int, batch: int, size: int) -> float:
    """w_ij written out from each estimator's definition (Chen et al. 2018, section 4.1 and appendix C.2)."""
    if j == i:
        return 1 / size if estimator != "mws" else 1 / (size * batch)
    if estimator == "mws":
        return 1 / (size * batch)
    if estimator == "mss_uniform":
        return (size - 1) / (size * (batch - 1))
    return (size - batch + 1) / (size * (batch - 1)) if j == (i + 1) % batch else 1 / (batch - 1)


@pytest.mark.parametrize("estimator", ["mws", "mss", "mss_uniform"])
def test_tc_terms_sum_to_the_sampled_kl_and_match_a_brute_force_aggregate(estimator):
    batch, units, size = 7, 3, 50
    mean, logvar = _posterior(batch, units)
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(batch, units, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parts = kl_decomposition(z, mean, logvar, size, estimator)
    posterior = torch.distributions.Normal(mean, std).log_prob(z).sum(1)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert (parts["mi"] + parts["tc"] + parts["dwkl"]).item() == pytest.approx((posterior - prior).mean().item(),
                                                                              rel=1e-10)
    aggregate = []  # log sum_j w_ij q(z_i|x_j), in loops
    for i in range(batch):
        density = sum(math.exp(torch.distributions.Normal(mean[j], std[j]).log_prob(z[i]).sum().item())
                      * _weight(estimator, i, j, batch, size) for j in range(batch))
        aggregate.append(math.log(density))
    aggregate = torch.tensor(aggregate, dtype=torch.float64)
    assert parts["mi"].item() == pytest.approx((posterior - aggregate).mean().item(), rel=1e-9)


@pytest.mark.parametrize("estimator", ["mss", "mss_uniform"])
def test_stratified_estimates_of_the_aggregate_posterior_are_unbiased_over_every_batch(estimator):
    """Six examples, so every q(z|x_n) can be summed: q(z) = 1/6 sum_n q(z|x_n) exactly. A batch of
    four holds the example z came from (at row i) and an ordered draw of three of the other five; over
    the 60 such batches the estimates sum_j w_ij q(z|x_j) of the joint and of each marginal average to
    the exact values, for every row and example."""
    size, batch = 6, 4
    mean, logvar = _posterior(size, 2, seed=4)
    std = torch.exp(0.5 * logvar)
    point = torch.tensor([0.3, -0.4], dtype=torch.float64)  # any z: the estimate is unbiased at every point
    per_unit = torch.distributions.Normal(mean, std).log_prob(point).exp()  # q(z_d | x_n), (N, D)
    exact_joint, exact_marginals = per_unit.prod(1).mean().item(), per_unit.mean(0)
    weights = log_importance_weights(estimator, batch, size, torch.float64, torch.device("cpu")).exp()
    for row, own in itertools.product(range(batch), range(size)):  # z at any place, from any example
        joints, marginals = [], []
        for others in itertools.permutations([n for n in range(size) if n != own], batch - 1):
            members = per_unit[[*others[:row], own, *others[row:]]]
            joints.append((weights[row] * members.prod(1)).sum().item())
            marginals.append((weights[row].unsqueeze(1) * members).sum(0))
        assert sum(joints) / len(joints) == pytest.approx(exact_joint, rel=1e-12)
        torch.testing.assert_close(torch.stack(marginals).mean(0), exact_marginals, rtol=1e-12, atol=0)
    torch.testing.assert_close(weights.sum(1), torch.ones(batch, dtype=torch.float64))


def test_each_estimators_weight_matrix_is_the_one_its_definition_gives():
    size, batch = 50, 5
    for estimator in ("mws", "mss", "mss_uniform"):
        weights = log_importance_weights(estimator, batch, size, torch.float64, torch.device("cpu")).exp()
        expected = torch.tensor([[_weight(estimator, i, j, batch, size) for j in range(batch)] for i in range(batch)],
                                dtype=torch.float64)
        torch.testing.assert_close(weights, expected)


def test_tc_terms_of_a_batch_of_one_and_the_default_estimator():
    """One example: q(z) is 1/N q(z|x) under either estimator, so MI = log N and TC = (D - 1) log N; the
    estimator is minibatch-weighted sampling unless named."""
    mean, logvar = _posterior(5, 3)
    z = mean + 0.1
    for estimator in ("mws", "mss"):
        parts = kl_decomposition(z[:1], mean[:1], logvar[:1], 40, estimator)
        assert parts["mi"].item() == pytest.approx(math.log(40), rel=1e-12)
        assert parts["tc"].item() == pytest.approx(2 * math.log(40), rel=1e-12)
    default, mws = kl_decomposition(z, mean, logvar, 40), kl_decomposition(z, mean, logvar, 40, "mws")
    assert all(torch.equal(default[name], mws[name]) for name in ("mi", "tc", "dwkl"))


def test_gaussian_log_density_matches_torch_distributions():
    mean, logvar = _posterior(4, 3)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(z)
    torch.testing.assert_close(gaussian_log_density(z, mean, logvar), expected)


def _codes(duplicated: bool, count: int = 2000, std: float = 0.3):
    generator = torch.Generator().manual_seed(3)
    means = torch.randn(count, 2, generator=generator, dtype=torch.float64)
    if duplicated:
        means[:, 1] = means[:, 0]
    logvar = torch.full_like(means, 2 * math.log(std))
    z = means + std * torch.randn(count, 2, generator=generator, dtype=torch.float64)
    return z, means, logvar


def test_tc_is_near_zero_for_independent_codes_and_the_gaussian_value_for_duplicated_ones():
    # the whole set in one batch (N = M): the aggregate posterior is a 2,000-component mixture
    independent = kl_decomposition(*_codes(False), 2000, "mss_uniform")["tc"].item()
    duplicated = kl_decomposition(*_codes(True), 2000, "mss_uniform")["tc"].item()
    rho = 1 / (1 + 0.3**2)  # z_1, z_2 = m + 0.3 e_1, m + 0.3 e_2 with m ~ N(0, 1)
    assert abs(independent) < 0.05
    assert duplicated == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.1)


def test_mws_bias_is_the_documented_constant_when_the_batch_is_the_whole_set():
    codes = _codes(True, count=300)
    mws, mss = kl_decomposition(*codes, 300, "mws"), kl_decomposition(*codes, 300, "mss_uniform")
    log_n = math.log(300)
    assert (mws["tc"] - mss["tc"]).item() == pytest.approx(log_n)  # (D - 1) log N with D = 2
    assert (mws["dwkl"] - mss["dwkl"]).item() == pytest.approx(-2 * log_n)
    assert (mws["mi"] - mss["mi"]).item() == pytest.approx(log_n)


def test_tc_objective_weights_its_three_terms(vae_terms):
    terms, recon, kl = vae_terms(["loss.beta=6", "loss.kl=tc", "loss.tc_alpha=0.5", "loss.tc_gamma=2"], step=0,
                              dataset_size=1000)
    assert terms["kl"].item() == pytest.approx(kl)
    expected = recon + 0.5 * terms["mi"] + 6 * terms["tc"] + 2 * terms["dwkl"]
    assert terms["loss"].item() == pytest.approx(expected.item())


REFUSED = [
    (["loss.free_bits=0.5"], "loss.free_bits", "Gaussian latent head"),
    (["loss.beta_schedule.kind=capacity"], "loss.beta_schedule.kind", "Gaussian latent head"),
    (["loss.kl=tc"], "loss.kl", "Gaussian latent head"),
    (["model=vae", "loss.free_bits=0.5", "loss.kl=tc"], "loss.kl", "one form of the KL term"),
    (["model=vae", "loss.free_bits=-1"], "loss.free_bits", ">= 0"),
    (["loss.beta_schedule.kind=cyclical", "loss.beta_schedule.rise=0"], "loss.beta_schedule.rise", "(0, 1]"),
    (["loss.beta_schedule.kind=linear", "loss.beta_schedule.steps=0"], "loss.beta_schedule.steps", ">= 1"),
    (["loss.sparsity_schedule.kind=capacity"], "loss.sparsity_schedule.kind", "capacity is a form"),
    (["model.pretrain=greedy", "model.arch=conv"], "model.pretrain", "model.arch=mlp"),
    (["model=vae", "model.pretrain=greedy"], "model.pretrain", "deterministic latent head"),
    (["model.pretrain=greedy", "trainer.max_epochs=3"], "trainer.max_epochs", "3 pretraining epochs"),
    (["model.pretrain=greedy", "trainer=ddp", "trainer.max_epochs=10"], "model.pretrain", "one device"),
]


@pytest.mark.parametrize("overrides,key,reason", REFUSED)
def test_regimes_that_make_no_sense_are_refused_naming_the_key(overrides, key, reason, compose_config):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=") as refused:
        validate(compose_config(overrides), (1, 8, 8))
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_cli_refuses_free_bits_without_a_gaussian_head_in_one_line(tmp_path, run_cli):
    done = run_cli(["loss.free_bits=0.5"], cwd=tmp_path)
    assert done.returncode != 0 and "loss.free_bits" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout and not (tmp_path / "outputs").exists()


def test_beta_tcvae_sweep_is_the_locatello_network_with_the_tc_objective(compose_config):
    from paths import CONF

    plain, tc = compose_config(["+sweeps=locatello_beta"]), compose_config(["+sweeps=locatello_beta_tcvae"])
    assert tc.model == plain.model and tc.dataset == plain.dataset and tc.loss.kl == "tc"
    assert validate(tc, (1, 64, 64)) == []
    params = OmegaConf.load(CONF.parent / "sweeps" / "locatello_beta_tcvae.yaml").hydra.sweeper.params
    assert [float(b) for b in params["loss.beta"].split(",")] == [1, 2, 4, 6, 8, 10]


KL_FORMS = {
    "free_bits": (["loss.beta=2", "loss.free_bits=0.5", "loss.beta_schedule.kind=linear", "loss.beta_schedule.steps=4"],
                  lambda m, w: m["test/recon"] + w["beta"] * m["test/kl_free_bits"]),
    "capacity": (["loss.beta=30", "loss.beta_schedule.kind=capacity", "loss.beta_schedule.capacity=2",
                  "loss.beta_schedule.steps=4"],
                 lambda m, w: m["test/recon"] + w["beta"] * abs(m["test/kl"] - w["capacity"])),
    "tc": (["loss.beta=4", "loss.kl=tc", "loss.tc_alpha=0.5", "loss.tc_estimator=mss"],
           lambda m, w: m["test/recon"] + 0.5 * m["test/mi"] + 4 * m["test/tc"] + m["test/dwkl"]),
}


@pytest.mark.parametrize("form", sorted(KL_FORMS))
def test_every_kl_form_trains_and_reports_a_loss_that_is_the_weighted_sum_of_its_terms(form, tmp_path,
                                                                                       compose_config,
                                                                                       train_in_process):

    overrides = ["model=vae", "trainer=debug", "trainer.limit_test_batches=1", "logger=none", "eval=minimal",
                 "model.hidden_dims=[16]", "model.latent_dim=3", *KL_FORMS[form][0]]
    metrics = train_in_process(overrides, tmp_path / form)
    weights = Objective(compose_config(overrides).loss, gaussian_head=True, dataset_size=1).weights(2)  # 2 steps
    assert metrics["test/loss"] == pytest.approx(KL_FORMS[form][1](metrics, weights), rel=1e-5)
    assert metrics["test/elbo"] == pytest.approx(-(metrics["test/recon"] + metrics["test/kl"]), rel=1e-5)


def test_a_checkpoint_from_before_the_regime_keys_still_matches_its_run(compose_config):
    """Checkpoints written before `loss.beta_schedule` & co. existed resume when the run keeps their defaults."""
    from ae_lab.config import flatten
    from ae_lab.resume import config_differences

    run = OmegaConf.to_container(compose_config(["model=vae"]), resolve=True, enum_to_str=True)
    older = {section: dict(values) if isinstance(values, dict) else values for section, values in run.items()}
    for key in ("beta_schedule", "sparsity_schedule", "free_bits", "kl", "tc_alpha", "tc_gamma", "tc_estimator"):
        del older["loss"][key]
    assert "loss.free_bits" not in flatten(older)
    assert config_differences(older, run) == []
    changed = OmegaConf.to_container(compose_config(["model=vae", "loss.free_bits=0.5"]), resolve=True,
                                     enum_to_str=True)
    assert config_differences(older, changed) == ["loss.free_bits absent there, 0.5 in the run"]
