"""Self-checking saved data: what is damaged, deleted or mixed up is detected, named, and refused or recovered.

Sections:

* run folders -- ``run.json`` records the head's classes and a sha256 digest of every other file of the
  run; :func:`headstart.load_run` refuses a run whose parts disagree with one line naming the file and
  saying "train it again". One run per module is trained and copied for each test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree

import headstart
from headstart.errors import RunError
from headstart.heads import LinearHead
from headstart.runs import EnsembleRun, Run, combine_runs, load_run, write_run

# ------------------------------------------------------------------------------------------ run folders

HEAD = "head.safetensors"
HEAD_JSON = "head.safetensors.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs trained once per module: ``two`` (blue, red) and ``three`` (blue, green, red)."""
    root = tmp_path_factory.mktemp("runs")
    common = {"cache_dir": root / "cache", "num_workers": 0, "progress": False, "val_split": 0, "select": "none"}
    made = {}
    for name, classes in (("two", ("red", "blue")), ("three", ("red", "blue", "green"))):
        data = make_tree(root / f"data_{name}", per_class=3, classes=classes)
        headstart.train(data, root / name, **common)
        made[name] = root / name
    return made


@pytest.fixture
def run(runs, tmp_path) -> Path:
    """A fresh copy of the two-class run, to damage."""
    return Path(shutil.copytree(runs["two"], tmp_path / "run"))


def refused(path: Path, *fragments: str) -> str:
    """Load ``path``, expect one :class:`RunError` line naming the folder and ``fragments``; return it."""
    with pytest.raises(RunError) as caught:
        load_run(path)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("train it again"), message
    assert f"run folder '{path}" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def legacy(path: Path) -> Path:
    """``path`` as an older headstart wrote it: no digests in run.json."""
    edit_json(path / "run.json", lambda info: info.pop("artifacts"))
    return path


def test_a_run_records_every_file_and_the_heads_classes_and_loads_silently(run, capsys):
    info = json.loads((run / "run.json").read_text())
    files = {p.name for p in run.iterdir()} - {"run.json"}
    assert set(info["artifacts"]) == files and {HEAD, HEAD_JSON} <= files
    assert all(len(d["sha256"]) == 64 and d["bytes"] == (run / n).stat().st_size for n, d in info["artifacts"].items())
    assert info["class_names"] == json.loads((run / HEAD_JSON).read_text())["classes"] == ["blue", "red"]
    loaded = load_run(run)
    assert isinstance(loaded, Run) and loaded.class_names == ["blue", "red"]
    assert capsys.readouterr().err == ""


def test_zeroed_head_of_the_same_size_is_refused(run):
    size = (run / HEAD).stat().st_size
    (run / HEAD).write_bytes(bytes(size))
    refused(run, HEAD, "cannot be read as safetensors")


