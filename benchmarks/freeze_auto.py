"""--freeze auto against the frozen head, on an outer test split it never sees.

usage:
    python benchmarks/freeze_auto.py [DATA ...] [--budget MINUTES] [--epochs E] [--digits N] [--upside-down]
                                     [--skip-shared] [--test 0.25]
                                     [--cache-dir DIR] [--work DIR]

DATA defaults to both sets of ../shared/data; --digits N adds a third set built from an installed
package: scikit-learn's 8x8 handwritten digits, N per class, written as 64x64 PNGs (a domain far
from ImageNet's photos, where frozen features are weakest). --upside-down adds a task built from the
shared photos themselves: every photo appears once, half of them turned by 180 degrees, and the
classes are "upright" and "upside_down" (pooled ImageNet features keep only part of an image's
orientation, so this is a set where training the top stages should pay); --skip-shared leaves the
shared sets themselves out. Each set is split once (stratified, identical files on one side,
seed 0) into a training part and a test part. On the training part, side by side:

  frozen head      headstart train (default: head chosen by 5-fold CV on frozen features, refit on all)
  --freeze auto    headstart train --freeze auto --budget B: compares the frozen head with fine-tuning
                   the top 1, 2, 3 stages on a held-out fold of the training part, retrains the winner

It prints auto's comparison table (the held-out fold inside the training part), then both final
models on the test part: accuracy, log-loss, minutes, and the paired difference in log-loss with its
standard error, which is the noise auto is allowed.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = [SHARED / "data" / "ants_bees_train", SHARED / "data" / "intel_scenes"]


def split_manifests(data: Path, work: Path, test: float) -> tuple[Path, Path]:
    """``train.csv`` and ``test.csv`` beside a link to ``data`` (identical files stay on one side)."""
    from headstart.cache import FeatureCache
    from headstart.data import load_images, stratified_split

    loaded = load_images(data, val_split=0)
    with FeatureCache(None) as cache:
        keys, _ = cache.image_keys(loaded.train.paths)
    groups = [k or str(p) for k, p in zip(keys, loaded.train.paths)]
    train_idx, test_idx = stratified_split(loaded.train.labels, test, seed=0, groups=groups)
    work.mkdir(parents=True, exist_ok=True)
    link = work / "images"
    if not link.exists():
        link.symlink_to(data.resolve(), target_is_directory=True)
    out = []
    for name, idx in (("train", train_idx), ("test", test_idx)):
        path = work / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for i in idx:
                rel = Path(loaded.train.paths[i]).resolve().relative_to(data.resolve())
                writer.writerow([f"images/{rel.as_posix()}", loaded.train.class_names[loaded.train.labels[i]]])
        out.append(path)
    return out[0], out[1]


def write_upside_down(root: Path, sources: list[Path]) -> Path:
    """Each image of ``sources`` once, every second one (shuffled, seed 0) turned by 180 degrees, as
    ``upright/`` and ``upside_down/`` JPEGs; the EXIF orientation is applied first."""
    import random

    from PIL import ImageOps

    from headstart.data import ImageDecodeError, decode_image, load_images

    paths = sorted(p for source in sources for p in load_images(source, val_split=0).train.paths)
    random.Random(0).shuffle(paths)
    for i, path in enumerate(paths):
        try:
            image = decode_image(path)
        except ImageDecodeError:
            continue  # the placeholder GIF of the ants folder decodes; a truly broken file is left out
        label = "upright" if i % 2 == 0 else "upside_down"
        if label == "upside_down":
            image = ImageOps.flip(ImageOps.mirror(image))  # a 180-degree turn
        (root / label).mkdir(parents=True, exist_ok=True)
        image.save(root / label / f"{i:04d}.jpg", quality=92)
    return root


def test_losses(run_path: Path, test_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-image log-loss and correctness of a saved run on the test manifest."""
    from headstart.cache import FeatureCache
    from headstart.data import load_images
    from headstart.inference import load_run, run_probabilities

    run = load_run(run_path)
    loaded = load_images(test_csv, val_split=0)
    index = {name: i for i, name in enumerate(run.class_names)}
    y = np.asarray([index[loaded.train.class_names[label]] for label in loaded.train.labels])
    with FeatureCache(None) as cache:
        probs = run_probabilities(run, loaded.train.paths, cache, progress=False)
    y = y[probs.ok]
    p = np.clip(probs.proba[np.arange(len(y)), y], 1e-15, 1)
    return -np.log(p), probs.proba.argmax(1) == y


