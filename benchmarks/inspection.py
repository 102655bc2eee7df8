"""How well `headstart inspect` finds label errors and near-duplicates, next to cleanlab and a naive rule.

On ants/bees and intel_scenes (../shared/data), the labels of 5% and 10% of the images are flipped
(seeded; $INSPECT_SEEDS seeds, default 4) to another class; the out-of-fold probabilities of the
selected head on the noisy labels are computed once per seed, and three rules flag images from them:

* headstart: confident learning as `headstart inspect` runs it (headstart/inspection/confident.py);
* cleanlab: `cleanlab.filter.find_label_issues` on the same probabilities (cleanlab is AGPL-3.0: a
  peer here only, installed into the benchmark's environment with `pip install cleanlab`, never a
  dependency of headstart);
* lowest self-confidence: the k images with the lowest probability of their given label, k = the
  number flipped (an oracle for the count, so it is a strong naive rule).

Printed: precision and recall of each flagged set against the flipped set, mean and lowest over the
seeds, on every image ('as given') and again without the images that confident learning already flags on
the set's own labels ('pre-cleaned'): intel_scenes holds about 20 such images (a forest filed as glacier,
glacier/mountain scenes either label fits), and every rule that finds them loses precision against the
flipped set for it.

Then the near-duplicate threshold: copies of 30 images, mildly (resized to 85-100%, JPEG quality
80-95) and strongly (50-90%, quality 50-90) edited, against every pair of distinct images: the copies'
similarities and the highest distinct one (the threshold must stay above it on both sets: no false
pairs). Last, seconds for `inspect`'s work after extraction (features cached) on 245 images and on
5,000 (intel_scenes rows repeated with noise), and the neighbour pass alone on $INSPECT_NEIGHBOURS
random rows (default 20,000; 100,000 takes about 2 minutes).

    python benchmarks/inspection.py

(Not ``inspect.py``: Python puts a script's folder first on ``sys.path``, so a file of that name would
replace the standard library's ``inspect`` for every script in this folder.)
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.inspection.confident import find_label_issues
from headstart.inspection.findings import (
    NEAR_DUPLICATE,
    THUMBNAIL_FEATURE_FLOOR,
    THUMBNAIL_NEAR,
    Inspected,
    _load,
    classes,
    label_issues,
    out_of_fold,
    similar,
)
from headstart.inspection.neighbours import normalise
from headstart.inspection.thumbnails import thumbnail
from headstart.selection import Grid, select_head

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ["ants_bees_train", "intel_scenes"]


def flip(y: np.ndarray, fraction: float, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + rng.integers(1, k, size=len(chosen))) % k
    return noisy, chosen


def oof(seen: Inspected, y: np.ndarray) -> np.ndarray:
    from headstart.backbones import create_backbone
    from headstart.selection import grid_with_classifier

    bb = create_backbone("tf_efficientnet_lite0", "default")
    grid, classifier, _ = grid_with_classifier({}, bb, "default")
    return select_head(seen.features, y, grid=replace(grid, max_images=None), groups=seen.keys,
                       classifier=classifier).oof_proba


SEEDS = int(os.environ.get("INSPECT_SEEDS", "4"))


def subset(seen: Inspected, keep: np.ndarray) -> Inspected:
    """The images ``keep`` of ``seen`` (out-of-fold probabilities left empty: they are recomputed)."""
    pick = keep.tolist()
    return replace(seen, paths=[seen.paths[i] for i in pick], labels=seen.labels[keep],
                   split=[seen.split[i] for i in pick], keys=[seen.keys[i] for i in pick],
                   features=seen.features[keep], oof=np.zeros((len(keep), len(seen.class_names))))


def questionable(seen: Inspected) -> np.ndarray:
    """The images that confident learning (ours or cleanlab's) flags on the set's own labels."""
    from cleanlab.filter import find_label_issues as cleanlab_issues

    proba = oof(seen, seen.labels)
    ours = {t.index for t in find_label_issues(proba, seen.labels)}
    return np.array(sorted(ours | set(np.flatnonzero(cleanlab_issues(seen.labels, proba)).tolist())), dtype=np.int64)


def noise_table(seen: Inspected) -> list[list]:
    """Per noise level and rule: precision and recall (mean and lowest over the seeds) and images flagged."""
    from cleanlab.filter import find_label_issues as cleanlab_issues

    k = len(seen.class_names)
    rows = []
    for fraction in (0.05, 0.10):
        runs: dict[str, list[tuple[float, float, int]]] = {}
        for seed in range(SEEDS):
            noisy, chosen = flip(seen.labels, fraction, k, seed=seed)
            proba = oof(seen, noisy)
            truth = set(chosen.tolist())
            ours = {t.index for t in find_label_issues(proba, noisy)}
            theirs = set(np.flatnonzero(cleanlab_issues(noisy, proba)).tolist())
            naive = set(np.argsort(proba[np.arange(len(noisy)), noisy])[:len(truth)].tolist())
            for name, flagged in (("headstart", ours), ("cleanlab", theirs), ("lowest self-confidence k", naive)):
                hit = len(flagged & truth)
                runs.setdefault(name, []).append((hit / max(len(flagged), 1), hit / len(truth), len(flagged)))
        for name, got in runs.items():
            a = np.array(got)
            rows.append([f"{fraction:.0%}", name, a[:, 0].mean(), a[:, 0].min(), a[:, 1].mean(), a[:, 1].min(),
                         a[:, 2].mean(), round(fraction * len(seen.labels))])
    return rows


def verdict(rows: list[list]) -> str:
    """Whether the issue's targets hold on the mean figures of one set's rows."""
    got = {(noise, rule): (precision, recall) for noise, rule, precision, _, recall, *_ in rows}
    precision, recall = got["5%", "headstart"]
    parts = [f"5% target {'met' if recall >= 0.8 and precision >= 0.6 else 'MISSED'} (precision {precision:.3f}, "
             f"recall {recall:.3f})"]
    for noise in ("5%", "10%"):
        gap = [cl - ours for ours, cl in zip(got[noise, "headstart"], got[noise, "cleanlab"])]
        parts.append(f"{noise} vs cleanlab {'ok' if max(gap) <= 0.05 else 'WORSE'} (precision {-gap[0]:+.3f}, "
                     f"recall {-gap[1]:+.3f})")
    return "; ".join(parts)


def copy_similarities(seen: Inspected, scales: tuple[float, float], qualities: tuple[int, int], n: int = 30,
                      seed: int = 0) -> dict[str, float]:
    """The planted copies' similarities to their originals (features and thumbnails), how many of them
    `inspect` reports, and the most alike pair of distinct images by either signal and under its rule."""
    from headstart.backbones import create_backbone
    from headstart.features import extract_features

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(seen.paths), size=min(n, len(seen.paths)), replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for j, i in enumerate(picks.tolist()):
            image = Image.open(seen.paths[i]).convert("RGB")
            scale = rng.uniform(*scales)
            image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(rng.integers(qualities[0], qualities[1] + 1)))
            path = Path(tmp) / f"copy{j}.jpg"
            path.write_bytes(buffer.getvalue())
            copies.append(path)
        bb = create_backbone("tf_efficientnet_lite0", "default")
        feats = extract_features(bb, copies, progress=False).features
        copy_thumbs = np.stack([thumbnail(c) for c in copies])
    unit, planted = normalise(seen.features), normalise(feats)
    thumbs = np.stack([thumbnail(p) for p in seen.paths])
    pooled = (unit[torch_index(picks)] * planted).sum(dim=1).numpy()
    small = (thumbs[picks] * copy_thumbs).sum(axis=1)
    found = reported(pooled, small)
    sims, thumb_sims = (unit @ unit.T).numpy(), thumbs @ thumbs.T
    same = np.asarray(seen.keys)
    distinct = np.triu(same[:, None] != same[None, :], 1)
    flagged = distinct & reported(sims, thumb_sims)
    return {"pooled_min": float(pooled.min()), "pooled_median": float(np.median(pooled)),
            "thumb_min": float(small.min()), "found": int(found.sum()), "n": len(picks),
            "found_by_features": int((pooled >= NEAR_DUPLICATE).sum()),
            "distinct_pooled_max": float(sims[distinct].max()),
            "distinct_thumb_max": float(thumb_sims[distinct & (sims >= THUMBNAIL_FEATURE_FLOOR)].max()),
            "false_pairs": int(flagged.sum())}


def reported(features: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """Whether `inspect` reports a pair with these similarities (headstart/inspection/findings.py)."""
    return (features >= NEAR_DUPLICATE) | ((thumbs >= THUMBNAIL_NEAR) & (features >= THUMBNAIL_FEATURE_FLOOR))


def torch_index(index: np.ndarray):  # -> torch.Tensor
    import torch

    return torch.from_numpy(np.asarray(index, dtype=np.int64))


def timing(seen: Inspected, n: int) -> float:
    rng = np.random.default_rng(0)
    reps = -(-n // len(seen.paths))
    originals = np.arange(reps * len(seen.paths)) % len(seen.paths)  # copies of one image share a group,
    noise = rng.normal(0, 0.05, (len(originals), seen.features.shape[1]))  # as identical files do
    thumbs = np.stack([thumbnail(p) for p in seen.paths])[originals[:n]]
    thumbs = (thumbs + rng.normal(0, 0.01, thumbs.shape)).astype(np.float32)
    big = Inspected([seen.paths[i] for i in originals[:n]], seen.labels[originals[:n]],
                    [seen.split[i] for i in originals[:n]], seen.class_names, [str(i) for i in originals[:n]],
                    (seen.features[originals] + noise)[:n].astype(np.float32), np.zeros((n, len(seen.class_names))),
                    seen.setting, [], thumbs)
    start = time.perf_counter()
    big.oof, _ = out_of_fold(big.features, big.labels, big.keys, Grid(source=("pooled",)), 5, 0, None)
    label_issues(big)
    similar(big, NEAR_DUPLICATE)
    classes(big)
    return time.perf_counter() - start


def neighbours_at_scale(n: int) -> tuple[float, float]:
    """(seconds, MiB of peak RSS growth) of the near-duplicate and k-NN pass over ``n`` random 1280-d rows."""
    import resource

    from headstart.inspection.neighbours import neighbours

    rows = np.random.default_rng(0).normal(size=(n, 1280)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    neighbours(rows, NEAR_DUPLICATE)
    seconds = time.perf_counter() - start
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"needs {SHARED} (ants_bees_train and intel_scenes)")
    loaded = {name: _load(SHARED / name, "tf_efficientnet_lite0", "default", None, 5, 0, 32, None, False)
              for name in SETS}
    print(f"label errors: precision and recall of the flagged set against the flipped labels, mean (lowest) over "
          f"{SEEDS} seeds")
    print("  'as given': every image. 'pre-cleaned': without the images confident learning (ours or cleanlab's)")
    print("  already flags on the set's own labels, so that the flipped labels are the only known errors")
    print(f"  {'set':16} {'images':11} {'noise':>5}  {'rule':26} {'precision':>13} {'recall':>13} {'flagged':>7} "
          f"{'flipped':>7}")
    verdicts = []
    for name, seen in loaded.items():
        doubtful = questionable(seen)
        print(f"  {name}: {len(doubtful)} of {len(seen.labels)} images flagged on the set's own labels: "
              + ", ".join(f"{seen.paths[i].parent.name}/{seen.paths[i].name}" for i in doubtful[:6].tolist())
              + (" ..." if len(doubtful) > 6 else ""))
        cleaned = subset(seen, np.setdiff1d(np.arange(len(seen.labels)), doubtful))
        for images, part in (("as given", seen), ("pre-cleaned", cleaned)):
            rows = noise_table(part)
            for noise, rule, precision, p_low, recall, r_low, flagged, flipped in rows:
                print(f"  {name:16} {images:11} {noise:>5}  {rule:26} {precision:7.3f} ({p_low:.2f}) "
                      f"{recall:6.3f} ({r_low:.2f}) {flagged:7.1f} {flipped:7d}")
            verdicts.append(f"{name} {images}: " + verdict(rows))
    print("\n  the issue's targets, on the means: recall >= 0.8 at precision >= 0.6 at 5% noise; at most 0.05 below "
          "cleanlab on either figure at 5% and 10%")
    for line in verdicts:
        print(f"  {line}")
    print(f"\nnear-duplicates: features' cosine >= {NEAR_DUPLICATE}, or thumbnails' >= {THUMBNAIL_NEAR} where the "
          f"features' >= {THUMBNAIL_FEATURE_FLOOR}")
    print(f"  {'set':16} {'copies':6} {'scale':>7} {'JPEG q':>6}  {'features min/median':>19} {'thumb min':>9} "
          f"{'found':>6} {'(by features)':>13}   distinct pairs: {'features max':>12} {'thumb max':>9} {'false':>5}")
    for name, seen in loaded.items():
        for edit, scales, qualities in (("mild", (0.85, 1.0), (80, 95)), ("strong", (0.5, 0.9), (50, 90))):
            c = copy_similarities(seen, scales, qualities)
            print(f"  {name:16} {edit:6} {scales[0]:.2f}-{scales[1]:.1f} {qualities[0]:>2}-{qualities[1]:<3}  "
                  f"{c['pooled_min']:9.4f}/{c['pooled_median']:.4f} {c['thumb_min']:9.4f} {c['found']:3d}/{c['n']:<2} "
                  f"{c['found_by_features']:10d}/{c['n']:<2}                   {c['distinct_pooled_max']:12.4f} "
                  f"{c['distinct_thumb_max']:9.4f} {c['false_pairs']:5d}")
    print("\nseconds after extraction (selection for out-of-fold probabilities, confident learning, neighbours):")
    seen = loaded["intel_scenes"]
    ants = loaded["ants_bees_train"]
    print(f"  {len(ants.paths)} images (ants/bees): {timing(ants, len(ants.paths)):.1f} s")
    start = time.perf_counter()
    every = ants.paths + seen.paths
    for path in every:
        thumbnail(path)
    print(f"  thumbnails (decoded once, then cached): {len(every) / (time.perf_counter() - start):.0f} images/s on "
          "one thread, ants/bees and intel_scenes photos")
    print(f"  5000 images (intel_scenes rows repeated with noise, copies grouped): {timing(seen, 5000):.1f} s")
    n = int(os.environ.get("INSPECT_NEIGHBOURS", "20000"))
    seconds, grown = neighbours_at_scale(n)
    print(f"  near-duplicates + k-NN alone on {n} random rows: {seconds:.1f} s, peak RSS +{grown:.0f} MiB (the rows "
          f"themselves: {n * 1280 * 4 / 2**20:.0f} MiB); 100,000 rows: ~{seconds * (100_000 / n) ** 2 / 60:.0f} min "
          "by n^2 (INSPECT_NEIGHBOURS=100000 to measure)")


if __name__ == "__main__":
    main()
