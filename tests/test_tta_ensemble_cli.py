"""TTA, ensembles and the report through the API and CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_tree

import headstart
from headstart import training
from headstart.cache import CacheWarning
from headstart.errors import RunError
from headstart.runs import EnsembleRun, load_run


@pytest.fixture
def single(tree, tmp_path):
    headstart.train(tree, tmp_path / "single", cache_dir=tmp_path / "c", num_workers=0, progress=False,
                    val_split=0.34)
    return tmp_path / "single"


def test_evaluate_with_tta_json(single, tree, tmp_path, run_cli):
    code, out, err = run_cli("evaluate", single, tree, "--tta", "10crop", "--json", "--cache-dir", tmp_path / "c",
                             "--workers", "0", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["tta"] == "10crop" and result["ensemble_size"] == 1 and result["ms_per_image"] > 0
    assert result["ablation"][0]["setting"] == "single model + 10crop TTA" and result["accuracy"] == 1.0


def test_tta_views_are_cached(single, tree, tmp_path):
    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False}
    headstart.evaluate(single, tree, tta="flip", **kw)
    with headstart.FeatureCache(tmp_path / "c") as cache:
        before = cache.stats()["rows"]
    headstart.evaluate(single, tree, tta="flip", **kw)
    with headstart.FeatureCache(tmp_path / "c") as cache:
        assert cache.stats()["rows"] == before  # nothing new: the mirror crops came from the cache


def test_evaluate_recomputes_crop_features_whose_shard_vanished(single, tree, tmp_path):
    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False}
    first = headstart.evaluate(single, tree, tta="flip", **kw)
    for shard in (tmp_path / "c" / "shards").rglob("*.npy"):
        shard.unlink()
    with pytest.warns(CacheWarning, match="missing"):
        again = headstart.evaluate(single, tree, tta="flip", **kw)
    assert again["accuracy"] == first["accuracy"] and again["n_images"] == first["n_images"]
    with headstart.FeatureCache(tmp_path / "c") as cache:
        assert cache.stats()["bytes"] > 0  # the features were computed and cached again


def test_predict_with_tta(single, tree, tmp_path):
    result = headstart.predict(single, [tree / "red"], tta="5crop", tta_average="geomean",
                               cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert {p["label"] for p in result["predictions"]} == {"red"} and result["tta"] == "5crop"


def test_train_ensemble_and_ablation(tree, tmp_path, run_cli):
    code, out, err = run_cli("train", tree, "--out", tmp_path / "ens", "--ensemble", "2", "--val-split", "0.34",
                             "--cache-dir", tmp_path / "c", "--workers", "0", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ensemble_size"] == 2 and "val" in summary
    run = load_run(tmp_path / "ens")
    assert isinstance(run, EnsembleRun) and len(run.members) == 2
    info = [m.info for m in run.members]
    assert info[0]["config"]["bootstrap"] != info[1]["config"]["bootstrap"]  # members differ in their data
    assert run.metrics["val"] == _scored_on_val(run, tree, tmp_path / "c")  # members' own probabilities, averaged
    assert not (tmp_path / ".ens.members").exists()
    code, out, err = run_cli("evaluate", tmp_path / "ens", tree, "--tta", "flip", "--ablation", "--json",
                             "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    result = json.loads(out)
    assert code == 0 and result["ensemble_size"] == 2
    assert [r["setting"] for r in result["ablation"]] == [
        "single model", "single model + flip TTA", "ensemble of 2", "ensemble of 2 + flip TTA"]
    assert all(r["ms_per_image_cold"] > 0 and 0 <= r["accuracy"] <= 1 for r in result["ablation"])


def _scored_on_val(run, tree, cache_dir, val_split=0.34):
    """Validation metrics of a saved run, scored from the cache on the split that training made."""
    from headstart.data import load_images
    from headstart.inference import run_probabilities
    from headstart.metrics import classification_metrics
    from headstart.train_common import split_train_val

    with headstart.FeatureCache(cache_dir) as cache:
        _, val_set, *_ = split_train_val(load_images(tree, val_split=0), training.TrainConfig(val_split=val_split),
                                        cache, progress=False)
        probs = run_probabilities(run, val_set.paths, cache, num_workers=0, progress=False)
    return json.loads(json.dumps(classification_metrics(val_set.labels[probs.ok], probs.proba, run.class_names)))


def test_interrupted_ensemble_resumes_with_its_finished_members(tree, tmp_path, capsys):
    from headstart.train_ensemble import train_ensemble

    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "val_split": 0.34, "ensemble": 2}

    def dies_at_the_second_member(config, data, out, progress):
        if out.name == "1":
            raise KeyboardInterrupt
        return training._train_single(config, data, out, progress)

    config = training.TrainConfig(**{**kw, "cache_dir": str(kw["cache_dir"])})
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(config, tree, tmp_path / "ens", False, train_member=dies_at_the_second_member)
    capsys.readouterr()
    run = headstart.train(tree, tmp_path / "ens", resume=True, **kw)
    assert "ensemble member 1/2: already trained, kept" in capsys.readouterr().err
    assert isinstance(run, EnsembleRun) and len(run.members) == 2
    assert run.metrics == load_run(tmp_path / "ens").metrics and "val" in run.metrics
    assert run.metrics["val"] == _scored_on_val(run, tree, tmp_path / "c")
    assert [m.path for m in run.members] == [tmp_path / "ens" / "members" / "0", tmp_path / "ens" / "members" / "1"]


def test_runs_names_still_import_from_inference():
    import headstart.inference as inference

    assert inference.load_run is load_run and inference.EnsembleRun is EnsembleRun
    assert inference.combine_runs is headstart.runs.combine_runs


def test_ensemble_of_identical_members_equals_the_member(single, tree, tmp_path, run_cli):
    code, _, err = run_cli("ensemble", single, single, "--out", tmp_path / "twice")
    assert code == 0, err
    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False}
    a = headstart.predict(single, [tree], top_k=2, **kw)["predictions"]
    b = headstart.predict(tmp_path / "twice", [tree], top_k=2, **kw)["predictions"]
    for x, y in zip(a, b):
        assert x["label"] == y["label"]
        np.testing.assert_allclose([p for _, p in x["top_k"]], [p for _, p in y["top_k"]], atol=1e-12)


def test_ensemble_refuses_different_classes(single, tmp_path, run_cli):
    other = make_tree(tmp_path / "other", per_class=4, classes=("red", "green"))
    headstart.train(other, tmp_path / "other_run", cache_dir=tmp_path / "c", num_workers=0, progress=False,
                    val_split=0)
    code, _, err = run_cli("ensemble", single, tmp_path / "other_run", "--out", tmp_path / "bad")
    assert code == 1 and "green" in err and "blue" in err
    with pytest.raises(RunError):
        headstart.make_ensemble([single, tmp_path / "other_run"], tmp_path / "bad2")


def test_report_escapes_names_from_the_data(tmp_path, run_cli):
    root = make_tree(tmp_path / "d", per_class=4)
    evil = "<img src=x onerror=alert(1)>"  # a folder name cannot hold '/', so no closing tag
    shutil.move(str(root / "red"), str(root / evil))
    code, _, err = run_cli("train", root, "--out", tmp_path / "r", "--val-split", "0", "--cache-dir", tmp_path / "c",
                           "--workers", "0", "-q")
    assert code == 0, err
    code, out, err = run_cli("evaluate", tmp_path / "r", root, "--report", tmp_path / "report.html",
                             "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "Ablation" in html and "report written to" in out


def test_nested_ensemble_keeps_the_inner_ensembles_weight(single, tree, tmp_path):
    headstart.make_ensemble([single, single], tmp_path / "inner")
    headstart.train(tree, tmp_path / "third", cache_dir=tmp_path / "c", num_workers=0, progress=False, val_split=0)
    outer = headstart.make_ensemble([tmp_path / "inner", tmp_path / "third"], tmp_path / "outer", member_weights=[1, 3])
    assert len(outer.members) == 3
    np.testing.assert_allclose(np.asarray(outer.member_weights) / sum(outer.member_weights), [0.125, 0.125, 0.75])


def test_predict_on_an_empty_folder(single, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("predict", single, tmp_path / "empty", "--cache-dir", tmp_path / "c", "-q")
    assert code == 1 and "no image could be classified" in err
