"""Heads at scale: one linear fit and the default selection on 50,000 cached feature rows, next to scikit-learn.

usage:
    python benchmarks/head.py [--n 50000] [--classes 10] [--skip-selection]

Synthetic features shaped like pooled CNN features (``benchmarks/selection.py``'s generator: non-negative,
correlated, class structure with the spread of the shared photo sets), ``n`` training rows x 1280, and
10,000 validation rows from the same distribution. Rows, in one run:

  linear fit          headstart's LinearHead (L-BFGS, weight decay 1/n = scikit-learn's C=1)
  LogisticRegression  scikit-learn's, C=1, lbfgs, max_iter=1000, the same rows
  selection + refit   headstart's default selection (select_head: 7 Cs, 5 folds, MLPs raced) and the refit
                      of the winner on every row (fit_candidate)

Each prints seconds and the validation log-loss. Targets (issue 12): one linear fit <= 2 s, selection +
fit <= 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from selection import synthetic


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="training rows (default 50,000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--skip-selection", action="store_true", help="only the single fits")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    from headstart.heads import LinearHead
    from headstart.selection import fit_candidate, format_leaderboard, select_head

    x_all, y_all = synthetic(args.n + 10_000, k=args.classes, spread=3.0)
    x, y, xv, yv = x_all[:args.n], y_all[:args.n], x_all[args.n:], y_all[args.n:]
    print(f"{args.n} x {x.shape[1]} training rows, {args.classes} classes; {len(yv)} validation rows")
    rows = []
    start = time.perf_counter()
    head = LinearHead().fit(x, y)
    rows.append(("linear fit (headstart)", time.perf_counter() - start, log_loss(head.predict_proba(xv), yv)))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    rows.append(("LogisticRegression (sklearn)", time.perf_counter() - start, log_loss(ref.predict_proba(xv), yv)))
    if not args.skip_selection:
        start = time.perf_counter()
        sel = select_head(x, y)
        selected = time.perf_counter()
        best = fit_candidate(sel.best, x, y, temperature=sel.temperature)
        rows.append((f"selection + refit ({sel.best.name})", time.perf_counter() - start,
                     log_loss(best.predict_proba(xv), yv)))
        refit = time.perf_counter() - selected
        print(f"selection {selected - start:.1f} s ({'; '.join(sel.notes)}), refit {refit:.1f} s")
        print(format_leaderboard(sel.leaderboard, 5))
    print(f"\n  {'row':<48} {'seconds':>8} {'val log-loss':>12}")
    for name, seconds, loss in rows:
        print(f"  {name:<48} {seconds:>8.2f} {loss:>12.4f}")
    fit, sk = rows[0][1], rows[1][1]
    print(f"\n  one linear fit: {fit:.2f} s ({fit / sk:.2f}x scikit-learn; target <= 2 s: "
          f"{'met' if fit <= 2 else 'MISSED'})")
    if len(rows) > 2:
        print(f"  selection + refit: {rows[2][1]:.1f} s (target <= 30 s: {'met' if rows[2][1] <= 30 else 'MISSED'})")


if __name__ == "__main__":
    main()
