"""The study behind the fine-tuning defaults: one setting changed at a time, on both shared sets.

usage:
    python benchmarks/finetune_study.py [DATA ...] [--top 3] [--folds 3] [--cache-dir DIR] [--work DIR]

For each set: the training part of benchmarks/freeze_auto.py's split (its test part is never used
here), cut into --folds stratified folds (identical files together). Each setting fine-tunes the top
--top stages on all folds but one, early-stopped on the held-out one as --freeze auto does, for every
fold; the rows are out-of-fold accuracy, log-loss, log-loss after a fitted temperature (what
auto compares) and minutes. The defaults row comes first; every other row changes one setting (the
last, two). A default is changed only when the change helps on both sets, so no set decides alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freeze_auto import DEFAULT_DATA, split_manifests

VARIANTS = [
    ("defaults", {}, None),
    ("lr 3e-3", {"lr": 3e-3}, None),
    ("label smoothing 0", {"label_smoothing": 0.0}, None),
    ("lr decay 1.0 (flat)", {"lr_decay": 1.0}, None),
    ("15 epochs, patience 5", {"epochs": 15, "patience": 5}, None),
    ("augment light", {}, "light"),
    ("flat decay + 15 epochs", {"lr_decay": 1.0, "epochs": 15, "patience": 5}, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--top", type=int, default=3, help="trainable top stages (default 3)")
    parser.add_argument("--folds", type=int, default=3, help="folds of the training part (default 3)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (sets HEADSTART_CACHE_DIR)")
    parser.add_argument("--work", type=Path, default=None, help="where manifests go (default: a temp dir)")
    args = parser.parse_args()
    if args.cache_dir:
        os.environ["HEADSTART_CACHE_DIR"] = args.cache_dir
    from headstart.backbones import create_backbone
    from headstart.cache import FeatureCache
    from headstart.data import load_images
    from headstart.finetune import FinetuneConfig
    from headstart.freeze_auto import AUTO_AUG_VIEWS, AUTO_AUGMENT, finetune_trial
    from headstart.selection import make_folds
    from headstart.stages import stage_plan

    work_root = args.work or Path(tempfile.mkdtemp(prefix="headstart-ft-study-"))
    summary: dict[str, list[float]] = {}
    for data in args.data:
        train_csv, _ = split_manifests(data, work_root / data.name, 0.25)
        train_set = load_images(train_csv, val_split=0).train
        with FeatureCache(None) as cache:
            bb = create_backbone("tf_efficientnet_lite0", memo=cache)
            keys, _ = cache.image_keys(train_set.paths)
            folds = make_folds(train_set.labels, [k or str(p) for k, p in zip(keys, train_set.paths)],
                               args.folds, seed=0)
            n_frozen = len(stage_plan(bb.model, whole_ok=True)) - args.top
            print(f"\n== {data.name}: fine-tune the top {args.top} stages, {args.folds}-fold over {len(train_set)} "
                  f"training images")
            print(f"  {'setting':<24} {'accuracy':>8} {'log-loss':>8} {'calibrated':>10} {'epochs':>8} {'minutes':>7}")
            for name, changes, augment in VARIANTS:
                config = SimpleNamespace(seed=0, aug_params={}, precision="auto", num_workers=None)
                start = time.perf_counter()
                loss, calibrated, hits, epochs = [], [], 0, []
                for tr, te in folds:
                    trial = finetune_trial(name, args.top, n_frozen, bb, train_set.paths, train_set.subset(tr),
                                           train_set.subset(te), cache, config, FinetuneConfig(**changes),
                                           augment or AUTO_AUGMENT, AUTO_AUG_VIEWS, work_root / "ft", False)
                    loss.append(trial.image_loss)
                    calibrated.append(trial.calibrated)
                    hits += round(trial.accuracy * int((~np.isnan(trial.image_loss)).sum()))
                    epochs.append(str(trial.best_epoch))
                minutes = (time.perf_counter() - start) / 60
                loss_all, cal_all = np.concatenate(loss), np.concatenate(calibrated)
                n = int((~np.isnan(loss_all)).sum())
                summary.setdefault(name, []).append(float(np.nanmean(cal_all)))
                print(f"  {name:<24} {hits / n:>8.4f} {np.nanmean(loss_all):>8.4f} {np.nanmean(cal_all):>10.4f} "
                      f"{','.join(epochs):>8} {minutes:>7.2f}", flush=True)
    print("\ncalibrated log-loss change against the defaults, per set (negative = better):")
    base = np.asarray(summary["defaults"])
    for name, losses in summary.items():
        if name != "defaults":
            delta = np.asarray(losses) - base
            both = "better on every set" if (delta < 0).all() else ""
            print(f"  {name:<24} " + " ".join(f"{d:+.4f}" for d in delta) + f"  {both}")


if __name__ == "__main__":
    main()
