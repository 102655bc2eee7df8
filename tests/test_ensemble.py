"""Ensembles: averaging members' probabilities, refusing incompatible runs, stratified bootstrap samples."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.ensemble import align_classes, average_probabilities, bootstrap_indices, check_compatible
from headstart.errors import RunError, UsageError


def random_proba(n=7, k=4, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


def test_identical_members_equal_one_member():
    p = random_proba()
    np.testing.assert_allclose(average_probabilities([p, p, p]), p)
    np.testing.assert_allclose(average_probabilities([p]), p)
    np.testing.assert_allclose(average_probabilities([p, p], member_weights=[5, 1]), p)


def test_weights_are_normalised():
    a, b = random_proba(seed=1), random_proba(seed=2)
    np.testing.assert_allclose(average_probabilities([a, b]), (a + b) / 2)
    np.testing.assert_allclose(average_probabilities([a, b], member_weights=[3, 1]), 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(average_probabilities([a, b], member_weights=[0.3, 0.1]), 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(average_probabilities([a, b], member_weights=[0, 2]), b)
    out = average_probabilities([a, b], member_weights=[2, 1])
    np.testing.assert_allclose(out.sum(1), 1.0)
    assert a.shape == (7, 4) and np.isfinite(a).all()  # inputs untouched


@pytest.mark.parametrize("probas, weights, message", [
    ([], None, "at least one"),
    ([random_proba(), random_proba(n=6)], None, r"member 1's probabilities have shape \(6, 4\), member 0's \(7, 4\)"),
    ([random_proba(), random_proba(k=3)], None, "same classes"),
    ([random_proba()[0]], None, "shape"),
    ([random_proba(), random_proba()], [1.0], "one number per member"),
    ([random_proba(), random_proba()], [1.0, -1.0], ">= 0"),
    ([random_proba(), random_proba()], [0.0, 0.0], "not all 0"),
    ([random_proba(), np.full((7, 4), np.nan)], None, "NaN"),
])
def test_bad_inputs_say_what_is_wrong(probas, weights, message):
    with pytest.raises(UsageError, match=message):
        average_probabilities(probas, weights)


def test_single_array_is_not_taken_for_members():
    with pytest.raises(UsageError, match="wrap it in a list"):
        average_probabilities(random_proba())


def test_align_classes_follows_the_run_order_and_fills_absent_classes():
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_array_equal(align_classes(proba, np.array(["b", "a"]), ["a", "b", "c"]),
                                  [[0.1, 0.9, 0.0], [0.8, 0.2, 0.0]])


def test_check_compatible_accepts_equal_lists():
    check_compatible([["ants", "bees"], ["ants", "bees"], ("ants", "bees")], ["a", "b", "c"])


def test_check_compatible_names_runs_and_classes():
    with pytest.raises(RunError) as info:
        check_compatible([["ants", "bees"], ["ants", "bees"], ["ants", "wasps"]], ["runs/a", "runs/b", "runs/c"])
    message = str(info.value)
    assert "'runs/a'" in message and "'runs/c'" in message and "runs/b" not in message
    assert "only in 'runs/a': ['bees']" in message and "only in 'runs/c': ['wasps']" in message
    assert isinstance(info.value, ValueError)  # RunError is also a ValueError


def test_check_compatible_refuses_another_order():
    with pytest.raises(RunError, match="another order"):
        check_compatible([["ants", "bees"], ["bees", "ants"]], ["a", "b"])


def test_check_compatible_usage_errors():
    with pytest.raises(UsageError, match="one name per class list"):
        check_compatible([["a"], ["a"]], ["only-one"])
    with pytest.raises(UsageError, match="at least one member"):
        check_compatible([], [])


def test_bootstrap_keeps_every_class_and_its_size():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 1 + [3] * 10)
    for seed in range(20):
        idx = bootstrap_indices(labels, seed)
        assert idx.shape == labels.shape and idx.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), np.bincount(labels))
    assert len(np.unique(bootstrap_indices(labels, 0))) < len(labels)  # drawn with replacement


def test_bootstrap_is_seeded():
    labels = np.array(["ant", "bee"] * 20)
    np.testing.assert_array_equal(bootstrap_indices(labels, 3), bootstrap_indices(labels, 3))
    assert not np.array_equal(bootstrap_indices(labels, 3), bootstrap_indices(labels, 4))
    assert set(labels[bootstrap_indices(labels, 3)]) == {"ant", "bee"}


@pytest.mark.parametrize("labels, seed, message", [
    (np.array([]), 0, "non-empty"),
    (np.zeros((2, 2)), 0, "1-D"),
    (np.array([0, 1]), -1, "seed"),
    (np.array([0, 1]), 1.5, "seed"),
])
def test_bootstrap_bad_arguments(labels, seed, message):
    with pytest.raises(UsageError, match=message):
        bootstrap_indices(labels, seed)
