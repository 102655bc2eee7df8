"""Test-time multi-crop cost and benefit: ms per image for TTA none / flip / 10crop, cold and cached.

usage:
    python benchmarks/tta.py [DATA] [--modes none,flip,10crop] [--repeats 15] [--precision auto]
                             [--no-end-to-end] [--cli]

DATA defaults to ../shared/data/ants_bees_train beside this repository. Each mode gets its own empty
feature cache, so its cold row pays for everything: read, hash, decode, one resize, the crops and one
backbone forward per view (all crops of a batch in one forward). ms per image counts images, not views;
cached rows are the best of ``--repeats`` calls.

The cached row times what ``evaluate``/``predict`` do per model (:func:`headstart.inference.view_probabilities`):
``extract_views(load=False)`` (stat every file, hash memo, locate every view's row) and then the head on the
features where they lie in the memory-mapped float16 shards. In brackets: the path that first gathers all
features into one float32 array (``extract_views`` + ``predict_proba_views``).

End to end (unless ``--no-end-to-end``): a head-only run is trained on DATA, then ``headstart.evaluate(run,
DATA, tta=mode)`` is timed on the warm cache in this process (load the run, scan the folder, features,
head, metrics); with ``--cli``, also ``headstart evaluate`` as a fresh process (imports included).

Accuracy: one linear head, fitted on the clean (centre) features of a stratified 80/20 split
(:func:`headstart.data.stratified_split`, seed 0), scores the held-out 20% with each mode's views averaged.

Targets: 10crop/none <= 10.5x cold (decoding is shared by the crops) and <= 1.2x cached.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.backbones import DEFAULT_BACKBONE, create_backbone
from headstart.cache import FeatureCache
from headstart.data import load_images, stratified_split
from headstart.features import extract_views
from headstart.heads import LinearHead
from headstart.inference import predict_proba_views, view_probabilities
from headstart.tta import tta_views

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ants_bees_train"
TARGETS = {"cold": 10.5, "cached": 1.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DATA))
    parser.add_argument("--modes", default="none,flip,10crop")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the headstart.evaluate() rows")
    parser.add_argument("--cli", action="store_true", help="also time `headstart evaluate` as fresh processes")
    args = parser.parse_args()
    modes = args.modes.split(",")

    images = load_images(args.data, val_split=0).train
    paths, labels = images.paths, images.labels
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    backbone = create_backbone(args.backbone)
    n = len(paths)
    print(f"{n} images ({len(train_idx)} train / {len(val_idx)} held out), {backbone.name}, "
          f"{torch.get_num_threads()} torch threads")

    common = {"precision": args.precision, "progress": False, "batch_size": 32}
    rows: dict[str, dict[str, float]] = {}
    head = None
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # the engine's one-off set-up (OpenVINO's conversion) is paid here, not by the first mode's cold row
        with FeatureCache(Path(tmp) / "warm-up") as scratch:
            extract_views(backbone, paths[:1], tta_views(backbone.data_config, "none"), cache=scratch, **common)
        caches, views, cold = {}, {}, {}
        for mode in modes:  # cold: every mode with its own empty cache
            views[mode] = tta_views(backbone.data_config, mode)
            caches[mode] = stack.enter_context(FeatureCache(Path(tmp) / mode))
            start = time.perf_counter()
            cold[mode] = extract_views(backbone, paths, views[mode], cache=caches[mode], **common)
            rows[mode] = {"views": len(views[mode]), "cold": 1000 * (time.perf_counter() - start) / n}
            if not cold[mode].ok.all():
                raise SystemExit(f"{(~cold[mode].ok).sum()} images failed: {cold[mode].bad_files[:3]}")
            if head is None:  # the centre view is the clean view: the same features in every mode
                head = LinearHead().fit(cold[mode].features[train_idx, 0], labels[train_idx])
                predict_proba_views(head, cold[mode].features)  # a first call pays torch's one-off set-up

        def scored(mode: str) -> Any:
            return view_probabilities(head, backbone, paths, views[mode], caches[mode], **common)

        def loaded(mode: str) -> Any:
            warm = extract_views(backbone, paths, views[mode], cache=caches[mode], **common)
            return warm, predict_proba_views(head, warm.features)

        # cached: the best of --repeats, modes interleaved so that none gets the quieter moments; each path
        # timed apart from the other, so that neither evicts the other's data from the CPU caches
        for kind, call in (("cached", scored), ("loaded", loaded)):
            best = dict.fromkeys(modes, float("inf"))
            for _ in range(args.repeats):
                for mode in modes:
                    start = time.perf_counter()
                    call(mode)
                    best[mode] = min(best[mode], time.perf_counter() - start)
            for mode in modes:
                rows[mode][kind] = 1000 * best[mode] / n

        for mode in modes:
            proba, located = scored(mode)
            warm, in_memory = loaded(mode)
            if warm.n_computed or located.n_computed:
                raise SystemExit(f"the warm run of {mode} computed {warm.n_computed + located.n_computed} views")
            np.testing.assert_allclose(proba, in_memory, rtol=1e-5, atol=1e-6)
            geo = predict_proba_views(head, warm.features[val_idx], method="geomean")
            r = rows[mode]
            r["accuracy"] = float((head.classes_[proba[val_idx].argmax(1)] == labels[val_idx]).mean())
            r["geomean"] = float((head.classes_[geo.argmax(1)] == labels[val_idx]).mean())
            print(f"{mode:>10}: {r['views']:2d} views  cold {r['cold']:7.2f} ms/img  cached {r['cached']:7.4f} ms/img "
                  f"(all loaded first: {r['loaded']:.4f})"
                  f"  held-out accuracy {r['accuracy']:.4f} (geomean {r['geomean']:.4f})  [{cold[mode].precision}]",
                  flush=True)

        if not args.no_end_to_end:
            end_to_end(args.data, Path(tmp) / "e2e", modes, args.repeats, rows, cli=args.cli)

    print_targets(rows)

def print_targets(rows: dict[str, dict[str, float]]) -> None:
    """10crop against none, cold and cached (and end to end when timed), each with its target."""
    if "none" not in rows or "10crop" not in rows:
        return
    for kind, target in TARGETS.items():
        ratio = rows["10crop"][kind] / rows["none"][kind]
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"10crop/none {kind:>6}: {ratio:5.2f}x (target <= {target}x: {verdict})")
    for kind, label in (("evaluate", "evaluate()"), ("cli", "CLI")):
        if kind in rows["none"]:
            ratio = rows["10crop"][kind] / rows["none"][kind]
            verdict = "meets" if ratio <= TARGETS["cached"] else "MISSES"
            print(f"10crop/none cached, {label}: {ratio:5.2f}x (target <= {TARGETS['cached']}x: {verdict})")


def end_to_end(data: str, root: Path, modes: list[str], repeats: int, rows: dict[str, dict[str, float]],
               cli: bool = False) -> None:
    """What a user waits for when re-evaluating a head-only run on a warm cache, in one Python session:
    ``headstart.evaluate(run, data, tta=mode)`` (load the run, scan the folder, features from the cache,
    head, averaging, metrics)."""
    import headstart

    kw = {"cache_dir": root / "cache", "progress": False}
    headstart.train(data, root / "run", **kw)
    for mode in modes:
        headstart.evaluate(root / "run", data, tta=mode, **kw)  # fills the crop cache
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(repeats):  # modes interleaved, so that neither gets the quieter moments
        for mode in modes:
            start = time.perf_counter()
            result = headstart.evaluate(root / "run", data, tta=mode, **kw)
            best[mode] = min(best[mode], time.perf_counter() - start)
    for mode in modes:
        rows[mode]["evaluate"] = 1000 * best[mode] / result["n_images"]
        print(f"{mode:>10}: headstart.evaluate() on a warm cache {rows[mode]['evaluate']:7.4f} ms/img "
              f"(accuracy {result['accuracy']:.4f} on all {result['n_images']} images, training ones included)",
              flush=True)
    if cli:  # a fresh process per call, as from a shell: imports and model set-up included
        for mode in modes:
            command = [sys.executable, "-m", "headstart", "evaluate", str(root / "run"), data, "--tta", mode,
                       "--cache-dir", str(root / "cache"), "--json", "-q"]
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                best = min(best, time.perf_counter() - start)
            rows[mode]["cli"] = best
            print(f"{mode:>10}: headstart evaluate (CLI, fresh process) {best:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
