"""Heads: the scikit-learn contract, learning, class weights, save/load round trip without pickle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import sklearn.exceptions
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (
    parametrize_with_checks,
)

from headstart.errors import NotFittedError, RunError, UsageError
from headstart.heads import LinearHead, MLPHead, load_head, make_head

HEADS = [LinearHead, lambda: MLPHead(hidden=32)]

# Every head, for scikit-learn's estimator checks: the MLP small enough that the checks take seconds,
# large enough that check_classifiers_train (accuracy > 0.83) and check_class_weight_classifiers pass.
SKLEARN_HEADS = [LinearHead(), MLPHead(hidden=16, epochs=20, lr=1e-2)]

@pytest.fixture
def one_torch_thread():
    """Torch single-threaded for tests that make hundreds of fits on toy data: on a 2-core VM each tiny
    L-BFGS fit took 0.03 s with one thread and up to 1.6 s with two (OpenMP threads waiting on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n=60, d=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = np.repeat(np.arange(k), n // k)
    x = centers[y] + rng.normal(0, 1, (len(y), d))
    return x.astype(np.float32), y


@pytest.mark.parametrize("make", HEADS)
def test_fit_predict_contract(make):
    x, y = blobs()
    head = make()
    assert head.fit(x, y) is head
    assert list(head.classes_) == [0, 1, 2]
    proba = head.predict_proba(x)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    assert head.score(x, y) > 0.9
    assert set(head.predict(x)) <= {0, 1, 2}


@pytest.mark.parametrize("make", HEADS)
def test_string_labels(make):
    x, y = blobs()
    names = np.array(["ant", "bee", "wasp"])[y]
    head = make().fit(x, names)
    assert list(head.classes_) == ["ant", "bee", "wasp"]
    assert head.predict(x[:1])[0] in {"ant", "bee", "wasp"}


@pytest.mark.parametrize("make", HEADS)
@pytest.mark.parametrize("method", ["predict_proba", "predict", "decision_function", "logit_function", "save"])
def test_unfitted_head_says_to_fit(make, method):
    args = () if method == "logit_function" else ("head.safetensors",) if method == "save" else (np.zeros((1, 4)),)
    with pytest.raises(NotFittedError, match="call fit") as info:
        getattr(make(), method)(*args)
    assert isinstance(info.value, sklearn.exceptions.NotFittedError)  # what scikit-learn code catches


def test_init_only_stores_params():
    head = LinearHead(weight_decay=-5)  # no validation before fit, as in scikit-learn
    assert head.get_params()["weight_decay"] == -5
    assert head.get_params(deep=True) == {"weight_decay": -5, "class_weight": None, "standardize": False,
                                          "max_iter": 300}
    with pytest.raises(UsageError, match="weight_decay"):
        head.fit(*blobs())


@pytest.mark.parametrize("bad", [
    (np.zeros((3, 2)), np.array([0, 1])),
    (np.zeros(3), np.array([0, 1, 0])),
    (np.zeros((3, 2)), np.array([1, 1, 1])),
    (np.full((2, 2), np.nan), np.array([0, 1])),
])
def test_bad_inputs(bad):
    with pytest.raises(UsageError):
        LinearHead().fit(*bad)


def test_predict_with_wrong_width():
    head = LinearHead().fit(*blobs())
    with pytest.raises(UsageError, match="X has 5 features, but LinearHead is expecting 16 features"):
        head.predict(np.zeros((2, 5)))


def test_weight_decay_shrinks_weights():
    x, y = blobs()
    small = LinearHead(weight_decay=1e-4).fit(x, y).module_[1].weight.norm()
    large = LinearHead(weight_decay=1.0).fit(x, y).module_[1].weight.norm()
    assert large < small


def test_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(n=90, seed=3)
    ours = LinearHead().fit(x, y).predict_proba(x)  # weight_decay 1/n == sklearn's C=1
    theirs = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


@pytest.mark.parametrize("n, d", [(300, 16), (40, 100)])  # more rows than features (principal axes), fewer (row span)
@pytest.mark.parametrize("standardize", [False, True])
def test_matches_scikit_learn_on_many_and_few_rows(n, d, standardize):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(n=n, d=d, seed=4)
    x = np.abs(x) * np.linspace(0.1, 3, d).astype(np.float32)  # columns of unequal scale, like pooled features
    ref_x = StandardScaler().fit_transform(x) if standardize else x
    ours = LinearHead(standardize=standardize, weight_decay=0.1 / n).fit(x, y).predict_proba(x)
    theirs = LogisticRegression(C=10.0, max_iter=10000, tol=1e-10).fit(ref_x, y).predict_proba(ref_x)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_dict_class_weight_counts_rows_like_repeating_them():
    x, y = blobs(n=90, seed=5)
    weighted = LinearHead(class_weight={0: 3.0}, weight_decay=1e-2).fit(x, y).predict_proba(x)
    repeat = np.r_[np.arange(len(y)), np.repeat(np.flatnonzero(y == 0), 2)]
    repeated = LinearHead(weight_decay=1e-2).fit(x[repeat], y[repeat]).predict_proba(x)
    np.testing.assert_allclose(weighted, repeated, atol=2e-3)


def test_balanced_class_weight_helps_the_rare_class():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (95, 2)), rng.normal(1.5, 1, (5, 2))]).astype(np.float32)
    y = np.array([0] * 95 + [1] * 5)
    plain = LinearHead().fit(x, y).predict(x)
    balanced = LinearHead(class_weight="balanced").fit(x, y).predict(x)
    assert (balanced[y == 1] == 1).sum() > (plain[y == 1] == 1).sum()
    with pytest.raises(UsageError, match="class_weight"):
        LinearHead(class_weight="often").fit(x, y)


