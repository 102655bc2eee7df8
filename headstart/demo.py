"""``headstart demo``: the whole recipe on real photos that ship inside scikit-image, offline.

scikit-image's ``lfw_subset`` holds 200 real 25x25 greyscale crops: 100 faces from the
Labeled Faces in the Wild set and 100 non-face patches of natural images. The demo writes them
as PNG files in class folders (``face/``, ``non_face/``), trains a head on the default backbone
with a stratified 20% hold-out, evaluates it, and prints where everything was saved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .api import train


def write_demo_images(folder: str | os.PathLike[str]) -> Path:
    """Write the 200 lfw_subset crops to ``folder/face`` and ``folder/non_face``; returns ``folder``."""
    from skimage.data import lfw_subset

    folder = Path(folder)
    images = lfw_subset()  # (200, 25, 25) floats in [0, 1]: faces first, then non-faces
    half = len(images) // 2
    for i, image in enumerate(images):
        label = "face" if i < half else "non_face"
        path = folder / label / f"{label}_{i % half:03d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    return folder


def run_demo(out: str | os.PathLike[str] = "headstart-demo", *, cache_dir: str | os.PathLike[str] | None = None,
             batch_size: int = 32, num_workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the demo images under ``out/data``, train a run at ``out/run``, and summarise."""
    out = Path(out)
    data = write_demo_images(out / "data")
    run = train(data, out / "run", progress=progress, cache_dir=cache_dir, batch_size=batch_size,
                num_workers=num_workers, val_split=0.2, seed=0)
    val = run.metrics["val"]
    text = "\n".join([
        "headstart demo: face vs non-face on 200 real photos from scikit-image's LFW subset",
        f"  backbone   {run.backbone_name} (frozen, ImageNet weights)",
        f"  head       {run.info['head']['setting']}, chosen by {run.metrics['cv']['folds']}-fold CV among "
        f"{run.metrics['cv']['selected_among']} settings (CV accuracy {run.metrics['cv']['accuracy']:.4f})",
        f"  trained on {run.metrics['n_train']} images in {run.metrics['seconds']:.1f}s "
        f"(features {run.metrics['features']['n_computed']} computed, {run.metrics['features']['n_cached']} cached)",
        f"  validation accuracy {val['accuracy']:.4f} on {val['n_images']} held-out images",
        f"  run saved to {run.path}",
        f"  next: headstart predict {run.path} {data / 'face'} --top-k 2",
        f"        headstart evaluate {run.path} {data}",
    ])
    return {"text": text, "run": str(run.path), "data": str(data), "accuracy": val["accuracy"],
            "n_val": val["n_images"], "n_train": run.metrics["n_train"], "seconds": run.metrics["seconds"]}
