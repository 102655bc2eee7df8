"""CLI and API end to end on tiny generated images: train, evaluate --json, predict, exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, make_tree

import headstart
from headstart.cli import main


@pytest.fixture
def cli(run_cli):
    return run_cli


@pytest.fixture
def trained(tree, tmp_path, cli):
    out = tmp_path / "run"
    code, _stdout, err = cli("train", tree, "--out", out, "--cache-dir", tmp_path / "c", "--workers", "0",
                            "--val-split", "0.34", "--quiet")
    assert code == 0, err
    return out


def test_train_writes_a_complete_run(trained, tree):
    names = {p.name for p in trained.iterdir()}
    assert {"run.json", "head.safetensors", "head.safetensors.json", "metrics.json", "bad_files.json"} <= names
    info = json.loads((trained / "run.json").read_text())
    assert info["class_names"] == ["blue", "red"]
    assert info["backbone"]["name"] == "tf_efficientnet_lite0"
    assert len(info["backbone"]["weights_digest"]) == 64
    assert info["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == 1.0 and metrics["val"]["n_images"] == 4


def test_evaluate_json_shape(trained, tree, tmp_path, cli):
    code, out, _ = cli("evaluate", trained, tree, "--json", "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    for key in ("accuracy", "n_images", "per_class", "confusion_matrix", "class_names", "seconds"):
        assert key in result
    assert result["n_images"] == 12 and result["accuracy"] == 1.0
    assert set(result["per_class"]["red"]) == {"precision", "recall", "f1", "support"}
    assert np.array(result["confusion_matrix"]).sum() == 12


def test_evaluate_human_output(trained, tree, tmp_path, cli):
    code, out, _ = cli("evaluate", trained, tree, "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    assert code == 0 and out.startswith("accuracy 1.0000 on 12 images") and "confusion matrix" in out


def test_predict_formats(trained, tree, tmp_path, cli):
    common = ["--cache-dir", tmp_path / "c", "--workers", "0", "-q"]
    code, out, _ = cli("predict", trained, tree / "red", tree / "blue" / "blue_0.png", "--top-k", "2",
                       "--format", "json", *common)
    assert code == 0
    preds = json.loads(out)["predictions"]
    assert len(preds) == 7
    assert all(p["label"] == ("red" if "/red/" in p["path"] else "blue") for p in preds)
    assert all(len(p["top_k"]) == 2 and p["top_k"][0][1] >= p["top_k"][1][1] for p in preds)
    code, out, _ = cli("predict", trained, tree / "red", "--format", "csv", *common)
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["path", "label1", "p1"] and len(rows) == 7
    code, out, _ = cli("predict", trained, tree / "red" / "red_1.png", *common)
    assert code == 0 and "red" in out.splitlines()[1]


def test_predict_reports_bad_files(trained, tmp_path, cli):
    folder = tmp_path / "mixed"
    make_image(folder / "ok.png", (200, 20, 20))
    (folder / "broken.jpg").write_text("nope")
    code, out, err = cli("predict", trained, folder, "--format", "json", "--cache-dir", tmp_path / "c",
                         "--workers", "0", "-q")
    result = json.loads(out)
    assert code == 0 and len(result["predictions"]) == 1
    assert result["bad_files"][0]["path"].endswith("broken.jpg")
    assert "broken.jpg" in err


def test_features_command_and_warm_rerun(tree, tmp_path, cli):
    args = ["features", tree, "--cache-dir", tmp_path / "c", "--workers", "0", "--json", "-q"]
    code, out, _ = cli(*args)
    assert code == 0 and json.loads(out)["n_computed"] == 12
    code, out, _ = cli(*args)
    assert json.loads(out)["n_computed"] == 0 and json.loads(out)["n_cached"] == 12


def test_features_command_works_in_chunks_and_reports_every_bad_file(tree, tmp_path, cli, monkeypatch):
    import headstart.api

    monkeypatch.setattr(headstart.api, "EXTRACT_CHUNK", 5)  # 14 files: chunks of 5, 5 and 4
    (tree / "red" / "broken.jpg").write_bytes(b"not an image")
    (tree / "blue" / "empty.png").write_bytes(b"")
    code, out, _ = cli("features", tree, "--cache-dir", tmp_path / "c", "--workers", "0", "--json", "-q")
    result = json.loads(out)
    assert code == 0 and result["n_images"] == 14 and result["n_computed"] == 12 and result["n_bad"] == 2
    assert sorted(Path(b["path"]).name for b in result["bad_files"]) == ["broken.jpg", "empty.png"]


def test_train_with_other_head_settings_reuses_features(tree, tmp_path, cli):
    base = ["train", tree, "--cache-dir", tmp_path / "c", "--workers", "0", "-q", "--json"]
    code, out, _ = cli(*base, "--out", tmp_path / "r1")
    assert code == 0 and json.loads(out)["features"]["n_computed"] == 12
    code, out, _ = cli(*base, "--out", tmp_path / "r2", "--select", "none", "--head", "mlp", "--hidden", "16",
                       "--epochs", "3")
    assert code == 0 and json.loads(out)["features"]["n_computed"] == 0


def test_train_cv(tree, tmp_path, cli):
    code, out, _ = cli("train", tree, "--out", tmp_path / "r", "--cv", "3", "--val-split", "0",
                       "--cache-dir", tmp_path / "c", "--workers", "0", "-q", "--json")
    assert code == 0
    cv = json.loads(out)["cv"]
    assert cv["folds"] == 3 and len(cv["fold_accuracy"]) == 3 and cv["accuracy"] == 1.0


def test_backbones_command(cli):
    code, out, _ = cli("backbones", "tf_efficientnet_lite*", "--json")
    assert code == 0 and any(r["name"] == "tf_efficientnet_lite0" for r in json.loads(out))
    code, out, _ = cli("backbones", "tf_efficientnet_lite*", "--installed")
    assert "tf_efficientnet_lite0" in out and "lite4" not in out


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["train", "{missing}", "--out", "{tmp}/r"], 1, "does not exist"),
    (["train", "{tree}", "--out", "{tmp}/r", "--val-split", "1.5"], 2, "val_split"),
    (["train", "{tree}", "--out", "{tmp}/r", "--backbone", "resnet5O"], 2, "did you mean 'resnet50'"),
    (["train", "{tree}", "--out", "{tmp}/r", "--batch-size", "0"], 2, "batch_size"),
    (["train", "{tree}", "--out", "{tmp}/r", "--head", "mlp", "--epochs", "0"], 2, "epochs"),
    (["train", "{tree}", "--out", "{tmp}/r", "--weight-decay", "-1"], 2, "weight_decay"),
    (["evaluate", "{tmp}/no-run", "{tree}", "--workers", "-1"], 2, "num_workers (--workers)"),  # arguments first
    (["train", "{tree}", "--out", "{tmp}/r", "--head", "forest"], 2, "invalid choice"),
    (["train", "{tree}", "--out", "{tmp}/r", "--weight-decay", "0.1"], 2, "--select none"),
    (["train", "{tree}", "--out", "{tmp}/r", "--grid-C", "0,1"], 2, "C must list numbers > 0"),
    (["train", "{tree}", "--out", "{tmp}/r", "--grid-mlp", "x"], 2, "--grid-mlp"),
    (["train", "{tree}", "--out", "{tmp}/r", "--grid-max-images", "many"], 2, "--grid-max-images must be"),
    (["train", "{tree}", "--out", "{tree}/run"], 2, "is inside the data folder"),
    (["train", "{tree}", "--out", "{tmp}/r", "--select", "none", "--cv", "100"], 2, "smallest has 6); lower --cv"),
    (["train", "{tree}", "--out", "{tmp}/r", "--grid-max-images", "10"], 2, "max_images must be a whole number >= 100"),
    (["train", "{tree}", "--out", "{tmp}/r", "--select", "none", "--grid-C", "1"], 2, "need --select cv"),
    (["train", "{tree}", "--out", "{tmp}/r", "--budget", "5"], 2, "--freeze auto"),
    (["train", "{tree}", "--out", "{tmp}/r", "--freeze", "auto", "--budget", "-1"], 2, "budget"),
    (["train", "{tree}"], 2, "--out"),
    (["evaluate", "{tmp}/no-run", "{tree}"], 1, "does not exist"),
    (["predict", "{tmp}/no-run", "{tree}"], 1, "does not exist"),
    (["predict", "{tmp}/no-run", "{tree}", "--top-k", "x"], 2, "invalid int value"),
])
def test_exit_codes(tree, tmp_path, capsys, argv, code, message):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path, tree=tree) for a in argv]
    try:
        got = main([*argv, "-q", "--cache-dir", str(tmp_path / "c")])
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    err = capsys.readouterr().err
    assert got == code and message in err
    if code in (1, 2) and "invalid" not in message and message != "--out":
        assert len(err.strip().splitlines()) == 1  # a one-line reason, no traceback


def _failing_backbones(monkeypatch, exc):
    from headstart.cli import commands

    def fail(args):
        raise exc
    monkeypatch.setattr(commands, "cmd_backbones", fail)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    _failing_backbones(monkeypatch, RuntimeError("size mismatch for head.weight:\n  copying a param ..."))
    monkeypatch.delenv("HEADSTART_DEBUG", raising=False)
    assert main(["backbones"]) == 1
    assert capsys.readouterr().err == ("headstart backbones: failed: RuntimeError: size mismatch for head.weight: ... "
                                       "(run with --debug for the traceback)\n")
    for argv in (["--debug", "backbones"], ["backbones", "--debug"]):
        with pytest.raises(RuntimeError, match="size mismatch"):
            main(argv)
    monkeypatch.setenv("HEADSTART_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["backbones"])
    monkeypatch.setenv("HEADSTART_DEBUG", "0")
    assert main(["backbones"]) == 1


@pytest.mark.filterwarnings("always::UserWarning")
def test_warnings_are_one_line_naming_the_command(monkeypatch, capsys):
    import warnings

    from headstart.cli import commands

    def warn(args):
        warnings.warn("a library's note\nwith a second line", UserWarning, stacklevel=1)
        return 0
    monkeypatch.setattr(commands, "cmd_backbones", warn)
    before = warnings.showwarning
    assert main(["backbones"]) == 0
    assert capsys.readouterr().err == "headstart backbones: warning: a library's note with a second line\n"
    assert warnings.showwarning is before  # put back: the CLI's display lasts as long as its command


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: headstart" in capsys.readouterr().err


def test_out_folder_that_is_not_a_run_is_protected(tree, tmp_path, cli):
    out = tmp_path / "precious"
    make_image(out / "photo.png", (1, 1, 1))
    code, _, err = cli("train", tree, "--out", out, "-q", "--cache-dir", tmp_path / "c", "--workers", "0")
    assert code == 1 and "not a headstart run" in err and (out / "photo.png").exists()


def test_python_api_mirrors_cli(tree, tmp_path):
    run = headstart.train(tree, tmp_path / "run", cache_dir=tmp_path / "c", num_workers=0, progress=False,
                          val_split=0.34)
    assert run.class_names == ["blue", "red"]
    result = headstart.evaluate(tmp_path / "run", tree, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert result["accuracy"] == 1.0
    preds = headstart.predict(tmp_path / "run", [tree / "red"], cache_dir=tmp_path / "c", num_workers=0,
                              progress=False)["predictions"]
    assert {p["label"] for p in preds} == {"red"}
    with pytest.raises(headstart.UsageError, match="unknown train option"):
        headstart.train(tree, tmp_path / "r2", colour="blue")


def test_evaluate_refuses_unknown_classes(trained, tmp_path):
    other = make_tree(tmp_path / "other", per_class=1, classes=("red", "green"))
    with pytest.raises(headstart.DataError, match="green"):
        headstart.evaluate(trained, other, cache_dir=tmp_path / "c", progress=False)


def test_evaluate_refuses_other_weights(trained, tree, tmp_path, backbone):
    import torch

    path = tmp_path / "other.pth"
    state = {k: (v + 1 if v.is_floating_point() else v) for k, v in backbone.model.state_dict().items()}
    torch.save(state, path)
    with pytest.raises(headstart.RunError, match="digest"):
        headstart.evaluate(trained, tree, weights=str(path), cache_dir=tmp_path / "c", progress=False)


def test_class_left_without_usable_images(tmp_path):
    root = make_tree(tmp_path / "d", per_class=3, classes=("red",))
    for i in range(2):
        (root / "blue").mkdir(exist_ok=True)
        (root / "blue" / f"b{i}.jpg").write_bytes(b"")
    with pytest.raises(headstart.DataError, match=r"\['blue'\] have no usable training image"):
        headstart.train(root, tmp_path / "r", cache_dir=tmp_path / "c", num_workers=0, progress=False, val_split=0)


def test_run_with_relative_weights_path_works_from_elsewhere(tree, tmp_path, backbone, monkeypatch):
    import torch

    (tmp_path / "w").mkdir()
    torch.save(backbone.model.state_dict(), tmp_path / "w" / "lite0.pth")
    monkeypatch.chdir(tmp_path / "w")
    headstart.train(tree, tmp_path / "run", weights="lite0.pth", cache_dir=tmp_path / "c", num_workers=0,
                    progress=False, val_split=0)
    monkeypatch.chdir(tmp_path)
    preds = headstart.predict(tmp_path / "run", [tree / "red"], cache_dir=tmp_path / "c2", progress=False)
    assert len(preds["predictions"]) == 6
    (tmp_path / "w" / "lite0.pth").unlink()
    with pytest.raises(headstart.RunError, match="missing"):
        headstart.predict(tmp_path / "run", [tree / "red"], cache_dir=tmp_path / "c2", progress=False)


def test_run_on_random_weights_can_be_reloaded(tree, tmp_path):
    headstart.train(tree, tmp_path / "run", weights="random", cache_dir=tmp_path / "c", num_workers=0,
                    progress=False, val_split=0)
    result = headstart.evaluate(tmp_path / "run", tree, cache_dir=tmp_path / "c2", progress=False)
    assert result["n_images"] == 12


def test_no_usable_validation_image_still_saves_the_run(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=3)
    for c in ("red", "blue"):
        (tmp_path / "d" / "val" / c).mkdir(parents=True)
        (tmp_path / "d" / "val" / c / "x.jpg").write_bytes(b"")
    run = headstart.train(tmp_path / "d", tmp_path / "run", cache_dir=tmp_path / "c", progress=False)
    assert "val" not in run.metrics and run.metrics["n_train"] == 6


def test_evaluate_with_no_usable_image(trained, tmp_path, cli):
    (tmp_path / "bad" / "red").mkdir(parents=True)
    (tmp_path / "bad" / "red" / "x.jpg").write_text("no")
    code, _, err = cli("evaluate", trained, tmp_path / "bad", "--cache-dir", tmp_path / "c", "-q")
    assert code == 1 and "no usable image" in err


def test_predict_nothing_classified_exits_1(trained, tmp_path, cli):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("no")
    code, _, err = cli("predict", trained, tmp_path / "bad", "--cache-dir", tmp_path / "c", "-q")
    assert code == 1 and "no image could be classified" in err


def test_predict_csv_top_k_beyond_classes(trained, tree, tmp_path, cli):
    _code, out, _ = cli("predict", trained, tree / "red" / "red_0.png", "--format", "csv", "--top-k", "5",
                       "--cache-dir", tmp_path / "c", "-q")
    header, row = out.strip().split("\n")
    assert header == "path,label1,p1,label2,p2" and len(row.split(",")) == 5 and "\r" not in out


def test_damaged_run_is_a_clear_error(trained, tree, tmp_path, cli):
    (trained / "run.json").write_text("{ not json")
    code, _, err = cli("evaluate", trained, tree, "--cache-dir", tmp_path / "c", "-q")
    assert code == 1 and "damaged" in err


def test_evaluate_uses_the_runs_own_preprocessing(trained, tree, tmp_path):
    import json as _json

    info = _json.loads((trained / "run.json").read_text())
    info["data_config"]["input_size"] = [3, 160, 160]
    (trained / "run.json").write_text(_json.dumps(info))
    with headstart.FeatureCache(tmp_path / "c") as cache:
        before = cache.stats()["rows"]
    headstart.evaluate(trained, tree, cache_dir=tmp_path / "c", progress=False)
    with headstart.FeatureCache(tmp_path / "c") as cache:
        assert cache.stats()["rows"] == before + 12  # new preprocessing -> new features


# --------------------------------------------------------------------------- startup, shared choices and checks


def _subparser(name):
    from headstart.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _option(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_version_and_help_do_not_import_the_library():
    import subprocess
    import sys

    script = ("import sys\nfrom headstart.cli import main\n"
              "for argv in (['--version'], ['--help'], ['train', '--help'], ['sweep', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, argv\n"
              "print(sorted(m for m in ('torch', 'timm', 'sklearn', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert done.stdout.startswith(f"headstart {headstart.__version__}\n")
    done = subprocess.run([sys.executable, "-m", "headstart", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == f"headstart {headstart.__version__}\n"


def test_cli_choices_are_the_librarys_own():
    from headstart import _constants, heads, selection, tta
    from headstart.transforms import PRESETS

    train = _subparser("train")
    assert _option(train, "--head").choices is heads.HEAD_TYPES is _constants.HEAD_TYPES
    assert _option(train, "--augment").choices is PRESETS
    assert _option(train, "--backbone").default == _constants.DEFAULT_BACKBONE
    assert _option(_subparser("predict"), "--tta").choices is tta.TTA_MODES
    assert _option(_subparser("evaluate"), "--tta-average").choices is tta.AVERAGE_METHODS
    assert selection.Grid().head == heads.HEAD_TYPES and selection.DEFAULT_FOLDS == _constants.DEFAULT_FOLDS


def test_lazy_package_keeps_its_public_names():
    import subprocess
    import sys

    # a fresh interpreter: importing the submodule headstart.sweep first must not hide the function
    script = ("import headstart\nfrom headstart.sweep import rank_rows\n"
              "print(callable(headstart.sweep), headstart.sweep.__name__, callable(rank_rows))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["True", "sweep", "True"], done.stderr
    assert set(headstart.__all__) <= set(dir(headstart))
    assert headstart.UsageError.__module__ == "headstart.errors" and headstart.heads.HEAD_TYPES == ("linear", "mlp")
    with pytest.raises(AttributeError):
        _ = headstart.no_such_name


@pytest.mark.parametrize(("check", "value", "message"), [
    ("check_batch_size", 0, "batch_size must be a positive integer; got 0"),
    ("check_batch_size", True, "batch_size must be a positive integer; got True"),
    ("check_num_workers", -1, "num_workers must be an integer >= 0 (0 decodes in this process); got -1"),
    ("check_seed", -1, "seed must be an integer >= 0; got -1"),
    ("check_preset", "extreme", "augment must be one of none, light, standard, heavy; got 'extreme'"),
    ("check_head_type", "forest", "head must be one of linear, mlp; got 'forest'"),
    ("check_tta_mode", "3crop", "tta must be one of none, flip, 5crop, 10crop, multiscale; got '3crop'"),
    ("check_folds", 1, "folds must be an integer >= 2"),
])
def test_shared_checks_name_the_parameter(check, value, message):
    from headstart import _validation

    with pytest.raises(headstart.UsageError) as info:
        getattr(_validation, check)(value)
    assert str(info.value).startswith(message)
    getattr(_validation, check)({"check_preset": "light", "check_head_type": "mlp", "check_tta_mode": "flip",
                                 "check_folds": 2}.get(check, 1))  # a good value passes


def test_extract_is_the_features_command_under_the_apis_name():
    from headstart.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["extract", "photos"]).func is parser.parse_args(["features", "photos"]).func


def test_warm_train_builds_no_model_and_imports_no_dynamo(tree, tmp_path, cli):
    """A warm train (features, digest and classifier cached) needs neither timm nor ``torch._dynamo``.

    ``torch.optim`` imports ``torch._dynamo`` (2-3 s) on an optimizer's first use unless the linear head
    avoids it. A fresh interpreter: this test session may have imported both already.
    """
    import subprocess
    import sys

    base = ["train", str(tree), "--cache-dir", str(tmp_path / "c"), "--workers", "0", "-q"]
    assert cli(*base, "--out", tmp_path / "cold")[0] == 0
    script = ("import sys\nfrom headstart.cli import main\n"
              f"argv = {base!r}\n"
              "for i, extra in enumerate(([], ['--select', 'none', '--weight-decay', '0.01'])):\n"
              "    assert main([*argv, '--out', f'{sys.argv[1]}{i}', *extra]) == 0\n"
              "print(sorted(m for m in ('timm', 'torch._dynamo') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "warm")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    for i in (0, 1):
        assert json.loads((tmp_path / f"warm{i}" / "metrics.json").read_text())["features"]["n_computed"] == 0


def test_console_entry_leaves_the_exit_gc_nothing_to_do(monkeypatch, capsys):
    """Only the process entry (no ``argv``) freezes the objects left, which spares the exit's collections."""
    import gc
    import sys

    monkeypatch.setattr(sys, "argv", ["headstart", "backbones", "tf_efficientnet_lite0", "--json"])
    try:
        assert main() == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert main(["backbones", "tf_efficientnet_lite0", "--json"]) == 0 and gc.get_freeze_count() == 0
    assert capsys.readouterr().out.count('"name": "tf_efficientnet_lite0"') == 2


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux file systems take names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_cached_trained_on_and_predicted(tree, tmp_path, cli):
    odd = tree / "red" / os.fsdecode(b"\xff\xfeodd.png")  # bytes the OS gives back, not text
    shutil.copy(tree / "red" / "red_0.png", odd)
    for argv in (["features", tree, "--cache-dir", tmp_path / "c", "--workers", "0", "-q", "--json"],
                 ["train", tree, "--out", tmp_path / "run", "--cache-dir", tmp_path / "c", "--workers", "0", "-q"],
                 ["features", tree, "--cache-dir", tmp_path / "c", "--workers", "0", "-q", "--json"]):
        code, out, err = cli(*argv)
        assert code == 0, err
    assert json.loads(out)["n_cached"] == 13 and json.loads(out)["n_bad"] == 0  # its hash was memoised too
    code, out, err = cli("predict", tmp_path / "run", odd, "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    assert code == 0 and "red" in out, err


def test_copies_of_training_images_in_the_given_val_folder_are_warned_about_and_recorded(tmp_path, cli):
    make_tree(tmp_path / "d" / "train")
    make_tree(tmp_path / "d" / "val", per_class=2, classes=("blue", "red"))  # other seeds: not copies
    for name in ("red_4.png", "red_5.png"):  # byte copies: a leak
        shutil.copy(tmp_path / "d" / "train" / "red" / name, tmp_path / "d" / "val" / "red" / f"copy_{name}")
    code, out, err = cli("train", tmp_path / "d", "--out", tmp_path / "run", "--cache-dir", tmp_path / "c",
                         "--workers", "0", "--select", "none", "--json")
    assert code == 0 and "warning: 2 of 6 validation image(s) are byte-identical copies of training images" in err
    assert len(json.loads(out)["identical_in_train_and_val"]) == 2  # in --json too
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert sorted(Path(val).name for _, val in data["identical_in_train_and_val"]) == ["copy_red_4.png",
                                                                                      "copy_red_5.png"]
    code, _, err = cli("evaluate", tmp_path / "run", tmp_path / "d" / "val", "--report", tmp_path / "r.html",
                       "--cache-dir", tmp_path / "c", "--workers", "0", "-q")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert code == 0 and 'id="leakage"' in page and "copy_red_4.png" in page, err  # and in the report
