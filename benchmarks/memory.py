"""Memory of feature extraction as the image count grows: peak RSS at 1,000, 10,000 and 100,000 images.

usage:
    python benchmarks/memory.py [--sizes 1000,10000,100000] [--px 64] [--workers N] [--keep DIR]

Writes ``max(sizes)`` small synthetic JPEGs (two classes, every one different) once, then for each size
runs ``headstart features`` on that many of them as its own process, into a fresh cache, and prints
its peak resident memory next to the reference in the same run: a process that only loads the
backbone and runs one batch of 32 through it on the engine ``headstart features`` picks (the floor any
extraction pays; both convert the network for OpenVINO first, each into a fresh folder). Two figures per row, both
sampled from ``/proc`` every 0.2 s (Linux): the main process's peak RSS, and the peak of the whole process
tree (main + decoding workers) as PSS, which splits the pages they share instead of counting them in each.
Target (issue 12): flat, not linear, in the image count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE = """
from pathlib import Path
import torch
from headstart.backbones import create_backbone
from headstart.engines import openvino_forward, resolve_engine
from headstart.features import forward_batch
from headstart.preprocess import resolve_precision
cpu = torch.device("cpu")
bb = create_backbone("{backbone}", "default")
precision = resolve_precision("auto", cpu)
x = torch.rand(32, 3, *bb.data_config["input_size"][1:])
if resolve_engine("auto", cpu, precision) == "openvino":
    openvino_forward(bb, precision, Path("{engine_dir}"))(x)
else:
    forward_batch(bb, x, cpu, precision)
"""


def write_images(root: Path, n: int, px: int) -> list[Path]:
    """``n`` distinct JPEGs of ``px`` x ``px`` in ``root/{a,b}``: a colour gradient plus noise each."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, px, dtype=np.float32)
    paths = []
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / "ab"[i % 2] / f"{i:06d}.jpg"
        if not path.exists():
            colour = rng.random(3, dtype=np.float32)
            img = ramp[None, :, None] * colour + rng.random((px, px, 3), dtype=np.float32) * 0.3
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=85)
        paths.append(path)
        if (i + 1) % 10000 == 0:
            print(f"  wrote {i + 1} images", file=sys.stderr)
    return paths


def tree_of(paths: list[Path], n: int, root: Path) -> Path:
    """A class tree holding the first ``n`` images (hard links: no copies)."""
    tree = root / f"tree_{n}"
    for path in paths[:n]:
        link = tree / path.parent.name / path.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    return tree


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss(pid: int) -> tuple[int, int]:
    """Resident KiB of ``pid`` (RSS) and of ``pid`` with all its descendants (PSS: shared pages split)."""

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _kib(f"/proc/{p}/smaps_rollup", "Pss:")
        stack += children.get(p, [])
    return _kib(f"/proc/{pid}/status", "VmRSS:"), total


def measure(argv: list[str]) -> tuple[float, float, float, str]:
    """Run ``argv``; returns seconds, peak main RSS (MiB), peak tree RSS (MiB) and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            main, tree = _tree_rss(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], main), max(peaks[1], tree)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    return time.perf_counter() - start, peaks[0] / 1024, peaks[1] / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="image counts (default 1000,10000,100000)")
    parser.add_argument("--px", type=int, default=64, help="side of the synthetic JPEGs (default 64)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: headstart's)")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the images (kept; default a temp dir)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    root = args.keep or Path(tempfile.mkdtemp(prefix="headstart-memory-"))
    print(f"writing {sizes[-1]} images of {args.px} px under {root}", file=sys.stderr)
    paths = write_images(root / "images", sizes[-1], args.px)
    reference = REFERENCE.format(backbone=args.backbone, engine_dir=root / "reference_engines")
    rows = [("reference: backbone + one batch", *measure([sys.executable, "-c", reference])[:3], None)]
    for n in sizes:
        tree = tree_of(paths, n, root)
        argv = [sys.executable, "-m", "headstart", "features", str(tree), "--backbone", args.backbone,
                "--cache-dir", str(root / f"cache_{n}"), "--quiet", "--json"]
        argv += ["--workers", str(args.workers)] if args.workers is not None else []
        seconds, main_mib, tree_mib, out = measure(argv)
        result = json.loads(out)
        rows.append((f"headstart features, {n} images", seconds, main_mib, tree_mib, result["n_computed"]))
    floor = rows[0][2]
    print(f"\n  {'row':<36} {'seconds':>8} {'img/s':>7} {'peak main MiB':>14} {'x ref':>6} {'peak tree MiB':>14}")
    for name, seconds, main_mib, tree_mib, computed in rows:
        rate = f"{computed / seconds:7.1f}" if computed else f"{'':>7}"
        print(f"  {name:<36} {seconds:>8.1f} {rate} {main_mib:>14.0f} {main_mib / floor:>6.2f} {tree_mib:>14.0f}")
    first, last = rows[1], rows[-1]
    growth = (last[2] - first[2]) / max(1, (sizes[-1] - sizes[0]))
    print(f"\n  main process: {first[2]:.0f} MiB at {sizes[0]} images, {last[2]:.0f} MiB at {sizes[-1]} "
          f"({growth * 1024:.2f} KiB per extra image); holding every 1280-float feature in memory would add "
          f"{1280 * 4 / 1024:.0f} KiB per image")


if __name__ == "__main__":
    main()