def test_truncated_head_is_refused(run):
    data = (run / HEAD).read_bytes()
    (run / HEAD).write_bytes(data[: len(data) // 2])
    refused(run, HEAD, "truncated")


def test_bit_flipped_head_is_refused(run):
    data = bytearray((run / HEAD).read_bytes())
    data[-1] ^= 0x01  # in the tensors: the file still loads
    (run / HEAD).write_bytes(bytes(data))
    refused(run, HEAD, "does not match the digest recorded in run.json")


def test_garbage_head_is_refused(run):
    (run / HEAD).write_bytes(b"not a safetensors file" * 10)
    refused(run, HEAD, "cannot be read as safetensors")


@pytest.mark.parametrize("name", [HEAD, HEAD_JSON, "metrics.json", "bad_files.json"])
def test_deleted_artifact_is_refused(run, name):
    (run / name).unlink()
    refused(run, f"{name} is missing")


def test_swapped_class_order_in_the_heads_json_is_refused(run):
    edit_json(run / HEAD_JSON, lambda meta: meta["classes"].reverse())
    refused(run, HEAD_JSON, "['red', 'blue']", "in another order")


def test_extra_class_in_run_json_is_refused(run):
    edit_json(run / "run.json", lambda info: info["class_names"].append("ghost"))
    refused(run, HEAD_JSON, "'ghost'", "other classes")


def test_head_json_that_is_not_json_is_refused(run):
    (run / HEAD_JSON).write_text("{ not json")
    refused(run, HEAD_JSON, "not valid JSON")


def test_edited_head_shape_is_refused(run):
    edit_json(run / HEAD_JSON, lambda meta: meta.update(n_features_in=meta["n_features_in"] - 1))
    refused(run, HEAD, "'1.weight' of shape (2, 1280)", "1279 features) needs (2, 1279)")


def test_head_with_values_that_are_not_finite_is_refused(run):
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / HEAD)
    tensors["1.weight"][0, 0] = float("nan")
    save_file(tensors, run / HEAD)
    refused(run, HEAD, "not finite")


def test_head_tensors_of_another_shape_are_refused(run, runs):
    shutil.copy(runs["three"] / HEAD, run / HEAD)  # three classes' tensors under two classes' settings
    refused(run, HEAD, "of shape (3,", "needs (2,")


def test_head_of_a_run_with_other_classes_is_refused(run, runs):
    for name in (HEAD, HEAD_JSON):
        shutil.copy(runs["three"] / name, run / name)
    refused(run, HEAD_JSON, "'green'", "other classes")


def test_head_on_other_features_is_refused(run):
    rng = np.random.default_rng(0)
    LinearHead().fit(rng.normal(size=(8, 16)), ["blue", "red"] * 4).save(run / HEAD)
    refused(run, HEAD, "takes 16 features", "gives 1280")


def test_head_of_another_run_with_the_same_classes_and_shape_is_refused(run):
    rng = np.random.default_rng(0)
    LinearHead().fit(rng.normal(size=(8, 1280)), ["blue", "red"] * 4).save(run / HEAD)
    refused(run, "does not match the digest recorded in run.json")


def test_legacy_run_without_digests_loads_with_one_warning(run, capsys):
    loaded = load_run(legacy(run))
    assert loaded.class_names == ["blue", "red"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be verified" in err and str(run) in err


def test_legacy_run_still_gets_the_class_and_loading_checks(run, capsys):
    legacy(run)
    edit_json(run / HEAD_JSON, lambda meta: meta["classes"].reverse())
    refused(run, "in another order")
    edit_json(run / HEAD_JSON, lambda meta: meta["classes"].reverse())
    (run / "metrics.json").write_text("{ not json")
    refused(run, "metrics.json is damaged")


def test_digests_entry_that_was_edited_is_refused(run):
    edit_json(run / "run.json", lambda info: info["artifacts"].pop(HEAD))
    refused(run, f"records no digest for {HEAD}")
    edit_json(run / "run.json", lambda info: info.update(artifacts={"../elsewhere": {"sha256": "0", "bytes": 1}}))
    refused(run, "'artifacts' entry is malformed")


def test_fine_tuned_weights_in_the_run_are_verified(runs, tmp_path):
    source = Run.load(runs["two"])
    info = {k: v for k, v in source.info.items() if k not in ("format", "artifacts")}
    info["backbone"] = {**info["backbone"], "weights": "run:backbone.safetensors"}
    out = write_run(tmp_path / "tuned", info, source.head, {}, [], extra={"backbone.safetensors": b"weights" * 100})
    assert "backbone.safetensors" in json.loads((out / "run.json").read_text())["artifacts"]
    Run.load(out)
    (out / "backbone.safetensors").write_bytes(b"weights" * 50)
    refused(out, "backbone.safetensors does not match the digest", "350 bytes, not 700")
    edit_json(out / "run.json", lambda i: i["artifacts"].pop("backbone.safetensors"))
    refused(out, "records no digest for backbone.safetensors")


def test_a_run_whose_head_disagrees_with_its_classes_is_not_written(runs, tmp_path):
    source = Run.load(runs["two"])
    info = {**source.info, "class_names": ["red", "blue"]}
    with pytest.raises(RunError, match="same order"):
        write_run(tmp_path / "bad", info, source.head, {}, [])
    assert not (tmp_path / "bad").exists()


def test_ensemble_checks_its_members(runs, tmp_path, capsys):
    ensemble = tmp_path / "ens"
    combine_runs([runs["two"], runs["two"]], ensemble)
    assert isinstance(load_run(ensemble), EnsembleRun) and capsys.readouterr().err == ""
    damaged = Path(shutil.copytree(ensemble, tmp_path / "damaged"))
    (damaged / "members" / "1" / HEAD).write_bytes(bytes((damaged / "members" / "1" / HEAD).stat().st_size))
    refused(damaged / "members" / "1", HEAD)
    with pytest.raises(RunError, match=r"members/1'?: head\.safetensors"):
        load_run(damaged)
    mixed = Path(shutil.copytree(ensemble, tmp_path / "mixed"))
    shutil.rmtree(mixed / "members" / "0")
    shutil.copytree(runs["three"], mixed / "members" / "0")  # a member of another run
    refused(mixed, "members/0/run.json", "does not match the digest")
    edited = Path(shutil.copytree(ensemble, tmp_path / "edited"))
    edit_json(edited / "run.json", lambda info: info["class_names"].append("ghost"))
    refused(edited, "members/0 predicts the classes", "'ghost'")


def test_legacy_ensemble_warns_once(runs, tmp_path, capsys):
    ensemble = tmp_path / "ens"
    combine_runs([runs["two"], runs["two"]], ensemble)
    legacy(ensemble)
    for member in ("0", "1"):
        legacy(ensemble / "members" / member)
    load_run(ensemble)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run folder '{ensemble}'" in err


def test_cli_predict_on_a_damaged_run_exits_1_with_one_line(run, tmp_path, run_cli):
    (run / HEAD).write_bytes(bytes((run / HEAD).stat().st_size))
    image = make_tree(tmp_path / "img", per_class=1) / "red" / "red_0.png"
    code, out, err = run_cli("predict", run, image, "--cache-dir", tmp_path / "c", "-q")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("headstart predict: error: run folder")
    assert HEAD in err and err.rstrip().endswith("train it again")
