"""Shared fixtures: tiny images made in code, a seeded RNG, the real default backbone once per session."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANTS_BEES = SHARED / "data" / "ants_bees_train"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _torch_engine():
    """``auto`` means the PyTorch engine, whose forwards the tests count and whose numbers they compare
    (tests/test_engines.py runs OpenVINO on purpose); session-wide, so module fixtures see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSTART_ENGINE", "torch")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache from tests."""
    monkeypatch.setenv("HEADSTART_CACHE_DIR", str(tmp_path / "default-cache"))


def make_image(path: Path, color: tuple[int, int, int], size: int = 48, seed: int = 0, mode: str = "RGB") -> Path:
    """A noisy solid-colour image: classes of different colours are easy to tell apart."""
    rng = np.random.default_rng(seed)
    array = np.clip(np.asarray(color, dtype=np.float64) + rng.normal(0, 20, (size, size, 3)), 0, 255)
    image = Image.fromarray(array.astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def make_tree(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("red", "blue"), ext: str = "png") -> Path:
    for c in classes:
        for i in range(per_class):
            make_image(root / c / f"{c}_{i}.{ext}", COLORS[c], seed=100 * classes.index(c) + i)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def backbone():
    from headstart.backbones import create_backbone

    return create_backbone("tf_efficientnet_lite0")


@pytest.fixture
def cache(tmp_path):
    from headstart.cache import FeatureCache

    with FeatureCache(tmp_path / "cache") as c:
        yield c


def truncated_jpeg(path: Path) -> Path:
    make_image(path.with_suffix(".full.jpg"), (120, 120, 120), size=96)
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from headstart.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run
