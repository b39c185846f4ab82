"""`ae_lab.sklearn.AutoencoderTransformer`: scikit-learn's own estimator checks, cross_val_score, a
Pipeline and GridSearchCV, each fit a real ae_lab run."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from ae_lab.sklearn import AutoencoderTransformer

# the smallest real training: two batches of one epoch, no W&B record, cheap evaluation
TINY = dict(logger="none", trainer="debug", eval="minimal", loss__recon="mse", model__output="linear",
            model__hidden_dims=[4], model__latent_dim=2)


@parametrize_with_checks([AutoencoderTransformer(**TINY)])
def test_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """400 of scikit-learn's digits as rows of 64 counts 0..16, and their classes."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X[:400], y[:400]


# digits rows: counts 0..16, scaled to [0, 1] by dataset.normalize=minmax for the Bernoulli loss
DIGITS = dict(logger="none", trainer="debug", eval="minimal", dataset__normalize="minmax",
              model__hidden_dims=[32], model__latent_dim=8)


def test_fit_writes_the_run_the_command_line_writes_and_the_methods_are_the_loaded_models(digits, tmp_path,
                                                                                          read_json,
                                                                                          train_in_process):
    import ae_lab

    X, _ = digits
    transformer = AutoencoderTransformer(output_dir=tmp_path / "fits", **DIGITS).fit(X)
    run_dir = transformer.run_dir_
    assert run_dir.parent == tmp_path / "fits" and read_json(run_dir / "run.json")["status"] == "completed"
    np.testing.assert_array_equal(np.load(run_dir / "inputs.npy"), X.astype(np.float32))
    # the same overrides through the command line's composition train the same model
    overrides = ["dataset=array", f"dataset.path={run_dir / 'inputs.npy'}", "logger=none", "trainer=debug",
                 "eval=minimal", "dataset.normalize=minmax", "model.hidden_dims=[32]", "model.latent_dim=8"]
    assert train_in_process(overrides, tmp_path / "cli") == read_json(run_dir / "metrics.json")
    model = ae_lab.load(run_dir)
    codes = transformer.transform(X)
    assert codes.shape == (400, 8) and codes.dtype == np.float32
    np.testing.assert_array_equal(codes, model.encode(X.astype(np.float32)))
    np.testing.assert_array_equal(transformer.inverse_transform(codes), model.decode(codes))
    np.testing.assert_array_equal(transformer.score_samples(X), -model.score(X.astype(np.float32)))
    assert transformer.inverse_transform(codes).max() > 1.5  # in the counts' units, not [0, 1]
    assert list(transformer.get_feature_names_out()) == [f"autoencodertransformer{i}" for i in range(8)]


def test_features_for_a_classifier_in_a_pipeline_with_cross_val_score(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline

    X, y = digits
    pipeline = make_pipeline(AutoencoderTransformer(**DIGITS), LogisticRegression(max_iter=500))
    accuracy = cross_val_score(pipeline, X, y, cv=2)
    assert accuracy.shape == (2,) and accuracy.min() > 0.3  # chance is 0.1


def test_set_params_reaches_the_overrides_through_a_pipeline_as_grid_search_sets_them():
    """GridSearchCV clones the pipeline and sets each candidate's parameters (the fits themselves are
    those of cross_val_score above)."""
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import ParameterGrid
    from sklearn.pipeline import Pipeline

    pipeline = Pipeline([("ae", AutoencoderTransformer(**DIGITS)), ("classify", LogisticRegression())])
    for candidate in ParameterGrid({"ae__model__latent_dim": [2, 6], "ae__trainer__max_epochs": [3]}):
        copied = clone(pipeline).set_params(**candidate).named_steps["ae"]
        assert copied.get_params()["model__latent_dim"] == candidate["ae__model__latent_dim"]
        assert copied._config_overrides()[-2:] == [f"model.latent_dim={candidate['ae__model__latent_dim']}",
                                                   "trainer.max_epochs=3"]
    assert pipeline.named_steps["ae"].get_params()["model__latent_dim"] == 8  # the original is untouched


def test_a_pickle_carries_the_model_when_its_run_folder_is_gone(digits):
    X, _ = digits
    transformer = AutoencoderTransformer(**TINY).fit(X[:60])
    saved = pickle.dumps(transformer)
    shutil.rmtree(transformer.run_dir_)
    restored = pickle.loads(saved)
    assert restored.run_dir_ != transformer.run_dir_
    np.testing.assert_array_equal(restored.transform(X[:60]), transformer.transform(X[:60]))


@pytest.mark.parametrize("overrides,message", [({"dataset": "mnist"}, "dataset cannot be set"),
                                               ({"model__latnt_dim": 4}, "model.latnt_dim is not a key of model"),
                                               ({"loss__recon": "bce", "model__output": "sigmoid"},
                                                "loss.recon='bce' is not allowed")])
def test_a_bad_override_is_refused_in_one_line_and_leaves_no_run(digits, tmp_path, overrides, message):
    X, _ = digits
    with pytest.raises(ValueError, match=message) as refused:
        AutoencoderTransformer(output_dir=tmp_path, **{**TINY, **overrides}).fit(X[:60] * 10)
    assert len(str(refused.value).splitlines()) == 1 and list(tmp_path.iterdir()) == []
