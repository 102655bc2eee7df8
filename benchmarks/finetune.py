"""Fine-tuning cost: seconds per epoch and peak memory for freeze = all / N (cut cached) / N (recomputed) / none.

usage:
    python benchmarks/finetune.py [DATA] [--freeze 6] [--epochs 3] [--none-epochs 1]

DATA defaults to ../shared/data/ants_bees_train. Each setting runs in its own process (so peak RSS is
its own) on the same 80/20 split, seed 0. Also printed: the share of forward FLOPs in the unfrozen
stages (+ tail and head), the target for a cut-cached epoch relative to training everything
(at most that share + 20%), and the speed-up of caching the cut over recomputing the frozen stages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

CHILD = """
import json, resource, sys, time
import headstart
data, out, cache, freeze, epochs, cut = sys.argv[1:7]
start = time.perf_counter()
finetune = {"epochs": int(epochs), "patience": 0, "cache_cut": cut == "1"} if freeze != "all" else {}
run = headstart.train(data, out, freeze=freeze, finetune=finetune, cache_dir=cache, progress=False, val_split=0.2)
m = run.metrics
print(json.dumps({"seconds": time.perf_counter() - start, "val_accuracy": m.get("val", {}).get("accuracy"),
                  "seconds_per_epoch": m.get("seconds_per_epoch"), "cut_cache_seconds": m.get("cut_cache_seconds"),
                  "head_seconds": m.get("head_seconds"), "feature_seconds": m.get("features", {}).get("seconds"),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def flops_share(n_frozen: int) -> tuple[float, int]:
    """Share of forward FLOPs after the first ``n_frozen`` stages, for tf_efficientnet_lite0 at 224 px."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from headstart.backbones import create_backbone
    from headstart.stages import stage_plan

    model = create_backbone("tf_efficientnet_lite0").model.eval()
    plan = stage_plan(model)
    x = torch.zeros(1, 3, 224, 224)
    costs = []
    with torch.no_grad():
        for i in range(len(plan)):
            with FlopCounterMode(display=False) as counter:
                y = plan.run(x, i, i + 1)
            costs.append(counter.get_total_flops())
            x = y
        with FlopCounterMode(display=False) as counter:
            plan.tail(x)
        tail = counter.get_total_flops()
    total = sum(costs) + tail
    return (sum(costs[n_frozen:]) + tail) / total, total


def run(data: str, out: str, cache: str, freeze: str, epochs: int, cut: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, data, out, cache, freeze, str(epochs), "1" if cut else "0"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"freeze={freeze} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(SHARED / "data" / "ants_bees_train"))
    parser.add_argument("--freeze", type=int, default=6, help="stages frozen in the cut-cached rows (default 6)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--none-epochs", type=int, default=1, help="epochs of the train-everything row")
    args = parser.parse_args()
    share, total_flops = flops_share(args.freeze)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache"
        rows.append(("all (head only, cold features)", run(args.data, f"{tmp}/a", cache, "all", 0, True)))
        rows.append((f"{args.freeze} (cut cached)", run(args.data, f"{tmp}/b", cache, str(args.freeze), args.epochs,
                                                        True)))
        rows.append((f"{args.freeze} (cut cached, warm)", run(args.data, f"{tmp}/b2", cache, str(args.freeze),
                                                              args.epochs, True)))
        rows.append((f"{args.freeze} (recomputed)", run(args.data, f"{tmp}/c", cache, str(args.freeze), args.epochs,
                                                        False)))
        rows.append(("none (train everything)", run(args.data, f"{tmp}/d", cache, "none", args.none_epochs, True)))
    print(f"data: {args.data}; 80/20 split, seed 0; tf_efficientnet_lite0, {total_flops / 1e9:.2f} GFLOP forward")
    header = f"{'freeze':34} {'s/epoch':>8} {'one-off s':>10} {'total s':>8} {'peak RSS MB':>12} {'val acc':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        per_epoch = r["seconds_per_epoch"] if r["seconds_per_epoch"] is not None else r["head_seconds"]
        one_off = r["cut_cache_seconds"] if "cut cached" in name else (r["feature_seconds"] or 0.0)
        print(f"{name:34} {per_epoch:8.2f} {one_off:10.2f} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f} "
              f"{r['val_accuracy']:8.4f}")
    cut, recomputed, everything = rows[1][1], rows[3][1], rows[4][1]
    ratio = cut["seconds_per_epoch"] / everything["seconds_per_epoch"]
    print()
    print(f"unfrozen share of forward FLOPs with {args.freeze} stages frozen: {share:.3f}; "
          f"target for a cut-cached epoch: <= {share * 1.2:.3f} of a train-everything epoch")
    print(f"measured: cut-cached epoch / train-everything epoch = {ratio:.3f} "
          f"({'meets' if ratio <= share * 1.2 else 'misses'} the target)")
    speedup = recomputed["seconds_per_epoch"] / cut["seconds_per_epoch"]
    print(f"cut caching vs recomputing the frozen stages: {speedup:.1f}x faster per epoch")


if __name__ == "__main__":
    main()