def test_mlp_is_seeded():
    x, y = blobs()
    a = MLPHead(epochs=5, hidden=16, seed=1).fit(x, y).predict_proba(x)
    b = MLPHead(epochs=5, hidden=16, seed=1).fit(x, y).predict_proba(x)
    c = MLPHead(epochs=5, hidden=16, seed=2).fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("make", [LinearHead, lambda: LinearHead(standardize=True, class_weight="balanced"),
                                  lambda: MLPHead(epochs=5, hidden=8)])
def test_save_load_round_trip_is_exact(tmp_path, make):
    x, y = blobs()
    head = make().fit(x, np.array(["a", "b", "c"])[y])
    head.save(tmp_path / "head.safetensors")
    meta = json.loads((tmp_path / "head.safetensors.json").read_text())
    assert meta["classes"] == ["a", "b", "c"]
    raw = (tmp_path / "head.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle
    loaded = load_head(tmp_path / "head.safetensors")
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))
    assert list(loaded.classes_) == ["a", "b", "c"]
    assert loaded.get_params() == head.get_params()


def test_pickle_round_trip_of_params():
    head = pickle.loads(pickle.dumps(LinearHead(weight_decay=0.1)))
    assert head.weight_decay == 0.1


def test_load_missing_head(tmp_path):
    with pytest.raises(RunError, match="missing"):
        load_head(tmp_path / "none.safetensors")


def test_make_head():
    assert isinstance(make_head("mlp", hidden=4), MLPHead)
    with pytest.raises(UsageError, match="linear, mlp"):
        make_head("forest")


@pytest.mark.parametrize("make", HEADS)
def test_fit_views(make):
    x, y = blobs()
    rng = np.random.default_rng(1)
    views = np.stack([x, x + rng.normal(0, 0.3, x.shape).astype(np.float32)], axis=1)
    head = make().fit_views(views, y)
    assert head.n_features_in_ == 16 and head.score(x, y) > 0.9
    with pytest.raises(UsageError, match="3-D"):
        make().fit_views(x, y)


def test_linear_fit_views_with_one_view_equals_fit():
    x, y = blobs()
    a = LinearHead().fit(x, y).predict_proba(x)
    b = LinearHead().fit_views(x[:, None, :], y).predict_proba(x)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: LinearHead(standardize=True), lambda: MLPHead(hidden=32)])