def _one(value: float | None) -> np.ndarray | None:
    return None if value is None else np.asarray([value])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, default=list(DEFAULT_DATA))
    parser.add_argument("--budget", type=float, default=None, help="--budget of --freeze auto (default: its own)")
    parser.add_argument("--test", type=float, default=0.25, help="fraction of each class in the test part")
    parser.add_argument("--cache-dir", default=None, help="feature cache (sets HEADSTART_CACHE_DIR)")
    parser.add_argument("--work", type=Path, default=None, help="where manifests and runs go (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs of auto's candidates "
                        "(default: the fine-tuning default)")
    parser.add_argument("--digits", type=int, default=0, metavar="N",
                        help="also a set of scikit-learn's digits, N per class (default 0: off)")
    parser.add_argument("--upside-down", action="store_true",
                        help="also the upright-or-upside-down task built from the photos of ../shared/data")
    parser.add_argument("--skip-shared", action="store_true",
                        help="run only the sets of --digits/--upside-down, not DATA's default shared sets")
    args = parser.parse_args()
    if args.skip_shared:
        args.data = [d for d in args.data if d not in DEFAULT_DATA]
    if args.cache_dir:
        import os

        os.environ["HEADSTART_CACHE_DIR"] = args.cache_dir
    from headstart import train
    from headstart.freeze_auto import Trial, format_table

    for data in args.data:
        if not data.is_dir():
            sys.exit(f"{data} not found: give DATA folders (the shared sets live in ../shared/data)")
    work_root = args.work or Path(tempfile.mkdtemp(prefix="headstart-freeze-auto-"))
    if args.digits:
        from package_sets import write_digits

        args.data.append(write_digits(work_root / "sources" / "digits", args.digits))
    if args.upside_down:
        args.data.append(write_upside_down(work_root / "sources" / "upside_down", DEFAULT_DATA))
    for data in args.data:
        work = work_root / data.name
        train_csv, test_csv = split_manifests(data, work, args.test)
        rows = {}
        tuning = {"epochs": args.epochs} if args.epochs else {}
        for name, options in (("frozen head", {}),
                              ("--freeze auto", {"freeze": "auto", "budget": args.budget, "finetune": tuning})):
            start = time.perf_counter()
            run = train(train_csv, work / name.strip("-").replace(" ", "_"), progress=False, **options)
            minutes = (time.perf_counter() - start) / 60
            loss, hit = test_losses(run.path, test_csv)
            rows[name] = (loss, hit, minutes, run)
        auto = rows["--freeze auto"][3].metrics["freeze_auto"]
        n_train, n_test = rows["frozen head"][3].metrics["n_train"], len(rows["frozen head"][0])
        print(f"\n== {data.name}: {n_train} training images, {n_test} test images")
        trials = [Trial(r["candidate"], r["freeze"], r["trainable_stages"], _one(r["log_loss"]), r["accuracy"],
                        r["seconds"], best_epoch=r["best_epoch"], skipped=r["skipped"],
                        calibrated=_one(r["calibrated_log_loss"]), seconds_per_epoch=r["seconds_per_epoch"])
                  for r in auto["candidates"]]
        chosen = next((t for t in trials if t.freeze == auto["chosen"] and not t.skipped), None)
        print("--freeze auto's comparison on its held-out fold (inside the training part):")
        print(format_table(trials, chosen))
        print(f"chosen: {auto['chosen']} ({auto['reason']}); {auto['seconds'] / 60:.1f} min of a "
              f"{auto['budget_minutes']:g} min budget")
        print("on the test part:")
        print(f"  {'model':<16} {'accuracy':>8} {'errors':>6} {'log-loss':>8} {'minutes':>8}")
        for name, (loss, hit, minutes, _) in rows.items():
            print(f"  {name:<16} {hit.mean():>8.4f} {int((~hit).sum()):>6} {loss.mean():>8.4f} {minutes:>8.2f}")
        diff = rows["--freeze auto"][0] - rows["frozen head"][0]
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        verdict = "within the noise or better" if diff.mean() <= se else "WORSE than the noise allows"
        print(f"  auto - frozen log-loss {diff.mean():+.4f} (one standard error {se:.4f}): {verdict}")


if __name__ == "__main__":
    main()
