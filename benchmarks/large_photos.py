"""Large photos: decoding 12-megapixel JPEGs at reduced scale vs in full, for the clean view (and TTA multiscale).

usage:
    python benchmarks/large_photos.py [DATA] [--n 20] [--repeats 3] [--grain 6] [--backbone tf_efficientnet_lite0]

DATA defaults to ../shared/data/ants_bees_train beside this repository. ``--n`` of its photos are upscaled
(bicubic) to 4000 x 3000 (every third one portrait, 3000 x 4000; every fourth stored on its side with EXIF
orientation 6), given ``--grain`` grey levels of Gaussian noise so that they carry fine detail and about the
bytes of a phone photo (2.5 MB at 6), and saved as quality-90 JPEGs in a temporary folder.

Per image, in one thread (as in a DataLoader worker), the bytes already in memory, median of ``--repeats``
(full and drafted in turns):
  full     ``decode_bytes(data)`` + the clean view's transform (the backbone's eval resize, crop, normalise)
  drafted  ``decode_bytes(data, min_size=view.min_size)`` + the same transform: JPEG DCT scaling to the
           smallest 1/2, 1/4, 1/8 that keeps both sides >= DRAFT_MARGIN x the eval resize (what
           ``clean_view(data_config)`` asks for)
Features: the backbone's pooled features (fp32) of both; cosine per image. The same is measured for the
multiscale TTA views (6 per image; the largest asks for 1.143 x the resize), and for the data set's own
photos at their own size, where reduced-scale decoding does not trigger.

Target (issue 12): 12-megapixel photos >= 3x faster to decode + resize, features within cosine 0.99.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SIZE = (4000, 3000)


def make_large_photos(sources: list[Path], folder: Path, grain: float) -> list[Path]:
    """12-megapixel JPEGs made from ``sources``: upscaled, grained, some portrait, some stored sideways."""
    rng = np.random.default_rng(0)
    out = []
    for i, source in enumerate(sources):
        size = SIZE[::-1] if i % 3 == 2 else SIZE
        image = Image.open(source).convert("RGB").resize(size, Image.BICUBIC)
        if grain > 0:
            noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, grain, (size[1], size[0], 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        if i % 4 == 3:  # stored turned a quarter, shown upright after the EXIF transpose
            image = image.transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = 6
        path = folder / f"photo_{i:02d}.jpg"
        image.save(path, "JPEG", quality=90, exif=exif.tobytes())
        out.append(path)
    return out


def view_tensors(data: bytes, views, draft: bool, key: str) -> list[torch.Tensor]:
    """Every view of one image, as extraction makes them: in full, or one decode per JPEG scale the views need."""
    from headstart.data import decode_bytes, draft_scale

    if not draft or len({view.min_size for view in views}) == 1:
        image = decode_bytes(data, min_size=views[0].min_size if draft else None)
        return [view.transform(image, key) for view in views]
    decoded: dict[int, object] = {}
    out = []
    for view in views:
        scale = draft_scale(data, view.min_size)
        if scale not in decoded:
            decoded[scale] = decode_bytes(data, min_size=view.min_size)
        out.append(view.transform(decoded[scale], key))
    return out


def per_image_ms(blobs: list[bytes], views, repeats: int) -> tuple[list[float], list[float]]:
    """Median ms per image of its decode(s) + every view's transform, full and drafted, in one thread.

    The two are timed in turns, image by image (after one untimed turn), so load on the machine hits both alike.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    full, drafted = [], []
    for i, data in enumerate(blobs):
        runs: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats + 1):
            for draft in (False, True):
                start = time.perf_counter()
                view_tensors(data, views, draft, str(i))
                if repeat:
                    runs[draft].append(time.perf_counter() - start)
        full.append(1000 * statistics.median(runs[False]))
        drafted.append(1000 * statistics.median(runs[True]))
    torch.set_num_threads(threads)
    return full, drafted


