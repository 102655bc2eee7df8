"""Classification metrics shared by train (validation), evaluate and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                           top_k: int = 5) -> dict[str, Any]:
    """Accuracy, top-k accuracy, per-class precision/recall/F1/support and the confusion matrix.

    Args:
        y_true: integer labels ``(n,)`` into ``class_names``.
        proba: probabilities ``(n, len(class_names))``.

    Returns:
        A JSON-ready dict. ``confusion_matrix[i][j]`` counts images of class ``i`` predicted as ``j``.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    k = len(class_names)
    pred = proba.argmax(1) if len(proba) else np.zeros(0, dtype=np.int64)
    labels = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, pred, labels=labels, zero_division=0)
    top = min(top_k, k)
    ranked = np.argsort(-proba, axis=1)[:, :top] if len(proba) else np.zeros((0, top), dtype=np.int64)
    return {
        "accuracy": float((pred == y_true).mean()) if len(y_true) else float("nan"),
        f"top{top}_accuracy": float((ranked == y_true[:, None]).any(1).mean()) if len(y_true) else float("nan"),
        "n_images": len(y_true),
        "class_names": list(class_names),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
