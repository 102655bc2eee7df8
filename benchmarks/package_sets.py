"""Small image sets built from images that installed packages ship, for benchmarks beside ../shared/data.

* :func:`write_digits` -- scikit-learn's 8x8 handwritten digits, 10 classes (a domain far from
  ImageNet's photos, where frozen features are weakest).
* :func:`write_faces` -- scikit-image's ``lfw_subset``: 100 25x25 faces and 100 non-faces (nearly
  separable for a pre-trained network: the case where over-confidence shows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_digits(root: Path, per_class: int) -> Path:
    """scikit-learn's handwritten digits as class folders of 64x64 grey PNGs (the first ``per_class`` each)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target):
        if seen.get(int(label), 0) >= per_class:
            continue
        seen[int(label)] = seen.get(int(label), 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (255 - image * 255 / 16).astype(np.uint8)  # dark ink on white
        Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).save(folder / f"{label}_{seen[int(label)]:03d}.png")
    return root


def write_faces(root: Path) -> Path:
    """scikit-image's ``lfw_subset`` as ``face/`` and ``non_face/`` folders of 25x25 grey PNGs."""
    from PIL import Image
    from skimage.data import lfw_subset

    images = lfw_subset()  # the first 100 are faces, the other 100 are not
    for i, image in enumerate(images):
        folder = root / ("face" if i < 100 else "non_face")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{folder.name}_{i % 100:03d}.png")
    return root