def features(backbone, blobs: list[bytes], views, draft: bool) -> np.ndarray:
    """Pooled fp32 features ``(n, len(views), dim)``."""
    with torch.inference_mode():
        return np.stack([backbone.model(torch.stack(view_tensors(data, views, draft, str(i)))).float().numpy()
                         for i, data in enumerate(blobs)])


def compare(name: str, backbone, blobs: list[bytes], views, repeats: int) -> dict:
    """One table row: ``views`` of every image from a full decode vs from reduced-scale decodes."""
    from headstart.data import draft_scale

    full_ms, draft_ms = per_image_ms(blobs, views, repeats)
    a, b = features(backbone, blobs, views, False), features(backbone, blobs, views, True)
    cos = ((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min(axis=1)
    scales = sorted({draft_scale(d, v.min_size) for d in blobs for v in views})
    return {"name": name, "n": len(blobs), "views": len(views), "mb": np.mean([len(d) for d in blobs]) / 1e6,
            "scale": "/".join(f"1/{s}" for s in scales), "full": statistics.median(full_ms),
            "draft": statistics.median(draft_ms), "speedup": sum(full_ms) / sum(draft_ms),
            "cos_min": float(cos.min()), "cos_med": float(np.median(cos))}


def print_table(rows: list[dict]) -> None:
    header = (f"{'':34} {'images':>6} {'views':>5} {'MB/img':>6} {'scale':>9} {'full ms':>8} {'draft ms':>8} "
              f"{'speed-up':>8} {'cos min':>8} {'cos med':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:34} {r['n']:6d} {r['views']:5d} {r['mb']:6.2f} {r['scale']:>9} {r['full']:8.1f} "
              f"{r['draft']:8.1f} {r['speedup']:7.2f}x {r['cos_min']:8.5f} {r['cos_med']:8.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(SHARED / "data" / "ants_bees_train"))
    parser.add_argument("--n", type=int, default=20, help="12-megapixel photos to make (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per image; the median counts (default 3)")
    parser.add_argument("--grain", type=float, default=6.0, help="noise std in grey levels (default 6)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = parser.parse_args()
    sources = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if len(sources) < args.n:
        sys.exit(f"need {args.n} JPEG photos under '{args.data}'; found {len(sources)}")
    sources = sources[:: max(1, len(sources) // args.n)][: args.n]  # spread over the classes

    import headstart
    from headstart.features import clean_view
    from headstart.tta import tta_views

    backbone = headstart.create_backbone(args.backbone)
    backbone.model.eval()
    clean, multiscale = [clean_view(backbone.data_config)], tta_views(backbone.data_config, "multiscale")
    with tempfile.TemporaryDirectory() as tmp:
        large = [p.read_bytes() for p in make_large_photos(sources, Path(tmp), args.grain)]
    own = [p.read_bytes() for p in sources]
    rows = [compare("12 MP, clean view", backbone, large, clean, args.repeats),
            compare("12 MP, multiscale TTA", backbone, large, multiscale, args.repeats),
            compare("own size, clean view", backbone, own, clean, args.repeats)]
    sizes = sorted({Image.open(p).size for p in sources}, key=lambda s: s[0] * s[1])
    print(f"backbone {args.backbone}: eval resize {clean[0].min_size}, input {backbone.data_config['input_size']}; "
          f"12 MP = {SIZE[0]}x{SIZE[1]} q90 JPEGs with {args.grain:g} grey levels of grain; own photos "
          f"{sizes[0][0]}x{sizes[0][1]} .. {sizes[-1][0]}x{sizes[-1][1]}")
    print(f"ms = median per image of decode + transform(s), one thread; speed-up = total full / total drafted; "
          f"cos = per image, the lowest over its views; {args.repeats} repeats")
    print_table(rows)
    head = rows[0]
    ok = head["speedup"] >= 3 and head["cos_min"] >= 0.99
    print(f"\ntarget (12 MP clean view: >= 3x faster, cosine >= 0.99): {head['speedup']:.2f}x, "
          f"min cosine {head['cos_min']:.4f} -> {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
