"""Head selection: honest accuracy (nested CV) against the baseline's recipe, and its speed.

usage:
    python benchmarks/selection.py [DATA ...] [--outer 5] [--outer-seeds 3] [--cache-dir DIR] [--synthetic 5000]
                                   [--skip-nested] [--digits N] [--faces]

DATA defaults to both sets of ../shared/data; --digits N (scikit-learn's digits, N per class) and
--faces (scikit-image's lfw_subset, 100 faces and 100 non-faces) add sets built from images that
installed packages ship (benchmarks/package_sets.py). For each set the features are extracted (or read from
the cache) once; then, on the same outer folds (stratified, identical files grouped; 3 outer splits
shuffled with seeds 0, 1, 2, errors summed: one split's verdict moves with 1-2 images):

  headstart default    select_head over the default grid inside the outer training part (its own
                       inner 5-fold CV), refit the winner, score the outer test part
  baseline recipe      LogisticRegression(C=1) (naive_baseline.py) on the same pooled features
  LogisticRegressionCV scikit-learn's built-in C search (10 Cs, inner 5-fold) on the same features

Speed rows time one default selection beyond the feature extraction (on the real set, and on a
synthetic set of N images x 1280 features x 5 classes) next to scikit-learn's LogisticRegressionCV
on the same features, in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = [SHARED / "data" / "ants_bees_train", SHARED / "data" / "intel_scenes"]


def features(data: Path, cache_dir: str | None) -> tuple[np.ndarray, np.ndarray, list[str], object]:
    """Pooled features, labels, content groups and the backbone's classifier of one data set."""
    from headstart.backbones import create_backbone
    from headstart.cache import FeatureCache
    from headstart.data import load_images
    from headstart.features import extract_features
    from headstart.sources import backbone_classifier

    loaded = load_images(data, val_split=0)
    with FeatureCache(cache_dir) as cache:
        bb = create_backbone("tf_efficientnet_lite0", memo=cache)
        result = extract_features(bb, loaded.train.paths, cache=cache, progress=False)
        paths = [p for p, ok in zip(loaded.train.paths, result.ok) if ok]
        keys, _ = cache.image_keys(paths)
        classifier = backbone_classifier(bb, "default", memo=cache)
    groups = [k or str(p) for k, p in zip(keys, paths)]
    return result.features[result.ok], loaded.train.labels[result.ok], groups, classifier


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1)).mean())


def nested(x: np.ndarray, y: np.ndarray, groups: list[str], classifier: object, outer: int,
           seed: int = 0) -> dict[str, dict]:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    from headstart.selection import fit_candidate, make_folds, select_head

    k = int(y.max()) + 1
    names = {"headstart default": [], "baseline LR(C=1)": [], "LogisticRegressionCV": []}
    proba = {n: np.zeros((len(y), k)) for n in names}
    chosen = []
    for tr, te in make_folds(y, groups, outer, seed=seed):
        sel = select_head(x[tr], y[tr], groups=[groups[i] for i in tr], classifier=classifier, seed=0)
        chosen.append(sel.best.name)
        head = fit_candidate(sel.best, x[tr], y[tr], classifier=classifier, temperature=sel.temperature)
        proba["headstart default"][te] = head.predict_proba(x[te])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            baseline = LogisticRegression(C=1.0, max_iter=2000).fit(x[tr], y[tr])
            proba["baseline LR(C=1)"][te] = baseline.predict_proba(x[te])
            proba["LogisticRegressionCV"][te] = LogisticRegressionCV(Cs=10, cv=5, max_iter=2000).fit(
                x[tr], y[tr]).predict_proba(x[te])
    out = {n: {"accuracy": float((p.argmax(1) == y).mean()), "log_loss": log_loss(p, y),
               "errors": int((p.argmax(1) != y).sum())} for n, p in proba.items()}
    out["headstart default"]["chosen"] = chosen
    return out


def report_nested(x: np.ndarray, y: np.ndarray, groups: list[str], classifier: object, outer: int,
                  seeds: int) -> None:
    """Print the nested CV of each outer split and the errors summed over the splits, with the verdict."""
    print(f"nested {outer}-fold CV (selection inside each outer fold), {seeds} outer split(s), the same for every row:")
    print(f"  {'split':>5} {'recipe':<22} {'accuracy':>8} {'errors':>6} {'log-loss':>8}  chosen per outer fold")
    errors: dict[str, int] = {}
    losses: dict[str, list[float]] = {}
    for seed in range(seeds):
        rows = nested(x, y, groups, classifier, outer, seed)
        for name, r in rows.items():
            errors[name] = errors.get(name, 0) + r["errors"]
            losses.setdefault(name, []).append(r["log_loss"])
            chosen = "  " + ", ".join(r["chosen"]) if "chosen" in r else ""
            print(f"  {seed:>5} {name:<22} {r['accuracy']:>8.4f} {r['errors']:>6} {r['log_loss']:>8.4f}{chosen}")
    n = len(y) * seeds
    for name, e in errors.items():
        print(f"  {'all':>5} {name:<22} {1 - e / n:>8.4f} {e:>6} {np.mean(losses[name]):>8.4f}")
    best_ref = min(errors["baseline LR(C=1)"], errors["LogisticRegressionCV"])
    verdict = "meets" if errors["headstart default"] <= best_ref else "MISSES"
    print(f"  headstart default >= both references over {n} held-out predictions: {verdict} "
          f"({errors['headstart default']} errors against {best_ref}; 1 image = {100 / len(y):.2f} points)")


