"""The HTML report: structure, escaping of hostile names, calibration numbers, atomic write, a real render."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from headstart.errors import UsageError
from headstart.metrics import classification_metrics
from headstart.report import expected_calibration_error, reliability_curve, write_report

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<script>alert(1)</script>"


class Page(HTMLParser):
    """Collects what the tests look at: section ids, headings, images, scripts and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self.images: list[dict[str, str]] = []
        self.scripts = 0
        self.text: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "h2":
            self._in_h2 = True
        if tag == "img":
            self.images.append(attrs)
        if tag in ("script", "iframe", "object", "embed", "link"):
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def example(tmp_path: Path, names=("ants", "bees", "wasps"), n=24, seed=0):
    rng = np.random.default_rng(seed)
    k = len(names)
    y = np.arange(n) % k
    logits = rng.normal(0, 1, (n, k)) + 2.5 * np.eye(k)[y]
    logits[: n // 4] = 4 * np.eye(k)[(y[: n // 4] + 1) % k]  # confident mistakes
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    paths = [str(make_image(tmp_path / "imgs" / f"img_{i}.png", (40 * (i % 6), 90, 160), size=64, seed=i))
             for i in range(n)]
    return proba, y, list(names), paths


def report(tmp_path, proba, y, names, paths, **kw):
    evaluation = classification_metrics(y, proba, names)
    evaluation.update({"run": "runs/demo", "data": "photos/", "ms_per_image": 3.2, "n_bad_files": 0})
    return write_report(tmp_path / "out" / "report.html", evaluation=evaluation, proba=proba, y_true=y,
                        class_names=names, image_paths=paths, **kw)


CURVES = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.6 + 0.1 * e} for e in (1, 2, 3)]
ABLATION = [{"setting": "single model", "accuracy": 0.95, "ms_per_image": 3.1},
            {"setting": "+TTA", "accuracy": 0.96, "ms_per_image": 30.4},
            {"setting": "+ensemble", "accuracy": 0.965, "ms_per_image": 6.2},
            {"setting": "both", "accuracy": 0.97, "ms_per_image": 61.0}]


