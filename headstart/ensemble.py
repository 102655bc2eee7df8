"""Ensembles: several runs (members) whose class probabilities are averaged into one prediction.

Members differ in seed and bootstrap sample (:func:`bootstrap_indices`), or in backbone. They must
predict the same classes in the same order (:func:`check_compatible`); their probabilities are then
averaged, optionally weighted (:func:`average_probabilities`). A head's probability columns follow its
own classes; :func:`align_classes` puts them in a run's class order.

Example:
    >>> check_compatible([run_a.class_names, run_b.class_names], ["run_a", "run_b"])  # doctest: +SKIP
    >>> proba = average_probabilities([proba_a, proba_b], member_weights=[2, 1])           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import RunError, UsageError


def average_probabilities(probas: Sequence[np.ndarray],
                          member_weights: Sequence[float] | None = None) -> np.ndarray:
    """The (weighted) mean of the members' class probabilities.

    Args:
        probas: one ``(n, k)`` array per member, columns in the same class order.
        member_weights: one non-negative weight per member (normalised to sum to 1); ``None`` = equal weights.

    Returns:
        ``(n, k)`` float64 probabilities.

    Example:
        >>> average_probabilities([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])], member_weights=[3, 1])
        array([[0.75, 0.25]])
    """
    if isinstance(probas, np.ndarray) and probas.ndim == 2:
        raise UsageError("probas must be a sequence of (n, k) arrays, one per member; got a single 2-D array "
                         "(wrap it in a list)")
    arrays = [np.asarray(p, dtype=np.float64) for p in probas]
    if not arrays:
        raise UsageError("average_probabilities needs at least one member's probabilities; got none")
    for i, p in enumerate(arrays):
        if p.ndim != 2:
            raise UsageError(f"member {i}'s probabilities must have shape (n_images, n_classes); got {p.shape}")
        if p.shape != arrays[0].shape:
            raise UsageError(f"member {i}'s probabilities have shape {p.shape}, member 0's {arrays[0].shape}; "
                             "every member must score the same images over the same classes")
        if not np.isfinite(p).all():
            raise UsageError(f"member {i}'s probabilities have NaN or infinite values")
    if member_weights is None:
        w = np.full(len(arrays), 1.0 / len(arrays))
    else:
        w = np.asarray(member_weights, dtype=np.float64)
        if w.shape != (len(arrays),):
            raise UsageError(f"member_weights must have one number per member ({len(arrays)}); got {len(w.ravel())}")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise UsageError(f"member_weights must be finite, >= 0 and not all 0; got {w.tolist()}")
        w = w / w.sum()
    return np.tensordot(w, np.stack(arrays), axes=1)


def align_classes(proba: np.ndarray, head_classes: Sequence[object], class_names: Sequence[str]) -> np.ndarray:
    """Columns of ``proba`` (ordered as ``head_classes``) rearranged to ``class_names``; absent classes get 0.

    Example:
        >>> align_classes(np.array([[0.9, 0.1]]), ["b", "a"], ["a", "b", "c"])
        array([[0.1, 0.9, 0. ]])
    """
    out = np.zeros((len(proba), len(class_names)))
    position = {str(c): i for i, c in enumerate(head_classes)}
    for j, name in enumerate(class_names):
        if name in position:
            out[:, j] = proba[:, position[name]]
    return out


def check_compatible(class_lists: Sequence[Sequence[str]], names: Sequence[str]) -> None:
    """Refuse members that do not predict the same classes in the same order.

    Args:
        class_lists: each member's class names, in its probability column order.
        names: each member's name (e.g. its run folder), for the message.

    Raises:
        RunError: naming the first member that differs from the first one and the classes that differ.
        UsageError: no members, or not one name per class list.
    """
    if len(class_lists) != len(names):
        raise UsageError(f"check_compatible needs one name per class list; got {len(class_lists)} class lists "
                         f"and {len(names)} names")
    if not class_lists:
        raise UsageError("an ensemble needs at least one member")
    reference = [str(c) for c in class_lists[0]]
    for name, classes in zip(names[1:], class_lists[1:]):
        classes = [str(c) for c in classes]
        if classes == reference:
            continue
        only_first = [c for c in reference if c not in set(classes)]
        only_other = [c for c in classes if c not in set(reference)]
        if only_first or only_other:
            detail = f"only in '{names[0]}': {only_first}; only in '{name}': {only_other}"
        else:
            detail = f"same classes in another order: '{names[0]}' has {reference}, '{name}' has {classes}"
        raise RunError(f"cannot ensemble '{names[0]}' and '{name}': their class lists differ ({detail}); "
                       "members must be trained on the same classes")


def bootstrap_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """A stratified bootstrap sample: each class's images drawn with replacement, as many as it has.

    Every class keeps its size, so every class keeps at least one image; the sample depends only on
    ``labels`` and ``seed``.

    Args:
        labels: ``(n,)`` class labels (integers or strings).
        seed: seed of the draw; members of an ensemble use different seeds.

    Returns:
        ``(n,)`` int64 indices into ``labels`` (with repeats), sorted.

    Example:
        >>> bootstrap_indices(np.array([0, 0, 1]), seed=0).shape
        (3,)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise UsageError(f"labels must be a non-empty 1-D array; got shape {labels.shape}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be an integer >= 0; got {seed!r}")
    rng = np.random.default_rng(int(seed))
    _, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(inverse.max() + 1)]
    return np.sort(np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members]))
