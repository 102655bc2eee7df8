"""Temperature scaling: fitting, the prior, cross-fitted scoring, folding into a head."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.calibration import (
    apply_temperature,
    calibrated_losses,
    cross_fitted_losses,
    fit_temperature,
    nll,
    scale_head,
)
from headstart.heads import LinearHead, MLPHead


def timid_and_right(n: int = 300, k: int = 3, accuracy: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < accuracy, y, (y + 1) % k)
    proba = np.full((n, k), 0.25)
    proba[np.arange(n), pred] = 0.5
    return proba / proba.sum(1, keepdims=True), y


def test_a_timid_model_is_sharpened_and_its_loss_drops():
    proba, y = timid_and_right()
    t = fit_temperature(proba, y)
    assert t < 0.6
    raw = nll(np.log(proba), y).mean()
    assert nll(np.log(apply_temperature(proba, t)), y).mean() < raw - 0.2
    assert (apply_temperature(proba, t).argmax(1) == proba.argmax(1)).all()  # no prediction moves


def test_the_prior_keeps_a_mistake_free_model_from_sharpening_to_the_bound():
    y = np.arange(100) % 2
    proba = np.where(np.eye(2)[y] == 1, 0.97, 0.03)  # every prediction right and confident
    assert fit_temperature(proba, y) == pytest.approx(0.25, abs=1e-3)  # no evidence against sharpening
    assert fit_temperature(proba, y, prior=2.0) > 0.5
    timid, yt = timid_and_right()  # hundreds of nats of evidence: the prior barely moves it
    assert fit_temperature(timid, yt, prior=2.0) == pytest.approx(fit_temperature(timid, yt), rel=0.05)


def test_cross_fitted_losses_never_use_an_images_own_temperature():
    proba, y = timid_and_right(accuracy=0.95)
    folds = [(None, np.arange(i, 300, 5)) for i in range(5)]
    crossed = cross_fitted_losses(proba, y, folds)
    in_sample = calibrated_losses(proba, y)
    assert crossed.shape == (300,) and np.isfinite(crossed).all()
    assert crossed.mean() >= in_sample.mean() - 1e-9  # the in-sample temperature is the best for these images
    first = folds[0][1]
    rest = np.setdiff1d(np.arange(300), first)
    t = fit_temperature(proba[rest], y[rest])
    np.testing.assert_allclose(crossed[first], nll(np.log(proba[first]) / t, y[first]))


@pytest.mark.parametrize("head", [LinearHead(), MLPHead(hidden=8, epochs=2)])
def test_scale_head_divides_the_logits(head):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    head.fit(x, y)
    before = head.predict_proba(x)
    after = scale_head(head, 0.5).predict_proba(x)
    np.testing.assert_allclose(after, apply_temperature(before, 0.5), atol=1e-5)
