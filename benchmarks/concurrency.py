"""Concurrent writers: N `headstart features` processes on the same images and cache folder, at once.

Prints, for each N, the forwards all processes did together against the number of images (the target
is at most 1.25x), whether every process got every image, whether the rows equal one process's run
byte for byte, and what is left on disk: orphan shards, damaged shards, unreleased claims.

    python benchmarks/concurrency.py                # 4 and 12 writers, 200 images
    python benchmarks/concurrency.py --writers 4 --images 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kill import all_rows, make_photos


def _command(data: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "headstart", "features", str(data), "--cache-dir", str(cache), "--engine", "torch",
            "--batch-size", "8", "--workers", "0", "--json", "--quiet"]


def writers(n: int, data: Path, cache: Path) -> tuple[list[dict], float]:
    env = {**os.environ, "HEADSTART_FLUSH_SECONDS": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen(_command(data, cache), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        results.append(json.loads(out) if proc.returncode == 0 else {"error": err.strip().splitlines()[-1:]})
    return results, time.perf_counter() - start


def leftovers(cache_dir: Path) -> dict:
    from headstart.cache import FeatureCache
    from headstart.cache.maintenance import info, verify

    with FeatureCache(cache_dir, memos={}) as cache:
        found, checked = info(cache, min_age=0), verify(cache)
        claims = cache.index.db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    return {"orphans": len(found["orphan_shards"]) + len(found["leftover_files"]), "damaged": len(checked["damaged"]),
            "index": checked["index"], "claims": claims}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="headstart-writers-") as tmp:
        data = make_photos(Path(tmp) / "data", args.images, seed=0)
        subprocess.run(_command(data, Path(tmp) / "alone"), check=True, capture_output=True)
        truth = all_rows(Path(tmp) / "alone")
        print(f"{args.images} images; one process's rows are the reference")
        print(f"  {'writers':>7}  {'failed':>6}  {'complete':>8}  {'forwards':>8}  {'x images':>8}  {'identical':>9}  "
              f"{'orphans':>7}  {'damaged':>7}  {'claims':>6}  {'seconds':>7}")
        for n in args.writers:
            cache = Path(tmp) / f"shared{n}"
            results, seconds = writers(n, data, cache)
            ok = [r for r in results if "error" not in r]
            forwards = sum(r["n_computed"] for r in ok)
            complete = sum(r["n_images"] == args.images and r["n_bad"] == 0 for r in ok)
            left = leftovers(cache)
            print(f"  {n:>7}  {n - len(ok):>6}  {complete:>8}  {forwards:>8}  {forwards / args.images:>8.2f}  "
                  f"{all_rows(cache) == truth!s:>9}  {left['orphans']:>7}  {left['damaged']:>7}  {left['claims']:>6}  "
                  f"{seconds:>7.1f}")


if __name__ == "__main__":
    main()
