"""L2-penalised softmax regression: every cross-validation fold at once along a path of ``C``, or one fit.

:func:`fold_problem` states the folds' problems for one feature source, standardisation and class
weighting; :func:`solve_path` solves them for each ``C`` (scikit-learn's inverse L2 strength, weight
decay ``1/(C n)``), from strong to weak regularisation, each ``C`` warm-started from the last, and
returns every fold's held-out probabilities. All folds share one SciPy L-BFGS-B run whose objective
and gradient are written out in numpy: on these problems autograd and torch's Python L-BFGS cost
20-40x the arithmetic. :func:`fit_softmax` (``LinearHead``'s fit) is the same machinery on one
problem: every training row, no held-out rows, stopping when the objective stops improving.

Two exact changes of variables make the problems small and well conditioned; the L2 penalty is
unchanged by a rotation and the intercept (unpenalised) absorbs any centring:

* fewer training rows than features (:class:`FoldDesigns`): each fold's rows are rotated onto their
  own principal axes; the penalised solution lies in their span, so 1280 features become at most
  the number of rows;
* at least as many rows as features (:class:`SharedRows`): one rotation, the principal axes of all
  rows, serves every fold, and the rows are never copied per fold: one product of all rows with the
  stacked weights of every fold gives every fold's logits, training and held-out rows alike. That
  reads the rows once per evaluation instead of once per fold (4x less memory traffic with 5 folds, which is what
  these thin products are bound by).

Each axis is then scaled by ``1 / sqrt(curvature)`` (a bound of the softmax loss' curvature, 1/4 of
the weighted squared column norm, plus the decay), so L-BFGS sees a well-conditioned problem. The
products with the rows run in float32 (memory-bound), the softmax, objective and optimiser state in
float64: against all-float64 the held-out log-loss moved by < 3e-4 on both shared sets and a
5,000-image synthetic set. A ``C`` stops once every fold's held-out log-loss has moved by less than
:data:`HELD_OUT_TOL` over :data:`CHECK_EVERY` iterations with no held-out prediction changing:
the selection reads nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibration import nll
from .errors import UsageError

ROWS_DTYPE = np.float32  # the products with the rows are memory-bound: float32 halves their time
HELD_OUT_TOL = 3e-4  # a C's solve stops when no fold's held-out log-loss moves more than this ...
CHECK_EVERY = 5  # ... over this many iterations, and at most this share of held-out predictions changes:
CHANGED_PREDICTIONS = 0.003  # none below 334 held-out images
FIT_FTOL = 1e-7  # a single fit stops when an iteration improves the objective by less than this (relative)
ONE_PASS_BLOCK = 1024  # rows per block of a single fit's one-pass objective (50,000 rows: 128 -> 8.0 s, 1024 -> 6.0 s)
PRECONDITION_ROWS = 20_000  # a single fit estimates its preconditioner on at most about this many rows
_EPS = 1e-15
CURVATURE = 0.25  # the softmax loss' curvature per logit is at most this: the preconditioner's bound


def class_weights(y: np.ndarray, n_classes: int, class_weight: Any, classes: np.ndarray) -> np.ndarray:
    """Per-class loss weights for labels ``y`` (indices into ``classes``): ones, ``balanced``, or a dict."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if class_weight is None:
        return np.ones(n_classes)
    if class_weight == "balanced":
        return len(y) / (n_classes * np.maximum(counts, 1))
    if isinstance(class_weight, dict):
        unknown = set(class_weight) - {c.item() if hasattr(c, "item") else c for c in classes}
        if unknown:
            raise UsageError(f"class_weight names unknown classes {sorted(map(str, unknown))}")
        return np.asarray([float(class_weight.get(c.item() if hasattr(c, "item") else c, 1.0)) for c in classes])
    raise UsageError(f"class_weight must be None, 'balanced' or a dict class -> weight; got {class_weight!r}")


def _row_weights(target: np.ndarray, k: int, class_weight: str | None) -> np.ndarray:
    """Each row's weight: its class's weight as the heads compute it."""
    return class_weights(target, k, class_weight, np.arange(k))[target]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@dataclass
