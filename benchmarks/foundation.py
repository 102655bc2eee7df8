"""headstart vs the hand-written baseline, side by side in one run: cold cache, warm cache, accuracy.

usage:
    python benchmarks/foundation.py [DATA] [--cv 5] [--baseline PATH] [--precision auto|fp32|bf16]

DATA defaults to ../shared/data/ants_bees_train and the baseline to ../shared/bench/naive_baseline.py
(both beside this repository). Every row is a separate process timed wall-clock from outside, start-up
and imports included, so the rows compare like with like. Protocol for accuracy: stratified k-fold
(shuffle, random_state=0) over every image, the same as the baseline's ``--cv``.

Rows:
  baseline          naive_baseline.py DATA --cv K
  headstart cold    headstart train DATA --select none --cv K, empty feature cache
  headstart warm    the same with another head setting (--weight-decay 0.01), cache kept: no backbone forward

Both rows train one fixed head (``--select none``) so that they time the extraction path; the cost of
the default head selection is measured by benchmarks/selection.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


SESSION = """
import json, sys, time
import headstart, sklearn.model_selection, sklearn.metrics, timm  # imports paid before timing
data, tmp, precision, cv = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
times = {}
for name, extra in (("cold", {}), ("warm", {"head_params": {"weight_decay": 0.01}})):
    start = time.perf_counter()
    run = headstart.train(data, f"{tmp}/{name}", select="none", cv=cv, val_split=0, precision=precision,
                          cache_dir=f"{tmp}/cache", progress=False, **extra)
    times[name] = {"seconds": time.perf_counter() - start, "accuracy": run.metrics["cv"]["accuracy"],
                   "n_computed": run.metrics["features"]["n_computed"]}
print(json.dumps(times))
"""


def in_session(data: str, precision: str, cv: int) -> dict:
    """Cold then warm ``headstart.train`` in one Python session, as in a notebook."""
    with tempfile.TemporaryDirectory() as tmp:
        _, out = timed([sys.executable, "-c", SESSION, data, tmp, precision, str(cv)])
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(SHARED / "data" / "ants_bees_train"))
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--baseline", default=str(SHARED / "bench" / "naive_baseline.py"))
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    if not Path(args.data).is_dir() or not Path(args.baseline).is_file():
        sys.exit(f"need the data folder '{args.data}' and the baseline '{args.baseline}'")

    base_wall, base_out = timed([sys.executable, args.baseline, args.data, "--cv", str(args.cv)])
    match = re.search(r"features ([\d.]+)s \(([\d.]+) img/s\).*total ([\d.]+)s accuracy ([\d.]+)", base_out)
    if not match:
        sys.exit(f"could not parse the baseline's output: {base_out!r}")
    base_feat, base_ips, base_work, base_acc = map(float, match.groups())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, "-m", "headstart", "train", args.data, "--select", "none", "--cv", str(args.cv),
                  "--cache-dir", f"{tmp}/cache", "--precision", args.precision, "--json", "--quiet"]
        cold_wall, cold_out = timed([*common, "--out", f"{tmp}/cold"])
        warm_wall, warm_out = timed([*common, "--out", f"{tmp}/warm", "--weight-decay", "0.01"])
        precision = json.loads(Path(f"{tmp}/cold/run.json").read_text())["preprocessing"]["precision"]
    cold, warm = json.loads(cold_out), json.loads(warm_out)
    n = cold["n_train"]
    rows = [
        ("baseline (naive_baseline.py)", base_wall, base_work, base_feat, base_ips, base_acc, "-"),
        (f"headstart cold ({precision})", cold_wall, cold["seconds"], cold["features"]["seconds"],
         n / cold["features"]["seconds"], cold["cv"]["accuracy"], str(cold["features"]["n_computed"])),
        ("headstart warm (new head)", warm_wall, warm["seconds"], warm["features"]["seconds"],
         n / max(warm["features"]["seconds"], 1e-9), warm["cv"]["accuracy"], str(warm["features"]["n_computed"])),
    ]
    print(f"data: {args.data} ({n} images), {args.cv}-fold CV, same folds for every row")
    print("wall s = whole process (interpreter start-up and imports included); "
          "work s = the job after imports (baseline: its 'total'; headstart: train())")
    header = f"{'':30} {'wall s':>7} {'work s':>7} {'features s':>10} {'img/s':>9} {'accuracy':>9} {'forwards':>8}"
    print(header)
    print("-" * len(header))
    for name, wall, work, feat, ips, acc, fwd in rows:
        print(f"{name:30} {wall:7.2f} {work:7.2f} {feat:10.2f} {ips:9.1f} {acc:9.4f} {fwd:>8}")
    print()
    print(f"cold vs baseline: {base_wall / cold_wall:.2f}x wall-clock, {base_work / cold['seconds']:.2f}x work, "
          f"{(n / cold['features']['seconds']) / base_ips:.2f}x feature throughput, "
          f"accuracy {cold['cv']['accuracy'] - base_acc:+.4f}")
    print(f"warm vs cold:     {cold['seconds'] / warm['seconds']:.1f}x work, {cold_wall / warm_wall:.2f}x wall-clock; "
          f"backbone forwards on the warm run: {warm['features']['n_computed']}")
    session = in_session(args.data, args.precision, args.cv)
    print(f"in one Python session (imports done first): cold train() {session['cold']['seconds']:.2f}s, "
          f"warm train() with a new head {session['warm']['seconds']:.2f}s -> "
          f"{session['cold']['seconds'] / session['warm']['seconds']:.1f}x; warm forwards: "
          f"{session['warm']['n_computed']}")


if __name__ == "__main__":
    main()