def test_page_has_every_section_and_embeds_everything(tmp_path):
    proba, y, names, paths = example(tmp_path)
    out = report(tmp_path, proba, y, names, paths, curves=CURVES, ablation=ABLATION)
    page = parse(out)
    assert page.sections == ["summary", "per-class", "confusion", "calibration", "curves", "mistakes", "ablation"]
    assert "Confusion matrix" in page.headings and "Calibration" in page.headings
    assert page.scripts == 0
    assert all(img["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for img in page.images)
    plots = [img for img in page.images if img["src"].startswith("data:image/png")]
    thumbs = [img for img in page.images if img["src"].startswith("data:image/jpeg")]
    assert len(plots) == 3  # confusion, reliability, curves
    assert len(thumbs) == (proba.argmax(1) != y).sum() >= 6  # every mistake in the gallery
    thumb = Image.open(__import__("io").BytesIO(base64.b64decode(thumbs[0]["src"].split(",", 1)[1])))
    assert max(thumb.size) <= 128
    text = " ".join(page.text)
    for expected in ("+TTA", "both", "ants", "wasps", "ECE", "top-3 accuracy", "runs/demo"):
        assert expected in text
    assert "http://" not in out.read_text() and "https://" not in out.read_text()


def test_optional_sections_are_left_out(tmp_path):
    proba, y, names, paths = example(tmp_path)
    assert parse(report(tmp_path, proba, y, names, paths)).sections == [
        "summary", "per-class", "confusion", "calibration", "mistakes"]


def test_hostile_names_render_as_text(tmp_path):
    names = [HOSTILE, "a$b$ \\frac{1}{0} $", 'quo"te & <b>bold</b> 🐝']
    proba, y, _, _ = example(tmp_path, names=names)
    folder = tmp_path / HOSTILE.replace("/", "∕")  # a class folder named like the class
    paths = [str(make_image(folder / f'<img src=x onerror="alert(2)">_{i}.png', (200, 50, 50), seed=i))
             for i in range(len(y))]
    out = report(tmp_path, proba, y, names, paths, ablation=[{"setting": HOSTILE, "accuracy": 0.5}])
    raw = out.read_text(encoding="utf-8")
    assert "<script" not in raw and "<b>bold" not in raw and "onerror=\"" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    page = parse(out)
    assert page.scripts == 0
    text = "".join(page.text)
    assert HOSTILE in text and '<img src=x onerror="alert(2)">_' in text  # shown as text, not markup


def test_calibration_is_zero_when_calibrated_and_positive_when_overconfident():
    rng = np.random.default_rng(0)
    n = 100_000
    confidence = rng.uniform(0.5, 1.0, n)
    y = (rng.uniform(size=n) >= confidence).astype(np.int64)  # class 0 is right with probability `confidence`
    proba = np.stack([confidence, 1 - confidence], axis=1)
    assert expected_calibration_error(proba, y) < 0.01
    overconfident = np.stack([np.full(n, 0.99), np.full(n, 0.01)], axis=1)
    y_half = (rng.uniform(size=n) < 0.5).astype(np.int64)
    assert expected_calibration_error(overconfident, y_half) == pytest.approx(0.49, abs=0.01)


def test_reliability_curve_bins():
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    curve = reliability_curve(proba, y, n_bins=10)
    assert curve["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]  # 0.55 and 0.6 are in (0.5, 0.6]
    assert curve["accuracy"][9] == 0.5 and curve["confidence"][9] == pytest.approx(0.95)
    assert np.isnan(curve["accuracy"][0])
    assert expected_calibration_error(proba, y, n_bins=10) == pytest.approx((2 * 0.45 + 2 * 0.425) / 4)


def test_no_mistakes_and_unreadable_images(tmp_path):
    proba, y, names, paths = example(tmp_path)
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert "No mistakes" in report(tmp_path, perfect, y, names, paths).read_text()
    missing = [str(tmp_path / "gone" / f"{i}.jpg") for i in range(len(y))]
    page = report(tmp_path, proba, y, names, missing).read_text()
    assert "image unavailable" in page


def test_bad_arguments(tmp_path):
    proba, y, names, paths = example(tmp_path)
    with pytest.raises(UsageError, match="image_paths"):
        report(tmp_path, proba, y, names, paths[:-1])
    with pytest.raises(UsageError, match="columns"):
        write_report(tmp_path / "r.html", evaluation={}, proba=proba, y_true=y, class_names=names[:2],
                     image_paths=paths)
    with pytest.raises(UsageError, match="y_true"):
        write_report(tmp_path / "r.html", evaluation={}, proba=proba, y_true=y[:-1], class_names=names,
                     image_paths=paths)


def test_write_is_atomic_and_replaces(tmp_path):
    proba, y, names, paths = example(tmp_path)
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    target.write_text("old")
    out = report(tmp_path, proba, y, names, paths)
    assert out == target and out.read_text().startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(target.parent)) == ["report.html"]  # no temporary file left behind


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium to render the page")
def test_page_renders_in_a_headless_browser(tmp_path):
    proba, y, names, paths = example(tmp_path, names=(HOSTILE, "bees", "wasps"))
    out = report(tmp_path, proba, y, names, paths, curves=CURVES, ablation=ABLATION)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000"]
    try:
        subprocess.run([str(CHROMIUM), *flags, out.resolve().as_uri()], capture_output=True, timeout=120,
                       check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 120 s")
    if not shot.exists():
        pytest.skip("chromium ran but wrote no screenshot (a sandboxed or broken install)")
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2000, 1200)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, plots and thumbnails, not a blank page
    assert (image < 100).all(axis=2).mean() > 0.002  # some dark pixels: text was drawn
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_leaked_pairs_are_a_warning_at_the_top(tmp_path):
    proba, y, names, paths = example(tmp_path)
    pairs = [(paths[0], paths[1]), (f"train/{HOSTILE}.png", "val/copy.png")]
    page = parse(report(tmp_path, proba, y, names, paths, leakage=pairs))
    assert page.sections == ["leakage", "summary", "per-class", "confusion", "calibration", "mistakes"]
    text = " ".join(page.text)
    assert "2 validation image(s) are byte-identical copies of training images" in text
    assert f"train/{HOSTILE}.png" in text and page.scripts == 0