def timing(x: np.ndarray, y: np.ndarray, groups: list[str] | None, classifier: object) -> tuple[float, float, int]:
    from sklearn.linear_model import LogisticRegressionCV

    from headstart.selection import Grid, fit_candidate, select_head

    grid = Grid() if classifier is not None else Grid(source=("pooled",))
    few = np.concatenate([np.flatnonzero(y == c)[:10] for c in np.unique(y)])
    warm = select_head(x[few], y[few], classifier=classifier, grid=Grid(head=("linear",), C=(1.0,)), folds=2)
    fit_candidate(warm.best, x[few], y[few], classifier=classifier)  # one-time imports (torch.optim: ~3.5 s)
    start = time.perf_counter()
    sel = select_head(x, y, groups=groups, classifier=classifier, grid=grid)
    fit_candidate(sel.best, x, y, classifier=classifier, temperature=sel.temperature)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LogisticRegressionCV(Cs=7, cv=5, max_iter=2000).fit(x, y)
    return ours, time.perf_counter() - start, len(sel.leaderboard)


def synthetic(n: int, d: int = 1280, k: int = 5, seed: int = 0, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative, correlated features with class structure, like pooled CNN features.

    ``spread`` is the within-class spread of the latent factors: 1.5 gives nearly separable classes
    (the slowest case for any iterative solver), 3 about the 85-90% accuracy of the shared photo sets.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    basis = rng.normal(size=(64, d)) / 8
    centres = rng.normal(size=(k, 64))
    latent = centres[y] + rng.normal(size=(n, 64)) * spread
    x = np.maximum(latent @ basis + rng.normal(size=(n, d)) * 0.3, 0).astype(np.float32)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--outer", type=int, default=5, help="outer folds of the nested CV (default 5)")
    parser.add_argument("--outer-seeds", type=int, default=3,
                        help="outer splits (shuffled with seeds 0, 1, ...) whose errors are summed (default 3)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: headstart's)")
    parser.add_argument("--synthetic", type=int, default=5000, help="images of the synthetic timing set (0 = skip)")
    parser.add_argument("--skip-nested", action="store_true", help="timing only")
    parser.add_argument("--digits", type=int, default=0, metavar="N",
                        help="also scikit-learn's digits, N per class (default 0: off)")
    parser.add_argument("--faces", action="store_true", help="also scikit-image's lfw_subset faces / non-faces")
    args = parser.parse_args()
    for data in args.data:
        if not data.is_dir():
            sys.exit(f"{data} not found: give DATA folders (the shared sets live in ../shared/data)")
    if args.digits or args.faces:
        import tempfile

        from package_sets import write_digits, write_faces

        root = Path(tempfile.mkdtemp(prefix="headstart-selection-sets-"))
        args.data += [write_digits(root / "digits", args.digits)] if args.digits else []
        args.data += [write_faces(root / "faces")] if args.faces else []
    for data in args.data:
        x, y, groups, classifier = features(data, args.cache_dir)
        print(f"\n== {data.name}: {len(y)} images, {y.max() + 1} classes, {x.shape[1]} features")
        ours, ref, n_cand = timing(x, y, groups, classifier)
        print(f"speed: default selection ({n_cand} candidates x 5 folds) + refit {ours:.2f}s (target on 245 "
              f"images: <= 3 s); LogisticRegressionCV(7 Cs, 5 folds) {ref:.2f}s; ratio {ours / ref:.2f}x, "
              f"per candidate {ours / n_cand / (ref / 7):.2f}x")
        if args.skip_nested:
            continue
        report_nested(x, y, groups, classifier, args.outer, args.outer_seeds)
    for spread in (1.5, 3.0) if args.synthetic else ():
        x, y = synthetic(args.synthetic, spread=spread)
        ours, ref, n_cand = timing(x, y, None, None)
        print(f"\n== synthetic {len(y)} x {x.shape[1]} x {y.max() + 1} classes, spread {spread} (pooled source only)")
        print(f"speed: default selection ({n_cand} candidates x 5 folds) + refit {ours:.2f}s (target <= 20 s); "
              f"LogisticRegressionCV(7 Cs, 5 folds) {ref:.2f}s; ratio {ours / ref:.2f}x, "
              f"per candidate {ours / n_cand / (ref / 7):.2f}x")


if __name__ == "__main__":
    main()
