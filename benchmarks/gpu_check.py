"""Everything issue 12 asks of a lent GPU, in one run, one table: extraction, a fine-tuning epoch, a TTA pass.

usage (benchmarks/gpu_check.sh runs it):
    python benchmarks/gpu_check.py PHOTOS [--images 20000] [--batch-size 256] [--device cuda]

PHOTOS is a class-folder tree of real photos (../shared/data's sets, or the copy gpu_check.sh carries).
``--images`` JPEGs are made from them (random crop, mirror and JPEG quality each, so no two share a
cache entry) with a process per core. Rows, all in this process on this device:

  model only        the backbone's forward on a random batch (bf16 channels-last), after a warm-up
  hand-written      torchvision ImageFolder + DataLoader (a worker per core, pinned memory) with timm's eval
                    transform, forward bf16 channels-last: what a user writes without headstart
  headstart         extract_features into an empty cache: hashing, nvJPEG batch decode, batched resize,
                    forward, cache writes (headstart.gpu_decode)
  fine-tune epoch   ``headstart train PHOTOS --freeze 6 --epochs 1`` as a process (seconds, whole command)
  TTA pass          ``headstart evaluate RUN PHOTOS --tta 10crop`` as a process

Targets (issue 12, on an H100/H200-class GPU): headstart >= 10,000 img/s and >= 5x the hand-written
pipeline; features within cosine 0.99 of fp32 features of Pillow-decoded images (256 of them).
``--device cpu`` runs the same steps at a small size, to check the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch


def _make_one(job: tuple[str, str, int]) -> None:
    from PIL import Image, ImageOps

    source, target, seed = job
    rng = random.Random(seed)
    with Image.open(source) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        w, h = img.size
        scale = rng.uniform(0.7, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img.save(target, quality=rng.randint(80, 95))


def make_images(photos: Path, n: int, root: Path) -> Path:
    """``n`` JPEGs made from the photos under ``photos``, in the same class folders, one process per core."""
    sources = sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    jobs = []
    for i in range(n):
        source = sources[i % len(sources)]
        folder = root / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(source), str(folder / f"{i:06d}.jpg"), i))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_one, jobs, chunksize=64))
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(model: torch.nn.Module, shape: tuple[int, ...], batch: int, device: torch.device,
               seconds: float) -> float:
    x = torch.rand(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        _sync(device)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
        _sync(device)
    return done / (time.perf_counter() - start)


def hand_written(model: torch.nn.Module, data_config: dict, root: Path, batch: int,
                 device: torch.device) -> float:
    """ImageFolder + DataLoader + forward: images/s."""
    from timm.data import create_transform
    from torchvision import datasets

    dataset = datasets.ImageFolder(str(root), transform=create_transform(**data_config, is_training=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=os.cpu_count() or 1,
                                         pin_memory=device.type == "cuda")
    out = []
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for x, _ in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    _sync(device)
    return len(dataset) / (time.perf_counter() - start)


def _cosine_to_fp32(model: torch.nn.Module, data_config: dict, paths: list[Path], ours: np.ndarray,
                    device: torch.device) -> float:
    """The smallest cosine between ``ours`` and fp32 features of Pillow-decoded, timm-transformed ``paths``."""
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**data_config, is_training=False)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).to(device)
    with torch.inference_mode():
        ref = model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
    return float(((ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)).min())


def run_cli(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "headstart", *argv], capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"headstart {' '.join(argv)} failed with exit code {done.returncode}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds of the model-only row")
    args = parser.parse_args()
    from headstart.backbones import create_backbone
    from headstart.cache import FeatureCache
    from headstart.features import extract_features

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="headstart-gpu-check-"))
    rows: list[tuple[str, float, str]] = []
    try:
        start = time.perf_counter()
        root = make_images(args.photos, args.images, work / "images")
        print(f"made {args.images} JPEGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        bb = create_backbone("tf_efficientnet_lite0", "default")
        model = bb.model.to(device).eval().to(memory_format=torch.channels_last)
        limit = model_only(model, tuple(bb.data_config["input_size"]), args.batch_size, device, args.seconds)
        rows.append(("model only (bf16 channels-last)", limit, "img/s"))
        base = hand_written(model, bb.data_config, root, args.batch_size, device)
        rows.append(("hand-written pipeline", base, "img/s"))
        paths = sorted(root.rglob("*.jpg"))
        with FeatureCache(work / "cache") as cache:
            result = extract_features(bb, paths, cache=cache, device=device, precision="bf16",
                                      batch_size=args.batch_size, progress=False)
        rows.append(("headstart extract (cold cache)", result.images_per_second, "img/s"))
        rows.append(("  cosine to fp32 (Pillow decode), min of 256", _cosine_to_fp32(
            model, bb.data_config, paths[:256], result.features[:256], device), ""))
        rows.append(("fine-tune epoch (train --freeze 6 --epochs 1)", run_cli(
            ["train", str(args.photos), "--freeze", "6", "--epochs", "1", "--out", str(work / "run"),
             "--cache-dir", str(work / "cache"), "--quiet"]), "s"))
        rows.append(("TTA pass (evaluate --tta 10crop)", run_cli(
            ["evaluate", str(work / "run"), str(args.photos), "--tta", "10crop", "--cache-dir",
             str(work / "cache"), "--quiet"]), "s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.images} images, batch "
          f"{args.batch_size}")
    for label, value, unit in rows:
        print(f"  {label:<48} {value:>12.4g} {unit}")
    ratio = rows[2][1] / rows[1][1]
    print(f"  headstart / hand-written {ratio:.2f}x (target >= 5x); headstart {rows[2][1]:.0f} img/s (target >= "
          f"10,000 on an H100/H200); {100 * rows[2][1] / limit:.0f}% of the model alone")


if __name__ == "__main__":
    main()
