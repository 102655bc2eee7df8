"""Augmentation wired into training: the augmented feature cache, PCA statistics, the preview command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.cli import parse_aug_params
from headstart.errors import UsageError


def test_train_with_augmented_views(tree, tmp_path):
    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False, "val_split": 0.34}
    run = headstart.train(tree, tmp_path / "run", augment="light", aug_views=2, **kw)
    assert run.metrics["features"]["views_per_train_image"] == 3  # clean + 2 augmented
    assert run.metrics["features"]["n_computed"] == 8 * 3 + 4  # train views + clean val views
    aug = run.info["augmentation"]
    assert aug["views"] == 2 and aug["pipeline"]["preset"] == "light"
    again = headstart.train(tree, tmp_path / "run2", augment="light", aug_views=2, **kw)
    assert again.metrics["features"]["n_computed"] == 0
    more = headstart.train(tree, tmp_path / "run3", augment="light", aug_views=3, **kw)
    assert more.metrics["features"]["n_computed"] == 8  # only view index 2 is new
    assert headstart.evaluate(tmp_path / "run", tree, cache_dir=tmp_path / "c", progress=False)["accuracy"] == 1.0


def test_augmented_views_are_reproducible_across_workers(tree, tmp_path, backbone):
    from headstart.cache import FeatureCache
    from headstart.features import augmented_views, extract_views
    from headstart.transforms import build_pipeline

    paths = sorted(tree.rglob("*.png"))
    views = augmented_views(build_pipeline("standard", size=224), backbone.data_config, 2, seed=3)
    results = []
    for workers in (0, 2):
        with FeatureCache(tmp_path / f"c{workers}") as cache:
            results.append(extract_views(backbone, paths, views, cache=cache, num_workers=workers,
                                         batch_size=4, progress=False).features)
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.allclose(results[0][:, 0], results[0][:, 1])  # two different views


def test_aug_views_without_preset_is_a_usage_error(tree, tmp_path, run_cli):
    code, _, err = run_cli("train", tree, "--out", tmp_path / "r", "--aug-views", "4", "-q")
    assert code == 2 and "--augment" in err
    with pytest.raises(UsageError, match="augment must be one of"):
        headstart.train(tree, tmp_path / "r", augment="extreme", progress=False)


def test_parse_aug_params():
    assert parse_aug_params(["affine.degrees=20", "crop.scale=[0.5, 1.0]", "render.padding_mode=edge"]) == {
        "affine": {"degrees": 20}, "crop": {"scale": [0.5, 1.0]}, "render": {"padding_mode": "edge"}}
    with pytest.raises(UsageError, match=r"STEP\.PARAM=VALUE"):
        parse_aug_params(["degrees=20"])


def test_aug_param_reaches_the_saved_pipeline(tree, tmp_path, run_cli):
    code, _, err = run_cli("train", tree, "--out", tmp_path / "r", "--augment", "standard", "--aug-views", "1",
                           "--aug-param", "affine.degrees=33", "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    assert code == 0, err
    pipeline = json.loads((tmp_path / "r" / "run.json").read_text())["augmentation"]["pipeline"]
    assert "33" in json.dumps(pipeline)


def test_pca_stats_command(tree, tmp_path, run_cli):
    code, out, _ = run_cli("pca-stats", tree, "--json", "--cache-dir", tmp_path / "c", "-q")
    stats = json.loads(out)
    assert code == 0 and stats["n_images"] == 12 and len(stats["eigvals"]) == 3
    assert stats["eigvals"][0] >= stats["eigvals"][1] >= stats["eigvals"][2] >= 0
    code, out, _ = run_cli("pca-stats", tree, "--cache-dir", tmp_path / "c", "-q")
    assert code == 0 and "component 1" in out


def test_augment_preview_writes_two_rows_per_image(tree, tmp_path, run_cli):
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli("augment-preview", tree, "--out", out, "--n", "3", "--views", "4", "--size", "64",
                                "--cache-dir", tmp_path / "c", "--json", "-q")
    assert code == 0, err
    summary = json.loads(stdout)
    assert len(summary["images"]) == 3
    with Image.open(out) as grid:
        grid.load()
        width, height = grid.size
    assert height == 2 * 3 * (height // 6) and width == 4 * (height // 6)
    code, _, err = run_cli("augment-preview", tree, "--out", tmp_path / "grid.jpg", "-q")
    assert code == 2 and ".png" in err