class FoldDesigns:
    """Each fold's training rows, centred and rotated onto their own principal axes (few rows)."""

    design: np.ndarray  # (F, m, r) training rows, zero-padded
    onehot: np.ndarray  # (F, m, k)
    sw: np.ndarray  # (F, m) row weights, each fold summing to 1
    held: list[np.ndarray]  # per fold: (n_te, r) held-out clean rows, same axes
    col_sq: np.ndarray  # (F, r) weighted squared column norms (the curvature bound)
    n_images: np.ndarray  # (F,) training images per fold (the decay scales with them)

    def logits(self, w: np.ndarray) -> np.ndarray:
        return (self.design @ w.astype(ROWS_DTYPE)).astype(np.float64)

    def grad(self, g: np.ndarray) -> np.ndarray:
        return (g.astype(ROWS_DTYPE).transpose(0, 2, 1) @ self.design).transpose(0, 2, 1)

    def held_logits(self, w: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        return [h @ w[f] + b[f] for f, h in enumerate(self.held)]


@dataclass
class SharedRows:
    """Every row once, centred; one rotation for all folds; per-fold row weights select the training rows."""

    rows: np.ndarray  # (N, d) every view of every image, centred, float32
    axes: np.ndarray  # (d, r) the rotation (principal axes of all rows), float32
    inv_scale: np.ndarray | None  # (F, d) 1 / the fold's standard deviations (standardised features), or None
    onehot: np.ndarray  # (1, N, k)
    sw: np.ndarray  # (F, N) row weights: zero outside the fold's training rows, each fold summing to 1
    held_rows: list[np.ndarray]  # per fold: indices into rows of the held-out images' clean view
    col_sq: np.ndarray  # (F, r)
    n_images: np.ndarray  # (F,)

    def _weights(self, w: np.ndarray) -> np.ndarray:
        """(d, F*k): each fold's weights on the (centred) rows' own features."""
        n_f, r, k = w.shape
        full = (self.axes @ w.transpose(1, 0, 2).reshape(r, n_f * k).astype(ROWS_DTYPE)).reshape(-1, n_f, k)
        if self.inv_scale is not None:
            full = full * self.inv_scale.T[:, :, None]
        return full.reshape(-1, n_f * k)

    def logits(self, w: np.ndarray) -> np.ndarray:
        n_f, _, k = w.shape
        out = (self.rows @ self._weights(w)).astype(np.float64)  # (N, F*k)
        return out.reshape(len(self.rows), n_f, k).transpose(1, 0, 2)

    def grad(self, g: np.ndarray) -> np.ndarray:
        n_f, n, k = g.shape
        back = (self.rows.T @ g.transpose(1, 0, 2).reshape(n, n_f * k).astype(ROWS_DTYPE)).reshape(-1, n_f, k)
        if self.inv_scale is not None:
            back = back * self.inv_scale.T[:, :, None]
        return (self.axes.T @ back.reshape(-1, n_f * k)).reshape(-1, n_f, k).transpose(1, 0, 2).astype(np.float64)

    def held_logits(self, w: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        weights = self._weights(w).reshape(self.rows.shape[1], len(w), -1)
        return [(self.rows[idx] @ weights[:, f]).astype(np.float64) + b[f] for f, idx in enumerate(self.held_rows)]


def fold_problem(feats: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], standardize: bool,
                 class_weight: str | None, k: int) -> FoldDesigns | SharedRows:
    """The folds' problems on ``feats`` ``(n, views, d)``: train on every view, score the clean one (view 0)."""
    n_views, dim = feats.shape[1], feats.shape[2]
    if min(len(tr) for tr, _ in folds) * n_views >= dim:
        return _shared_rows(feats, y, folds, standardize, class_weight, k)
    return _fold_designs(feats, y, folds, standardize, class_weight, k)


def _fold_stats(feats: np.ndarray, tr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As LinearHead: mean and standard deviation of the training rows, in float32."""
    f32 = feats[tr].reshape(-1, feats.shape[2])
    return f32.mean(0).astype(np.float64), np.maximum(f32.std(0), 1e-6).astype(np.float64)


def _fold_designs(feats: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                  standardize: bool, class_weight: str | None, k: int) -> FoldDesigns:
    n_views, dim = feats.shape[1], feats.shape[2]
    train_rows, held, weights = [], [], []
    for tr, te in folds:
        rows = feats[tr].reshape(-1, dim).astype(np.float64)
        out = feats[te, 0].astype(np.float64)
        if standardize:
            mean, scale = _fold_stats(feats, tr)
            rows, out = (rows - mean) / scale, (out - mean) / scale
        centre = rows.mean(0)
        rows, out = rows - centre, out - centre
        axes, projected = _row_span(rows)
        train_rows.append(projected)
        held.append(out @ axes)
        weights.append(_row_weights(np.repeat(y[tr], n_views), k, class_weight))
    m = max(len(r) for r in train_rows)
    r = max(t.shape[1] for t in train_rows)
    design = np.zeros((len(folds), m, r), dtype=ROWS_DTYPE)
    onehot = np.zeros((len(folds), m, k))
    sw = np.zeros((len(folds), m))
    for f, (tr, _) in enumerate(folds):
        rows = train_rows[f]
        design[f, :len(rows), :rows.shape[1]] = rows
        onehot[f, np.arange(len(rows)), np.repeat(y[tr], n_views)] = 1.0
        sw[f, :len(rows)] = weights[f]
    sw /= sw.sum(1, keepdims=True)
    return FoldDesigns(design, onehot, sw, [np.pad(h, ((0, 0), (0, r - h.shape[1]))) for h in held],
                       np.einsum("fm,fmr->fr", sw, design.astype(np.float64) ** 2),
                       np.asarray([len(tr) for tr, _ in folds], dtype=np.float64))


def _row_span(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal axes ``(d, r)`` of the rows' span and the rows in them ``(m, r)``, for m << d.

    From the eigenvectors of the small Gram matrix ``rows @ rows.T`` (m x m) rather than an SVD of the
    wide rows: the same span at a fraction of the cost. Directions whose variance is below 1e-12 of
    the largest carry no signal a head could use and are dropped.
    """
    eigval, u = np.linalg.eigh(rows @ rows.T)
    keep = eigval > eigval.max() * 1e-12
    s = np.sqrt(eigval[keep])
    axes = (rows.T @ u[:, keep]) / s
    return axes, u[:, keep] * s


def _shared_rows(feats: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                 standardize: bool, class_weight: str | None, k: int) -> SharedRows:
    n, n_views, dim = feats.shape
    rows = feats.reshape(-1, dim)
    centre = rows.mean(0, dtype=np.float64)
    rows = (rows - centre).astype(ROWS_DTYPE)
    inv_scale = None
    if standardize:
        inv_scale = np.stack([1.0 / _fold_stats(feats, tr)[1] for tr, _ in folds]).astype(ROWS_DTYPE)
        spread = 1.0 / inv_scale.mean(0)
    else:
        spread = np.ones(dim)
    cov = (rows.T @ rows).astype(np.float64) / len(rows) / np.outer(spread, spread)
    eigval, eigvec = np.linalg.eigh(cov)
    # axes with no variance carry no solution when every fold sees the same rows; with per-fold
    # standardisation a non-axis-aligned null direction (e.g. logits, a linear map of pooled) moves
    # with the fold's scaling, so every axis is kept to stay exact
    keep = eigval > eigval.max() * 1e-12 if inv_scale is None else np.ones(len(eigval), dtype=bool)
    image_of_row = np.repeat(np.arange(n), n_views)
    sw = np.zeros((len(folds), len(rows)))
    for f, (tr, _) in enumerate(folds):
        in_fold = np.isin(image_of_row, tr)
        sw[f, in_fold] = _row_weights(y[image_of_row[in_fold]], k, class_weight)
    sw /= sw.sum(1, keepdims=True)
    # the curvature of each axis, from all rows: a preconditioner only, so an estimate is enough
    col_sq = np.broadcast_to(np.maximum(eigval[keep], 0.0), (len(folds), int(keep.sum()))).copy()
    return SharedRows(rows, eigvec[:, keep].astype(ROWS_DTYPE), inv_scale,
                      np.eye(k)[y[image_of_row]][None], sw, [te * n_views for _, te in folds], col_sq,
                      np.asarray([len(tr) for tr, _ in folds], dtype=np.float64))


class _HeldOutSettled:
    """L-BFGS-B callback: stop once the held-out log-loss of every fold has settled (see module docstring)."""

    def __init__(self, problem: FoldDesigns | SharedRows, y_held: list[np.ndarray], shape: tuple[int, int, int],
                 scale: np.ndarray) -> None:
        self.problem, self.y_held, self.shape, self.scale = problem, y_held, shape, scale
        self.iteration, self.last = 0, None

    def __call__(self, intermediate_result: object) -> None:
        self.iteration += 1
        if self.iteration % CHECK_EVERY:
            return
        n_f, r, k = self.shape
        x = intermediate_result.x  # type: ignore[attr-defined]
        w = x[:n_f * r * k].reshape(n_f, r, k) * self.scale
        logits = self.problem.held_logits(w, x[n_f * r * k:].reshape(n_f, 1, k))
        losses = np.asarray([nll(z, yy).mean() for z, yy in zip(logits, self.y_held)])
        preds = [z.argmax(1) for z in logits]
        last, self.last = self.last, (losses, preds)
        if last is not None and np.abs(losses - last[0]).max() < HELD_OUT_TOL and all(
                (a != b).sum() <= CHANGED_PREDICTIONS * len(a) for a, b in zip(preds, last[1])):
            raise StopIteration


def _objective(problem: FoldDesigns | SharedRows, decay: np.ndarray, scale: np.ndarray) -> Any:
    """The penalised weighted softmax loss of every fold and its gradient, in the scaled variables ``theta``."""
    onehot, sw = problem.onehot, problem.sw
    n_f, r = problem.col_sq.shape
    k = onehot.shape[2]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[:n_f * r * k].reshape(n_f, r, k) * scale
        logits = problem.logits(w) + theta[n_f * r * k:].reshape(n_f, 1, k)
        logits -= logits.max(2, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(2, keepdims=True))
        g = (np.exp(logp) - onehot) * sw[..., None]  # d loss / d logits
        value = -float(((logp * onehot).sum(2) * sw).sum()) + 0.5 * float((decay * w**2).sum())
        grad_w = (problem.grad(g) + decay * w) * scale
        return value, np.concatenate([grad_w.ravel(), g.sum(1).ravel()])

    return objective


def _one_pass_objective(problem: SharedRows, decay: np.ndarray, scale: np.ndarray) -> Any:
    """:func:`_objective` for one problem on many rows, reading them once per evaluation instead of twice.

    Block by block, the logits, the loss and the gradient's product with the rows are made while the
    block is still in the CPU's cache: a 50,000 x 1280 fit (71 iterations) took 6.0 s instead of 7.5 s.
    """
    rows, axes, onehot, sw = problem.rows, problem.axes, problem.onehot[0], problem.sw[0]
    r, k = problem.col_sq.shape[1], onehot.shape[1]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[:r * k].reshape(1, r, k) * scale
        weights, bias = problem._weights(w), theta[r * k:]
        value = 0.5 * float((decay * w**2).sum())
        back, grad_b = np.zeros((rows.shape[1], k)), np.zeros(k)
        for start in range(0, len(rows), ONE_PASS_BLOCK):
            block, part = rows[start:start + ONE_PASS_BLOCK], slice(start, start + ONE_PASS_BLOCK)
            logits = (block @ weights).astype(np.float64) + bias
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            value -= float(((logp * onehot[part]).sum(1) * sw[part]).sum())
            g = (np.exp(logp) - onehot[part]) * sw[part, None]
            back += block.T @ g.astype(ROWS_DTYPE)
            grad_b += g.sum(0)
        grad_w = ((axes.T @ back.astype(ROWS_DTYPE)).astype(np.float64)[None] + decay * w) * scale
        return value, np.concatenate([grad_w.ravel(), grad_b])

    return objective


def _minimize(problem: FoldDesigns | SharedRows, decay: np.ndarray, weight: np.ndarray, bias: np.ndarray,
              callback: Any, options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Solve every fold at weight decay ``decay`` ``(F, 1, 1)``, from ``weight``, ``bias``: returns them, iterations.

    ``callback(scale)`` makes the L-BFGS-B callback (or returns None); ``scale`` is each axis'
    ``1 / sqrt(curvature bound)``.
    """
    from scipy.optimize import minimize

    n_f, r, k = weight.shape
    scale = 1.0 / np.sqrt(CURVATURE * problem.col_sq[:, :, None] + decay + _EPS)  # (F, r, 1)
    theta0 = np.concatenate([(weight / scale).ravel(), bias.ravel()])
    one_pass = isinstance(problem, SharedRows) and n_f == 1 and problem.inv_scale is None
    objective = (_one_pass_objective if one_pass else _objective)(problem, decay, scale)
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                   callback=callback(scale), options=options)
    return res.x[:n_f * r * k].reshape(n_f, r, k) * scale, res.x[n_f * r * k:].reshape(n_f, 1, k), int(res.nit)


def solve_path(problem: FoldDesigns | SharedRows, cs: Sequence[float], k: int,
               y_held: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Held-out probabilities ``[c][fold]`` along the C path (``y_held``: each fold's held-out labels)."""
    n_f, r = problem.col_sq.shape
    weight, bias = np.zeros((n_f, r, k)), np.zeros((n_f, 1, k))
    out = []
    for c in cs:
        decay = (1.0 / (c * problem.n_images))[:, None, None]
        weight, bias, _ = _minimize(problem, decay, weight, bias,
                                    lambda scale: _HeldOutSettled(problem, y_held, (n_f, r, k), scale),
                                    {"maxiter": 1000, "gtol": 1e-6, "ftol": 1e-10, "maxcor": 10})
        out.append([_softmax(z) for z in problem.held_logits(weight, bias)])
    return out


def single_problem(rows: np.ndarray, target: np.ndarray, row_weight: np.ndarray, k: int,
                   n_images: int) -> tuple[FoldDesigns | SharedRows, np.ndarray]:
    """One problem on every row ``(m, d)`` (already centred; float32): the folds' machinery with a single fold.

    Few rows: rotated onto their own span. Many: the principal axes of the rows; their covariance
    is estimated on at most :data:`PRECONDITION_ROWS` rows (a preconditioner only: every axis is
    kept, so the solution is exact whatever the estimate).
    """
    m, dim = rows.shape
    onehot = np.eye(k)[target][None]
    sw = (row_weight / row_weight.sum())[None]
    n = np.asarray([float(n_images)])
    if m < dim:
        axes, design = _row_span(rows.astype(np.float64))
        return FoldDesigns(design.astype(ROWS_DTYPE)[None], onehot, sw, [], np.einsum(
            "m,mr->r", sw[0], design**2)[None], n), axes
    sample = rows[:: max(1, m // PRECONDITION_ROWS)]
    eigval, eigvec = np.linalg.eigh((sample.T @ sample).astype(np.float64) / len(sample))
    axes = eigvec.astype(ROWS_DTYPE)
    curvature = np.maximum(eigval, eigval.max() * 1e-9)  # an axis without variance keeps a bounded scale
    return SharedRows(rows, axes, None, onehot, sw, [], curvature[None], n), axes


def fit_softmax(x: np.ndarray, target: np.ndarray, row_weight: np.ndarray, k: int, decay: float, n_images: int,
                max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Weights ``(d, k)`` and bias ``(k,)`` minimising the weighted mean softmax loss + ``decay/2 ||W||^2``.

    ``x`` ``(m, d)`` float32, ``target`` class indices, ``row_weight`` each row's weight. L-BFGS-B in
    the scaled principal axes (see the module docstring) stops when an iteration improves the
    objective by less than :data:`FIT_FTOL` of its value (or after ``max_iter`` iterations).
    """
    centre = x.mean(0, dtype=np.float64)
    rows = (x - centre.astype(x.dtype)).astype(ROWS_DTYPE, copy=False)
    problem, axes = single_problem(rows, target, row_weight, k, n_images)
    r = problem.col_sq.shape[1]
    options = {"maxiter": max_iter, "gtol": 1e-8, "ftol": FIT_FTOL, "maxcor": 10}
    with _optimizer_blas_single_thread() if rows.size >= 1_000_000 else nullcontext():  # 4 ms: only for big fits
        w, b, n_iter = _minimize(problem, np.full((1, 1, 1), float(decay)), np.zeros((1, r, k)), np.zeros((1, 1, k)),
                                 lambda scale: None, options)
    weight = axes.astype(np.float64) @ w[0]
    return weight, b[0, 0] - centre @ weight, n_iter


def _optimizer_blas_single_thread() -> Any:
    """Limit SciPy's own BLAS (the one its L-BFGS-B calls) to one thread; numpy's products keep theirs.

    numpy and SciPy wheels each bundle an OpenBLAS. With both at 2 threads on 2 cores, L-BFGS-B's
    tiny vector operations wake threads that fight numpy's still-spinning ones: a 50,000-row fit took
    9.1 s; with SciPy's copy on one thread, 5.2 s. Where the two share one BLAS, nothing is limited.
    """
    from pathlib import Path

    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    own = [lib["filepath"] for lib in controller.info()
           if lib["user_api"] == "blas" and Path(lib["filepath"]).parent.name.startswith("scipy")]
    return controller.select(filepath=own).limit(limits=1) if own else nullcontext()
