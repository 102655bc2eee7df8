"""Real photos: the offline demo, and ants/bees from ../shared (skipped when shared/ is absent)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ANTS_BEES, truncated_jpeg

import headstart
from headstart.cli import main

needs_shared = pytest.mark.skipif(not ANTS_BEES.is_dir(), reason="../shared/data/ants_bees_train not present")


def test_demo_runs_offline_and_learns(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "c"), "--json", "-q"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["n_train"] == 160 and summary["n_val"] == 40
    assert summary["accuracy"] >= 0.9
    assert (tmp_path / "demo" / "run" / "run.json").is_file()


@needs_shared
def test_ants_bees_with_broken_files_still_trains(tmp_path):
    data = tmp_path / "ants_bees"
    shutil.copytree(ANTS_BEES, data)
    (data / "ants" / "zero_bytes.jpg").write_bytes(b"")
    truncated_jpeg(data / "bees" / "truncated.jpg")
    run = headstart.train(data, tmp_path / "run", cache_dir=tmp_path / "c", progress=False, val_split=0.2)
    bad = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    names = {item["path"].rsplit("/", 1)[-1]: item["reason"] for item in bad}
    assert "zero_bytes.jpg" in names and "truncated.jpg" in names
    assert "empty file" in names["zero_bytes.jpg"] and "cannot decode" in names["truncated.jpg"]
    assert run.metrics["val"]["accuracy"] >= 0.9
    assert run.metrics["n_train"] + run.metrics["val"]["n_images"] == 245  # 247 files, 2 skipped
