"""Samplers (prior, Gaussian mixture on training codes) and the Fréchet distance of samples."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.mixture import GaussianMixture

import ae_lab
from ae_lab.checks import validate
from ae_lab.data import build_datamodule
from ae_lab.errors import ConfigError
from ae_lab.evaluation.classifier import feature_classifier, whole
from ae_lab.evaluation.frechet import feature_frechet_distance, frechet_distance
from ae_lab.evaluation.sample_quality import decode_samples
from ae_lab.module import Autoencoder
from ae_lab.samplers import GaussianMixtureSampler, PriorSampler, file_sha256, sampler_for


def _random_covariance(rng: np.random.Generator, size: int, rank: int | None = None) -> np.ndarray:
    factor = rng.normal(size=(size, rank or size))
    return factor @ factor.T / size


# ----- the Fréchet distance against closed forms


def test_frechet_distance_of_diagonal_gaussians_is_the_hand_computed_value():
    # |(0,0) - (1,2)|^2 + (sqrt 1 - sqrt 4)^2 + (sqrt 4 - sqrt 9)^2 = 5 + 1 + 1
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 9.0])) \
        == pytest.approx(7.0, abs=1e-12)
    # singular covariances that share no direction: tr (S1 S2)^(1/2) = 0, so FD = tr S1 + tr S2
    assert frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0])) \
        == pytest.approx(2.0, abs=1e-12)
    assert frechet_distance(np.array([3.0]), np.array([[4.0]]), np.array([1.0]), np.array([[9.0]])) \
        == pytest.approx(4.0 + 1.0, abs=1e-12)  # 1-D: (m1 - m2)^2 + (s1 - s2)^2


def test_frechet_distance_of_commuting_covariances_is_the_sum_over_their_shared_axes():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mean_a, mean_b = rng.normal(size=6), rng.normal(size=6)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fd = frechet_distance(mean_a, rotation @ np.diag(a) @ rotation.T, mean_b, rotation @ np.diag(b) @ rotation.T)
    assert fd == pytest.approx(expected, rel=1e-10)
    cov = rotation @ np.diag(a) @ rotation.T
    assert abs(frechet_distance(mean_a, cov, mean_a, cov)) < 1e-10


def test_frechet_distance_of_non_commuting_covariances_matches_the_2x2_closed_form_and_scipy_sqrtm():
    rng = np.random.default_rng(1)
    for _ in range(5):
        cov_a, cov_b = _random_covariance(rng, 2), _random_covariance(rng, 2)
        product = cov_a @ cov_b
        # a 2x2 matrix with eigenvalues >= 0: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
        cross = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
        expected = np.trace(cov_a) + np.trace(cov_b) - 2 * cross
        assert frechet_distance(np.zeros(2), cov_a, np.zeros(2), cov_b) == pytest.approx(expected, rel=1e-9)
    for size in (5, 20):  # brute force: the (non-symmetric) matrix square root of the product
        cov_a, cov_b = _random_covariance(rng, size), _random_covariance(rng, size)
        mean_a, mean_b = rng.normal(size=size), rng.normal(size=size)
        brute = (((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
        assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(brute, rel=1e-8)


def test_frechet_distance_of_sample_sets_estimates_the_distance_of_their_gaussians():
    rng = np.random.default_rng(2)
    cov_a, cov_b = _random_covariance(rng, 4), _random_covariance(rng, 4, rank=2)  # b: singular, like dead units
    mean_b = np.array([1.0, 0, 0, -1])
    truth = frechet_distance(np.zeros(4), cov_a, mean_b, cov_b)
    estimate = feature_frechet_distance(rng.multivariate_normal(np.zeros(4), cov_a, 200_000),
                                        rng.multivariate_normal(mean_b, cov_b, 200_000))
    assert np.isfinite(estimate) and estimate == pytest.approx(truth, rel=0.02)


# ----- the samplers' distributions


def _moments_within(samples: torch.Tensor, mean: np.ndarray, cov: np.ndarray, sigmas: float = 5.0) -> None:
    """Sample mean and covariance within `sigmas` standard errors (estimated from the samples: the
    standard deviation of each coordinate, and of each centred product, over sqrt(n)) of the truth."""
    x = samples.double().numpy()
    n = len(x)
    centred = x - mean
    assert np.all(np.abs(x.mean(0) - mean) <= sigmas * x.std(0) / np.sqrt(n))
    products = centred[:, :, None] * centred[:, None, :]
    assert np.all(np.abs(products.mean(0) - cov) <= sigmas * products.std(0) / np.sqrt(n) + 1e-12)


def test_prior_samples_are_standard_normal_and_repeat_with_the_generator():
    sampler = PriorSampler(3)
    samples = sampler.sample(40_000, torch.Generator().manual_seed(0))
    assert samples.shape == (40_000, 3) and samples.dtype == torch.float32
    _moments_within(samples, np.zeros(3), np.eye(3))
    assert torch.equal(sampler.sample(5, torch.Generator().manual_seed(1)), sampler.sample(5, torch.Generator().manual_seed(1)))


def test_mixture_samples_have_the_moments_of_scikit_learns_fitted_mixture():
    rng = np.random.default_rng(3)
    codes = np.concatenate([rng.normal([0, 0, 0], 0.3, (300, 3)), rng.normal([3, -1, 2], [1, 0.2, 0.5], (600, 3))])
    sampler = GaussianMixtureSampler.fit(torch.from_numpy(codes).float(), 2, seed=0)
    reference = GaussianMixture(2, covariance_type="full", random_state=0).fit(codes.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(sampler.weights, reference.weights_, rtol=1e-6)
    np.testing.assert_allclose(sampler.means, reference.means_, rtol=1e-6, atol=1e-9)
    mean = (reference.weights_[:, None] * reference.means_).sum(0)
    second = np.einsum("k,kij->ij", reference.weights_,
                       reference.covariances_ + reference.means_[:, :, None] * reference.means_[:, None, :])
    samples = sampler.sample(60_000, torch.Generator().manual_seed(0))
    _moments_within(samples, mean, second - np.outer(mean, mean))
    # each component's share of the samples: binomial standard error
    nearest = torch.cdist(samples.double(), torch.from_numpy(reference.means_)).argmin(1)
    share = np.bincount(nearest.numpy(), minlength=2) / len(samples)
    assert np.all(np.abs(share - reference.weights_) <= 5 * np.sqrt(reference.weights_ * (1 - reference.weights_) / len(samples)) + 0.01)


# ----- a trained model: its saved mixture, its FD


TRAINED = ["model=vae", "model.hidden_dims=[128]", "model.latent_dim=8", "trainer.max_epochs=12",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none",
           "eval=minimal", "eval.fd_samples=10000", "eval.gmm_components=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compose_config, train_in_process):
    """A small VAE trained on digits with the Fréchet distances on; the classifier in its own cache."""
    root = tmp_path_factory.mktemp("samplers")
    overrides = [*TRAINED, f"eval.fd_classifier_cache={root / 'cache'}"]
    metrics = train_in_process(overrides, root / "run")
    cfg = compose_config(overrides)
    model = ae_lab.load(root / "run")
    return SimpleNamespace(root=root, run_dir=root / "run", cfg=cfg, data=build_datamodule(cfg.dataset),
                           module=model.module, metrics=metrics)


@pytest.fixture(scope="module")
def plain(trained, train_in_process):
    """A plain autoencoder on digits, two batches of training, its mixture fitted by its evaluation."""
    run_dir = trained.root / "plain"
    train_in_process(["trainer=debug", "logger=none", "eval=minimal", "eval.fd_samples=10000", "eval.gmm_components=3",
                      f"eval.fd_classifier_cache={trained.root / 'cache'}"], run_dir)
    return run_dir


def _counting(model):
    """`model` (ae_lab.load's) with its calls for training codes counted in `model.calls`."""
    model.calls = []
    training_codes = model.training_codes

    def counted():
        model.calls.append(1)
        return training_codes()

    model.training_codes = counted
    return model


def test_evaluation_records_the_distances_the_classifier_and_its_cache(trained, read_json):
    metrics = trained.metrics
    assert metrics["eval/fd_n"] == 359  # digits' whole test split
    assert metrics["eval/fd_classifier_accuracy"] > 0.93
    assert {"eval/fd_prior", "eval/fd_gmm", "eval/fd_real"} <= metrics.keys()
    assert read_json(trained.run_dir / "metrics.json")["eval/fd_gmm"] == metrics["eval/fd_gmm"]
    [cached] = (trained.root / "cache").iterdir()
    assert cached.name.startswith("digits-")
    assert read_json(trained.run_dir / "evaluation.json")["fd_classifier"]["path"] == str(cached)


def test_fd_separates_a_trained_models_samples_from_an_untrained_ones_and_from_noise(trained):
    ev = trained.cfg.eval
    classifier = feature_classifier(trained.data, trained.cfg.dataset, list(ev.fd_classifier_hidden),
                                    ev.fd_classifier_epochs, ev.fd_classifier_cache)
    test_x, _ = whole(trained.data.splits["test"])
    real = classifier.features(test_x, 500).numpy()
    generator = torch.Generator().manual_seed(0)
    untrained = Autoencoder.from_config(trained.cfg, (1, 8, 8)).eval()
    untrained_fd = feature_frechet_distance(classifier.features(
        decode_samples(untrained, PriorSampler(8), len(real), generator, 500), 500).numpy(), real)
    noise_fd = feature_frechet_distance(classifier.features(torch.rand(len(real), 1, 8, 8, generator=generator),
                                                            500).numpy(), real)
    halves = feature_frechet_distance(real[::2], real[1::2])  # test against the other half of the test set
    for name in ("fd_prior", "fd_gmm"):
        fd = trained.metrics[f"eval/{name}"]
        assert halves < 0.25 * fd and trained.metrics["eval/fd_real"] < 0.25 * fd
        assert fd < 0.6 * untrained_fd and fd < 0.6 * noise_fd, (name, fd, untrained_fd, noise_fd)


def test_the_saved_mixture_is_reused_and_fitted_again_for_another_checkpoint(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    saved = run_dir / "samplers" / "gmm-4.npz"
    written = saved.read_bytes()
    model = _counting(ae_lab.load(run_dir))
    first = sampler_for(model, "gmm").sample(100, torch.Generator().manual_seed(0))
    assert model.calls == [] and saved.read_bytes() == written  # the evaluation's own fit, read back
    again = sampler_for(model, "gmm").sample(100, torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and model.calls == []
    evaluated = GaussianMixtureSampler.load(saved)[0]
    saved.unlink()  # fitted by the loader from its own codes: the evaluation's mixture
    fresh = sampler_for(model, "gmm")
    assert model.calls == [1]
    np.testing.assert_allclose(fresh.means, evaluated.means, rtol=1e-4, atol=1e-5)
    last = _counting(ae_lab.load(run_dir, which="last"))
    assert last.checkpoint.read_bytes() != model.checkpoint.read_bytes()
    sampler_for(last, "gmm")
    assert last.calls == [1]
    assert GaussianMixtureSampler.load(saved)[1]["checkpoint_sha256"] == file_sha256(last.checkpoint)
    sampler_for(last, "gmm")
    assert last.calls == [1]


def test_a_vaes_samples_from_the_prior_are_its_decoded_standard_normal_codes_in_pixel_units(trained):
    model = ae_lab.load(trained.run_dir)
    samples = model.sample(50, sampler="prior", seed=3)
    z = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        by_hand = torch.sigmoid(model.module.decoder(z)) * 16  # digits' raw units: counts 0..16
    assert samples.shape == (50, 1, 8, 8)
    np.testing.assert_allclose(samples, by_hand.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(samples, model.sample(50, sampler="prior", seed=4))


def test_a_plain_autoencoder_samples_from_the_mixture_its_evaluation_fitted(plain):
    model = _counting(ae_lab.load(plain))
    samples = model.sample(40, sampler="gmm", seed=0)
    assert model.calls == []  # the evaluation's mixture, for this checkpoint
    mixture, fitted_from = GaussianMixtureSampler.load(plain / "samplers" / "gmm-3.npz")
    assert fitted_from["checkpoint_sha256"] == file_sha256(plain / "checkpoints" / "best.ckpt")
    reference = GaussianMixture(3, covariance_type="full", random_state=0).fit(
        model.training_codes().double().numpy())  # every training code: digits has fewer than gmm_train_size
    order = np.argsort(reference.means_[:, 0])
    np.testing.assert_allclose(mixture.means[np.argsort(mixture.means[:, 0])], reference.means_[order], rtol=1e-3, atol=1e-4)
    codes = mixture.sample(40, torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_hand = torch.sigmoid(model.module.decoder(codes)) * 16
    assert samples.shape == (40, 1, 8, 8)
    np.testing.assert_allclose(samples, by_hand.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="latent head is deterministic"):
        model.sample(4, sampler="prior")


def test_sampler_for_refuses_in_one_line(plain):
    model = ae_lab.load(plain)
    cases = [(lambda: sampler_for(model, "vamp"), "sampler='vamp' is not allowed: one of prior, gmm"),
             (lambda: sampler_for(model, "prior"), "latent head is deterministic.*use sampler='gmm'"),
             (lambda: sampler_for(model, "gmm", components=0), "components=0 is not allowed"),
             (lambda: sampler_for(model, "gmm", components=5000), "at most 1258, the number of training codes"),
             (lambda: sampler_for(model, "prior", components=3), "is not an option of sampler='prior'")]
    before = sorted(path.name for path in (plain / "samplers").iterdir())
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)
    assert sorted(path.name for path in (plain / "samplers").iterdir()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_quality_and_samples_on_cuda_equal_the_cpus(trained, tmp_path):
    import copy

    from ae_lab.evaluation.sample_quality import sample_quality

    test = trained.data.splits["test"]
    cpu = sample_quality(trained.module, trained.data, test, trained.cfg, tmp_path, None, True, {})
    cuda = sample_quality(copy.deepcopy(trained.module).cuda(), trained.data, test, trained.cfg, tmp_path, None, True, {})
    assert cuda.keys() == cpu.keys()
    for key, value in cpu.items():
        assert cuda[key] == pytest.approx(value, rel=1e-3), key
    on_gpu = ae_lab.load(trained.run_dir, device="cuda").sample(20, sampler="prior", seed=1)
    np.testing.assert_allclose(on_gpu, ae_lab.load(trained.run_dir).sample(20, sampler="prior", seed=1), atol=1e-4)


@pytest.mark.parametrize("override,key", [
    ("eval.gmm_components=0", "eval.gmm_components"), ("eval.gmm_train_size=0", "eval.gmm_train_size"),
    ("eval.gmm_components=20", "eval.gmm_components"),  # with eval.gmm_train_size=10 below
    ("eval.fd_samples=1", "eval.fd_samples"), ("eval.fd_classifier_hidden=[]", "eval.fd_classifier_hidden"),
    ("eval.fd_classifier_epochs=0", "eval.fd_classifier_epochs")])
def test_bad_sample_quality_settings_are_refused_naming_the_key(override, key, compose_config):
    extra = ["eval.gmm_train_size=10"] if override == "eval.gmm_components=20" else []
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}="):
        validate(compose_config([override, *extra]), (1, 8, 8))
