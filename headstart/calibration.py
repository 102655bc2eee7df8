"""Temperature scaling: one number per model that makes its probabilities honest.

A model's log-loss mixes two things: how well it ranks the classes, and how confident it is. Strong
weight decay gives well-ranked but timid probabilities, label smoothing a timid fine-tuned network,
weak decay an over-confident one. Dividing the logits by a temperature ``T`` (``T < 1`` sharpens,
``T > 1`` softens) repairs the confidence without moving any prediction (the arg-max is unchanged),
so models are compared, and shipped, at their best temperature.

* :func:`fit_temperature` -- the temperature that minimises the log-loss of given probabilities.
* :func:`calibrated_losses` -- per-image log-loss at the temperature fitted on the same images.
* :func:`cross_fitted_losses` -- per-image log-loss, each fold's images at the temperature fitted on
  the other folds: an honest estimate of the calibrated model's log-loss.
* :func:`apply_temperature` / :func:`scale_head` -- use a temperature on probabilities or fold it into
  a fitted head's output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TEMPERATURE_RANGE = 4.0  # temperatures stay within 1/4 .. 4
_EPS = 1e-15


def nll(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row negative log-likelihood of labels ``y`` under ``softmax(logits)``."""
    z = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def fit_temperature(proba: np.ndarray, y: np.ndarray, prior: float = 0.0) -> float:
    """The temperature T (within 1/4 .. 4) that minimises the log-loss of ``softmax(log(proba) / T)``.

    ``prior`` > 0 adds ``prior * log(T)**2`` to the summed log-loss (a log-normal prior centred on
    T = 1): where the images hold hundreds of nats of evidence it barely moves T, but where they hold
    a few (nearly separable classes, every prediction right and confident) it stops the fit from
    sharpening to the bound on the strength of no mistakes seen, the one case where a temperature
    can turn a single future mistake into a catastrophic loss.
    """
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(proba, _EPS, 1.0))
    bound = float(np.log(TEMPERATURE_RANGE))
    res = minimize_scalar(lambda t: float(nll(logp / np.exp(t), y).sum()) + prior * t * t, bounds=(-bound, bound),
                          method="bounded")
    return float(np.exp(res.x))


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(proba) / temperature)``, row by row."""
    z = np.log(np.clip(proba, _EPS, 1.0)) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def calibrated_losses(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image log-loss after the temperature that fits these images best.

    Fitting it on the scored images flatters every model by about the same one parameter. Rows of
    ``proba`` that are NaN (unusable images) stay NaN.
    """
    out = np.full(len(y), np.nan)
    ok = np.flatnonzero(~np.isnan(proba).any(1))
    if len(ok):
        logp = np.log(np.clip(proba[ok], _EPS, 1.0))
        out[ok] = nll(logp / fit_temperature(proba[ok], y[ok]), y[ok])
    return out


def cross_fitted_losses(proba: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, ...]],
                        prior: float = 0.0) -> np.ndarray:
    """Per-image log-loss of out-of-fold ``proba``, each fold's images at the temperature of the other folds.

    No image is scored at a temperature fitted on itself, so the mean is an honest estimate of the
    calibrated model's log-loss (an in-sample temperature would flatter a model whose folds happen
    to hold no confident mistake). ``prior`` as in :func:`fit_temperature`.
    """
    out = np.zeros(len(y))
    everyone = np.arange(len(y))
    for _, te in folds:
        rest = np.setdiff1d(everyone, te)
        t = fit_temperature(proba[rest], y[rest], prior) if len(rest) else 1.0
        out[te] = nll(np.log(np.clip(proba[te], _EPS, 1.0)) / t, y[te])
    return out


def scale_head(head: Any, temperature: float) -> Any:
    """A fitted headstart head (``module_`` ending in a linear layer) with its logits divided by ``temperature``."""
    if temperature != 1.0:
        last = head.module_[-1]
        last.weight.data /= temperature
        last.bias.data /= temperature
    return head
