"""Augmentation speed: headstart.transforms vs torchvision v2, images per second on one core.

usage:
    python benchmarks/augment.py [DATA] [--seconds 0.6] [--images 48]

DATA defaults to ../shared/data/ants_bees_train beside this repository (synthetic 500x375 images when
it is absent). Images are decoded once to uint8 (3, H, W) tensors; every row then runs headstart's
transform and torchvision v2's nearest equivalent on the same images in the same process, with
torch.set_num_threads(1). Per-transform rows work at 224 px (images resized and centre-cropped
first), except the random-resized crop and the presets, which start from the full decoded images.

Targets: every transform at least as fast as torchvision's equivalent; PCA colour >= 1,000 img/s
(a published single-threaded implementation: ~107 img/s); the standard preset >= 500 img/s.
torchvision's affine rows use bilinear interpolation (its default is nearest) to compare like with like.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from headstart.transforms import (
    ChannelShift,
    ElasticWarp,
    GridDistortion,
    PCAColor,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    build_pipeline,
    functional,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ants_bees_train"
BILINEAR = v2.InterpolationMode.BILINEAR


def load_images(folder: Path, limit: int) -> tuple[list[torch.Tensor], str]:
    """Up to ``limit`` decoded images as uint8 tensors, or synthetic ones when the folder is missing."""
    from headstart.data import decode_image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    if paths:
        images = [torch.from_numpy(np.array(decode_image(p))).permute(2, 0, 1).contiguous() for p in paths]
        return images, f"{len(images)} images from {folder}"
    rng = np.random.default_rng(0)
    smooth = [torch.from_numpy(rng.integers(0, 256, (3, 375, 500), dtype=np.uint8)) for _ in range(limit)]
    return smooth, f"{limit} synthetic 500x375 images ({folder} not found)"


def rate(fn: Callable[[object], object], images: list, seconds: float) -> float:
    """Images per second of ``fn`` cycling over ``images`` for about ``seconds`` (after one warm-up pass)."""
    for img in images[:4]:
        fn(img)
    done, start = 0, time.perf_counter()
    while True:
        for img in images:
            fn(img)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default=str(DATA))
    parser.add_argument("--seconds", type=float, default=0.6, help="time per row and library")
    parser.add_argument("--images", type=int, default=48, help="images to cycle over")
    args = parser.parse_args()
    torch.set_num_threads(1)
    full, source = load_images(Path(args.data), args.images)
    small = [functional.resize_center_crop(img, (224, 224)) for img in full]
    gen = torch.Generator().manual_seed(0)

    def ours(t):
        return lambda img: t(img, generator=gen)

    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    rows: list[tuple[str, list, Callable, Callable | None, str]] = [
        ("flip p=0.5", small, ours(RandomHorizontalFlip()), v2.RandomHorizontalFlip(), "v2.RandomHorizontalFlip"),
        ("crop 224, padding 16", small, ours(RandomCrop(224, padding=16)), v2.RandomCrop(224, padding=16),
         "v2.RandomCrop"),
        ("random-resized crop 224", full, ours(RandomResizedCrop(224)), v2.RandomResizedCrop(224, antialias=True),
         "v2.RandomResizedCrop"),
        ("affine rot 10, shear 5", small, ours(RandomAffine(10, shear=5)),
         v2.RandomAffine(10, shear=5, interpolation=BILINEAR), "v2.RandomAffine (bilinear)"),
        ("affine rot 10, shear 5", small, ours(RandomAffine(10, shear=5)), v2.RandomAffine(10, shear=5),
         "v2.RandomAffine (nearest, its default)"),
        ("elastic alpha 6, sigma 40", small, ours(ElasticWarp(6, 40)), v2.ElasticTransform(),
         "v2.ElasticTransform (defaults)"),
        ("grid distortion 5, 0.25", small, ours(GridDistortion(5, 0.25)), None, "(none in torchvision)"),
        ("channel shift +-10", small, ours(ChannelShift(10)), jitter, "v2.ColorJitter(.2,.2,.2) (reference)"),
        ("PCA colour 0.1", small, ours(PCAColor(0.1)), None, "published impl. ~107 img/s"),
    ]
    reference_presets = {
        "none": v2.Compose([v2.Resize(224, antialias=True), v2.CenterCrop(224)]),
        "light": v2.Compose([v2.RandomResizedCrop(224, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]),
        "standard": v2.Compose([v2.RandomResizedCrop(224, scale=(0.25, 1.0), antialias=True),
                                v2.RandomHorizontalFlip(), v2.RandomAffine(10, shear=5, interpolation=BILINEAR)]),
        "heavy": v2.Compose([v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                             v2.RandomAffine(25, shear=(-10, 10, -5, 5), interpolation=BILINEAR),
                             v2.ElasticTransform()]),
    }
    for name, reference in reference_presets.items():
        rows.append((f"preset {name}", full, ours(build_pipeline(name)), reference,
                     "v2 geometry only" if name in ("standard", "heavy") else "v2.Compose equivalent"))
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in full]
    standard = build_pipeline("standard")
    rows.append(("preset standard, PIL input", pil, ours(standard), v2.Compose([v2.PILToTensor(),
                 *reference_presets["standard"].transforms]), "v2 geometry only, PIL input"))

    print(f"torch {torch.__version__}, 1 thread; {source}")
    print(f"{'transform':28} {'headstart img/s':>16} {'torchvision img/s':>18} {'ratio':>6}  reference")
    for name, images, mine, theirs, note in rows:
        ours_rate = rate(mine, images, args.seconds)
        slow = theirs is not None and "Elastic" in repr(theirs)
        theirs_rate = rate(theirs, images[:8] if slow else images, args.seconds) if theirs is not None else None
        ratio = f"{ours_rate / theirs_rate:6.1f}" if theirs_rate else "     -"
        shown = f"{theirs_rate:18.0f}" if theirs_rate else f"{'-':>18}"
        print(f"{name:28} {ours_rate:16.0f} {shown} {ratio}  {note}", flush=True)


if __name__ == "__main__":
    main()