def test_prediction_folds_the_standardisation_without_changing_it(make):
    import torch

    x, y = blobs()
    x = x * 50 + 7  # far from standardised, so an unapplied standardisation would show
    head = make().fit(x, y)
    assert not torch.allclose(head.module_[0].scale, torch.ones_like(head.module_[0].scale))
    head.module_.eval()
    with torch.no_grad():
        unfolded = head.module_(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(head.decision_function(x), unfolded, rtol=1e-4, atol=1e-4)


def test_prediction_is_exact_for_a_feature_that_was_constant_in_training():
    import torch

    x, y = blobs(d=16)
    x[:, :8] = 6.0  # e.g. a ReLU6 channel saturated on every image: its scale is clamped to 1e-6
    head = MLPHead(hidden=32).fit(x, y)
    head.module_.eval()
    with torch.no_grad():
        unfolded = head.module_(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(head.decision_function(x), unfolded, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
@parametrize_with_checks(SKLEARN_HEADS)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_binary_decision_function_is_the_score_of_the_second_class():
    import torch

    x, y = blobs(k=2)
    head = LinearHead().fit(x, y)
    logits = head.logit_function()(torch.from_numpy(x)).numpy()
    assert head.decision_function(x).shape == (len(x),)
    np.testing.assert_allclose(head.decision_function(x), logits[:, 1] - logits[:, 0], rtol=1e-6)


@pytest.mark.usefixtures("one_torch_thread")
def test_grid_search_over_weight_decay():
    rng = np.random.default_rng(0)
    x, y = blobs(n=90, seed=1)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:15], np.flatnonzero(y == 2)[:15]])
    x, y = x[keep], y[keep]  # 30/15/15: a head that learns only the biases predicts class 0 everywhere
    x = x + rng.normal(0, 2, x.shape).astype(np.float32)
    grid = GridSearchCV(LinearHead(), {"weight_decay": [1e-3, 1e-1, 1e4]}, cv=3).fit(x, y)
    scores = dict(zip(grid.cv_results_["param_weight_decay"], grid.cv_results_["mean_test_score"], strict=True))
    assert grid.best_params_["weight_decay"] != 1e4
    assert grid.best_score_ > 0.9 and scores[1e4] < 0.6  # 1e4 crushes the weights to ~0
    assert isinstance(grid.best_estimator_, LinearHead)
    assert grid.best_estimator_.weight_decay == grid.best_params_["weight_decay"]
    assert grid.score(x, y) > 0.9


@pytest.mark.parametrize("make", [lambda: LinearHead(weight_decay=0.1, class_weight={0: 2.0}),
                                  lambda: MLPHead(hidden=16, epochs=20, lr=1e-2)])
@pytest.mark.usefixtures("one_torch_thread")
def test_clone_pipeline_and_cross_val_score(make):
    x, y = blobs()
    head = make()
    fitted = make().fit(x, y)
    for copy in (clone(head), clone(fitted)):
        assert type(copy) is type(head) and copy.get_params() == head.get_params()
        assert not hasattr(copy, "module_") and not hasattr(copy, "classes_")
    pipe = Pipeline([("scale", StandardScaler()), ("head", make())]).fit(x * 40 + 3, y)
    assert pipe.score(x * 40 + 3, y) > 0.9
    assert pipe.predict_proba(x[:4] * 40 + 3).shape == (4, 3)
    pipe.set_params(head__weight_decay=0.5)
    assert pipe.get_params(deep=True)["head__weight_decay"] == 0.5 == pipe.named_steps["head"].weight_decay
    assert cross_val_score(pipe, x, y, cv=3).mean() > 0.9


def test_from_layer_wraps_a_trained_classifier_and_round_trips(tmp_path):
    import torch

    layer = torch.nn.Linear(6, 3)
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    head = LinearHead.from_layer(layer, ["a", "b", "c"])
    expected = torch.softmax(layer(torch.from_numpy(x)), 1).detach().numpy()
    np.testing.assert_allclose(head.predict_proba(x), expected, atol=1e-6)
    with torch.no_grad():
        layer.weight.zero_()  # a copy: the source layer may change afterwards
    np.testing.assert_allclose(head.predict_proba(x), expected, atol=1e-6)
    head.save(tmp_path / "h.safetensors")
    loaded = load_head(tmp_path / "h.safetensors")
    assert list(loaded.classes_) == ["a", "b", "c"]
    np.testing.assert_allclose(loaded.predict_proba(x), expected, atol=1e-6)
