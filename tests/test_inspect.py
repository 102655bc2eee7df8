"""`headstart inspect`: label errors, near-duplicates across splits, outliers, the page and the fix manifest.

The photos are crops of the images that ship with scikit-image (textures against scenes), so the test
runs offline; one inspection is shared by the module."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.inspection.confident import find_label_issues
from headstart.inspection.output import write_findings

TEXTURES = ("grass", "gravel", "brick")
SIZE = 256  # pixels of a crop: larger than the network's input, like a photo
SCENES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def _crops(name: str, n: int, rng: np.random.Generator) -> list[Image.Image]:
    import skimage.data

    array = getattr(skimage.data, name)()
    image = Image.fromarray(array).convert("RGB")
    out = []
    for _ in range(n):
        x, y = rng.integers(0, image.width - SIZE), rng.integers(0, image.height - SIZE)
        out.append(image.crop((int(x), int(y), int(x) + SIZE, int(y) + SIZE)))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/ + val/ of textures and scenes, with planted copies across the splits (mild and strong), a
    flat image and a texture filed under scenes."""
    root = tmp_path_factory.mktemp("inspect") / "data"
    rng = np.random.default_rng(0)
    for label, sources in (("textures", TEXTURES), ("scenes", SCENES)):
        images = [c for name in sources for c in _crops(name, 12 // len(sources) + 2, rng)][:14]
        for i, image in enumerate(images):
            split = "train" if i < 10 else "val"
            (root / split / label).mkdir(parents=True, exist_ok=True)
            image.save(root / split / label / f"{label}_{i}.png")
    original = Image.open(root / "train" / "scenes" / "scenes_0.png")
    buffer = io.BytesIO()
    original.resize((248, 248)).save(buffer, format="JPEG", quality=95)  # resized and recompressed
    (root / "val" / "scenes" / "copy_of_scenes_0.jpg").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    Image.open(root / "train" / "scenes" / "scenes_1.png").resize((128, 128)).save(buffer, format="JPEG", quality=60)
    (root / "val" / "scenes" / "small_copy_of_scenes_1.jpg").write_bytes(buffer.getvalue())  # half size, q60
    Image.new("RGB", (SIZE, SIZE), (128, 128, 128)).save(root / "train" / "scenes" / "flat.png")
    _crops("gravel", 1, np.random.default_rng(7))[0].save(root / "train" / "scenes" / "mislabelled.png")
    return root


@pytest.fixture(scope="module")
def inspected(data, tmp_path_factory):
    from headstart.cli import main

    out = tmp_path_factory.mktemp("inspect-out")
    stdout = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(stdout):
        code = main(["inspect", str(data), "--out", str(out / "found"), "--fix", str(data.parent / "fixed.csv"),
                     "--cache-dir", str(out / "cache"), "--workers", "0", "--json", "-q"])
    assert code == 0
    return json.loads(stdout.getvalue()), out


def test_json_has_every_finding(inspected):
    found, _ = inspected
    assert {"label_issues", "near_duplicates", "outliers", "classes", "exact_duplicates"} <= set(found)
    assert set(found["classes"]) == {"scenes", "textures"}
    assert all({"count", "cv_accuracy", "confused_with"} <= set(c) for c in found["classes"].values())
    assert all({"path", "given", "suggested", "confidence"} <= set(t) for t in found["label_issues"])


def test_the_texture_filed_under_scenes_is_a_label_issue(inspected):
    found, _ = inspected
    issues = {Path(t["path"]).name: t for t in found["label_issues"]}
    assert issues["mislabelled.png"]["given"] == "scenes" and issues["mislabelled.png"]["suggested"] == "textures"


def test_a_resized_recompressed_copy_across_train_and_val_is_leakage(inspected):
    found, _ = inspected
    pairs = {frozenset((Path(d["a"]).name, Path(d["b"]).name)): d for d in found["near_duplicates"]}
    planted = pairs[frozenset(("scenes_0.png", "copy_of_scenes_0.jpg"))]
    assert planted["across_splits"] and planted["similarity"] >= found["near_duplicate_threshold"]


def test_a_half_size_low_quality_copy_is_found_by_its_thumbnail(inspected):
    found, _ = inspected
    pairs = {frozenset((Path(d["a"]).name, Path(d["b"]).name)): d for d in found["near_duplicates"]}
    planted = pairs[frozenset(("scenes_1.png", "small_copy_of_scenes_1.jpg"))]
    assert planted["across_splits"] and planted["thumbnail_similarity"] >= found["thumbnail_threshold"]
    assert planted["similarity"] < found["near_duplicate_threshold"]  # the features alone miss it ...


def test_features_alone_miss_the_small_copy(inspected, data, run_cli):
    _, out = inspected
    code, stdout, _ = run_cli("inspect", data, "--out", out / "features-only", "--thumbnail-near", "off",
                              "--cache-dir", out / "cache", "--workers", "0", "--json", "-q")
    found = json.loads(stdout)
    names = {frozenset((Path(d["a"]).name, Path(d["b"]).name)) for d in found["near_duplicates"]}
    assert code == 0 and found["thumbnail_threshold"] is None  # ... as --thumbnail-near off shows
    assert frozenset(("scenes_1.png", "small_copy_of_scenes_1.jpg")) not in names
    assert frozenset(("scenes_0.png", "copy_of_scenes_0.jpg")) in names


def test_every_csv_row_has_every_column(inspected):
    _, out = inspected
    rows = list(csv.reader((out / "found" / "findings.csv").read_text(encoding="utf-8").splitlines()))
    assert len(rows) > 5 and {len(r) for r in rows} == {len(rows[0])}
    assert {r[0] for r in rows[1:]} >= {"label_issue", "near_duplicate"}


def test_the_flat_image_is_the_first_outlier(inspected):
    found, _ = inspected
    assert Path(found["outliers"][0]["path"]).name == "flat.png"


def test_the_page_and_files_are_written(inspected):
    found, _ = inspected
    page = Path(found["files"]["html"]).read_text(encoding="utf-8")
    assert "mislabelled.png" in page and "<script" not in page and 'id="leakage"' in page
    rows = Path(found["files"]["csv"]).read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("kind,path") and any(r.startswith(("outlier,", "far,")) for r in rows)


def test_the_fix_manifest_trains(inspected, data, tmp_path, run_cli):
    found, out = inspected
    fix = found["fix"]
    assert fix["relabelled"] + fix["dropped"] == len(found["label_issues"])
    manifest = Path(fix["manifest"])
    rows = manifest.read_text(encoding="utf-8").splitlines()
    assert "train/scenes/mislabelled.png,scenes" not in rows  # relabelled or left out
    code, _, err = run_cli("train", manifest, "--out", tmp_path / "run", "--cache-dir", out / "cache",
                           "--workers", "0", "--select", "none", "-q")
    assert code == 0, err


def test_class_names_are_escaped_in_the_page(tmp_path):
    hostile = "<script>alert(1)</script>"
    findings = {"data": f"data/{hostile}", "n_images": 2, "setting": hostile, "near_duplicate_threshold": 0.93,
                "thumbnail_threshold": 0.985,
                "label_issues": [{"path": f"{hostile}.png", "given": hostile, "suggested": "b", "confidence": 0.9}],
                "near_duplicates": [], "exact_duplicates": [], "outliers": [],
                "classes": {hostile: {"count": 1, "cv_accuracy": 1.0, "confused_with": []}}}
    page = Path(write_findings(findings, tmp_path)["html"]).read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_confident_learning_finds_flipped_labels():
    rng = np.random.default_rng(0)
    n, k = 600, 3
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 3.5 * np.eye(k)[true]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = true.copy()
    flipped = rng.choice(n, 30, replace=False)
    given[flipped] = (given[flipped] + 1) % k
    found = {t.index for t in find_label_issues(proba, given)}
    hits = len(found & set(flipped.tolist()))
    assert hits / len(flipped) >= 0.8 and hits / len(found) >= 0.8
    assert find_label_issues(np.eye(k)[true] * 0.98 + 0.01, true) == []  # clean labels: nothing flagged


def test_an_image_predicted_as_its_given_label_is_not_flagged():
    """Two flipped images (labelled 0, class 1 likelier) set the count to 2; the image with the lowest
    self-confidence is an ambiguous one whose most probable class is still its label: not flagged."""
    proba = np.array([[0.9, 0.05, 0.05]] * 8 + [[0.25, 0.5, 0.25]] * 8 + [[0.05, 0.05, 0.9]] * 8
                     + [[0.4, 0.3, 0.3], [0.45, 0.55, 0.0], [0.46, 0.54, 0.0]])
    given = np.array([0] * 8 + [1] * 8 + [2] * 8 + [0, 0, 0])
    found = find_label_issues(proba, given)
    assert [(t.index, t.suggested) for t in found] == [(25, 1)]  # not 24 (0.40 of its label), nor 26 (3rd)


def test_the_count_rounds_each_cell_of_the_joint():
    """Class 0's row of the confident joint (8, 1, 1 of 14 images) calibrates to 11.2, 1.4, 1.4: 2 errors by
    cell (1 + 1), not round(2.8) = 3, so image 34 (labelled 1, unsure: no class reaches its threshold) is
    not flagged though its given label is not its most probable one."""
    rows = [[0.9, 0.05, 0.05]] * 8 + [[0.5, 0.25, 0.25]] * 4 + [[0.02, 0.96, 0.02], [0.02, 0.02, 0.96]]
    rows += [[0.05, 0.9, 0.05]] * 10 + [[0.05, 0.05, 0.9]] * 10 + [[0.55, 0.4, 0.05]]
    given = np.array([0] * 14 + [1] * 10 + [2] * 10 + [1])
    assert [t.index for t in find_label_issues(np.array(rows), given)] == [12, 13]


def test_the_evaluation_report_links_the_findings(inspected, data, tmp_path, run_cli):
    found, out = inspected
    code, _, err = run_cli("train", data, "--out", tmp_path / "run", "--cache-dir", out / "cache", "--workers", "0",
                           "--select", "none", "-q")
    assert code == 0, err
    code, _, err = run_cli("evaluate", tmp_path / "run", data, "--report", tmp_path / "r.html", "--cache-dir",
                           out / "cache", "--workers", "0", "-q")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert code == 0 and "inspection findings" in page and Path(found["files"]["html"]).name in page, err


def test_a_large_set_is_ranked_on_a_sample_and_cross_fitted_on_every_image():
    from headstart.inspection.findings import cross_fit, group_folds
    from headstart.selection import Grid, select_head

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 200)
    x = (rng.normal(0, 1, (600, 16)) + 2.0 * np.eye(3, 16)[y]).astype(np.float32)
    groups = [f"g{i // 2}" for i in range(600)]  # pairs of identical files
    selection = select_head(x, y, grid=Grid(max_images=150, source=("pooled",), mlp=()), groups=groups)
    assert selection.sample is not None
    oof = cross_fit(selection, x, y, groups, 0, None)
    assert oof.shape == (600, 3) and np.allclose(oof.sum(1), 1) and (oof.argmax(1) == y).mean() > 0.8
    folds = group_folds(y, groups, 5, 0)
    assert all(folds[i] == folds[i + 1] for i in range(0, 600, 2))  # a group stays in one fold
    assert {int((folds[y == c] == f).sum()) for c in range(3) for f in range(5)} == {40}  # stratified


def test_thumbnails_are_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from headstart.cache import FeatureCache
    from headstart.inspection import thumbnails as module

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    real, decoded = module.thumbnail, []
    monkeypatch.setattr(module, "thumbnail", lambda path: decoded.append(path) or real(path))
    keys = ["a", "b", "a"]  # the third is an exact copy of the first
    with FeatureCache(tmp_path / "cache") as cache:
        first = module.thumbnails(paths, keys, cache)
    assert set(decoded) == set(paths[:2]) and len(decoded) == 2 and np.array_equal(first[0], first[2])
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-3)
    with FeatureCache(tmp_path / "cache") as cache:
        again = module.thumbnails(paths, keys, cache)
    assert len(decoded) == 2 and np.allclose(first, again, atol=1e-3)  # (the cache may store float16)
    with FeatureCache(tmp_path / "cache") as cache:  # a file without a content key: computed, never stored
        module.thumbnails(paths[:1], [None], cache)
        module.thumbnails(paths[:1], [None], cache)
    assert len(decoded) == 4


@pytest.mark.parametrize("given", [{"near_duplicate": 1.5}, {"near_duplicate": 0}, {"thumbnail_near": 2.0},
                                   {"thumbnail_near": "abc"}])
def test_similarity_thresholds_are_checked_before_any_file_is_read(given, tmp_path):
    from headstart.errors import UsageError
    from headstart.inspection import inspect

    name = next(iter(given))
    with pytest.raises(UsageError, match=f"{name} \\(--{name.replace('_', '-')}\\) must be"):
        inspect(tmp_path / "missing", out=tmp_path / "out", **given)
