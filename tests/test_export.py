"""headstart export: the graph computes what the run computes, in ONNX Runtime, for every kind of run.

Runs are trained once per module on tiny images made in code: a linear head, an MLP head, an ensemble
of those two (weighted 3:1) and a run fine-tuned above ``--freeze 6``. Each export is verified by
``export`` itself (ONNX Runtime against torch fp32 and against ``headstart predict``); the tests check
the figures, the file (dynamic batch, metadata) and the model card, the int8 path, the CLI and its errors.
Cheap unit tests cover the reference preprocessing, the 10-crop geometry and the head's arithmetic.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, make_tree
from PIL import Image

import headstart
from headstart.data import decode_image
from headstart.errors import ExportError, UsageError
from headstart.export import read_metadata
from headstart.export_graph import ExportedModel, HeadLogits, Member, Views, graph_input_spec
from headstart.heads import LinearHead, MLPHead
from headstart.onnx_input import input_spec, prepare_image
from headstart.runs import EnsembleRun, Run, load_run
from headstart.tta import crop_boxes
from headstart.views import clean_view

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DATA_CONFIG = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """linear, mlp, ensemble (linear + mlp, weights 3:1) and finetuned (--freeze 6, one epoch), one cache."""
    root = tmp_path_factory.mktemp("export")
    data = make_tree(root / "data", per_class=4)
    # fp32 features: with bf16 (AMX CPUs), a feature that is tiny in fp32 can be 0 on all 8 training images, and
    # the head's standardisation then multiplies it by 1e6 in the fp32 graph (export_check.head_gain)
    common = {"cache_dir": root / "cache", "num_workers": 0, "progress": False, "val_split": 0, "select": "none",
              "precision": "fp32"}
    headstart.train(data, root / "linear", **common)
    headstart.train(data, root / "mlp", head="mlp", **common)
    headstart.make_ensemble([root / "linear", root / "mlp"], root / "ensemble", member_weights=[3, 1])
    headstart.train(data, root / "finetuned", freeze="6", finetune={"epochs": 1, "batch_size": 4}, **common)
    return {"root": root, "data": data, "cache": root / "cache",
            **{name: root / name for name in ("linear", "mlp", "ensemble", "finetuned")}}


def check_verified(result: dict, run_dir: Path) -> None:
    """The export's own checks passed and say so in figures; the file runs any batch size."""
    check = result["verification"]
    assert check["ok"] and check["n_images"] == 8 and not check["skipped"]
    assert check["pixels"]["n"] == 8 and check["pixels"]["max_abs_diff"] == 0
    assert check["torch"]["max_abs_diff"] <= 1e-4 and check["torch"]["top1_agree"] == 8
    predict = check["predict"]
    assert predict["max_abs_diff"] <= predict["tolerance"] and predict["top1_agree"] + predict["near_ties"] == 8
    meta = read_metadata(result["path"])
    assert meta["classes"] == load_run(run_dir).class_names == ["blue", "red"]
    assert meta["input"] == result["input"] and meta["input"]["size"] == [224, 224] and meta["tta"] == "none"
    assert [m["backbone"] for m in meta["members"]] == [m["backbone"] for m in result["members"]]
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    for n in (1, 3):
        proba = session.run(None, {"image": np.zeros((n, 3, 224, 224), np.uint8)})[0]
        assert proba.shape == (n, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    card = json.loads((Path(result["path"]).parent / "model_card.json").read_text())
    assert card["export"]["file"] == Path(result["path"]).name and card["export"]["verification"]["torch"]["n"] == 8


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def linear_export(runs) -> dict:
    """The linear run exported by the CLI with --json --quantize int8 (to RUN/model.onnx): exit code, output."""
    from headstart.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        code = main(["export", str(runs["linear"]), "--json", "--quantize", "int8", "--cache-dir", str(runs["cache"]),
                     "--workers", "0"])
    return {"code": code, "result": json.loads(out.getvalue())}


def test_linear_run_exports_through_the_cli_as_json(runs, linear_export):
    assert linear_export["code"] == 0
    result = linear_export["result"]
    assert result["ok"] and result["path"] == str(runs["linear"] / "model.onnx") and result["format"] == "onnx"
    assert result["exporter"] in ("dynamo", "torchscript") and result["opset"] >= 17
    check_verified(result, runs["linear"])
    assert load_run(runs["linear"]).class_names == ["blue", "red"]  # the run still loads with the file beside it


def test_int8_is_written_beside_and_reports_its_figures(runs, linear_export):
    q = linear_export["result"]["int8"]
    assert Path(q["path"]) == runs["linear"] / "model.int8.onnx" and q["ok"] and q["agreement"] >= 0.99
    assert q["bytes"] < q["fp32_bytes"] / 2 and q["ms_per_image"] > 0 and q["fp32_ms_per_image"] > 0
    assert q["n_images"] == 8 and 0 <= q["accuracy"] <= 1 and "training images" in q["evaluated_on"]
    session = ort.InferenceSession(q["path"], providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((2, 3, 224, 224), np.uint8)})[0].shape == (2, 2)
    card = json.loads((runs["linear"] / "model_card.json").read_text())
    assert card["export"]["int8"]["file"] == "model.int8.onnx" and str(runs["root"]) not in json.dumps(card)


def test_mlp_run_exports(runs, tmp_path):
    result = headstart.export(runs["mlp"], tmp_path / "mlp.onnx", cache_dir=runs["cache"], num_workers=0,
                              progress=False)
    check_verified(result, runs["mlp"])
    assert result["members"][0]["head"] == "mlp" and (tmp_path / "model_card.md").is_file()


def test_ensemble_exports_with_every_member_and_the_weighted_mean_inside(runs, tmp_path):
    result = headstart.export(runs["ensemble"], tmp_path / "ens.onnx", exporter="torchscript",  # 5x quicker
                              cache_dir=runs["cache"], num_workers=0, progress=False)
    check_verified(result, runs["ensemble"])
    assert result["exporter"] == "torchscript" and not result["notes"]
    assert [m["head"] for m in result["members"]] == ["linear", "mlp"]
    assert [m["weight"] for m in result["members"]] == pytest.approx([0.75, 0.25])


def test_finetuned_run_exports_its_own_weights(runs, tmp_path):
    result = headstart.export(runs["finetuned"], tmp_path / "ft.onnx", exporter="torchscript", cache_dir=runs["cache"],
                              num_workers=0, progress=False)
    check_verified(result, runs["finetuned"])
    member = result["members"][0]
    assert member["freeze"] == 6 and member["weights"] == "fine-tuned"
    assert member["weights_digest"] != load_run(runs["linear"]).info["backbone"]["weights_digest"]


def test_torchscript_format_is_traced_and_verified_too(runs, tmp_path):
    result = headstart.export(runs["mlp"], tmp_path / "mlp.pt", format="torchscript", cache_dir=runs["cache"],
                              num_workers=0, progress=False)
    assert result["exporter"] == "torch.jit.trace" and result["verification"]["ok"]
    assert result["verification"]["torch"]["max_abs_diff"] <= 1e-4
    extra = {"headstart.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch calls TorchScript deprecated
        traced = torch.jit.load(str(tmp_path / "mlp.pt"), _extra_files=extra)
    assert json.loads(json.loads(extra["headstart.json"])["headstart.classes"]) == ["blue", "red"]
    assert traced(torch.zeros(3, 3, 224, 224, dtype=torch.uint8)).shape == (3, 2)


def test_int8_below_the_agreement_floor_is_said_and_fails(runs, linear_export, tmp_path, monkeypatch):
    import headstart.quantize as quantize
    from headstart.cache import FeatureCache

    fp32 = tmp_path / "m.onnx"
    shutil.copyfile(linear_export["result"]["path"], fp32)
    monkeypatch.setattr(quantize, "quantize_file", lambda source, out, arrays: shutil.copyfile(source, out))
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # nothing can reach it
    run = load_run(runs["linear"])
    with FeatureCache(runs["cache"]) as cache:
        q = quantize.quantize_int8(run, fp32, graph_input_spec(run), cache, progress=False)
    assert not q["ok"] and (tmp_path / "m.int8.onnx").is_file()
    assert "agrees with fp32 on only 100.0% of 8 images" in q["message"] and "kept" in q["message"]


# ------------------------------------------------------------------------------------------ the CLI's errors


def test_a_failed_check_prints_its_figures_then_one_line_and_exits_1(runs, run_cli, monkeypatch):
    export_module = importlib.import_module("headstart.export")  # the attribute is the function

    def figures(diff: float, tolerance: float) -> dict:
        return {"n": 8, "max_abs_diff": diff, "tolerance": tolerance, "top1_agree": 8, "near_ties": 0,
                "top1_differs": [], "worst_image": "a.png", "ok": diff <= tolerance}

    result = {"path": "x.onnx", "format": "onnx", "exporter": "dynamo", "opset": 18, "bytes": 10**6, "tta": "none",
              "input": input_spec(DATA_CONFIG), "class_names": ["blue", "red"], "notes": [],
              "verification": {"n_images": 8, "precision": "fp32", "torch": figures(1e-7, 1e-4),
                               "predict": figures(0.5, 1e-4), "skipped": [], "ok": False}}

    def fail(*args, **kwargs):
        raise ExportError("the exported file 'x.onnx' disagrees with headstart predict", result)

    monkeypatch.setattr(export_module, "export", fail)
    code, out, err = run_cli("export", runs["linear"])
    assert code == 1 and "checked on 8 images" in out and "max |dp| 5.0e-01 (allowed 1e-04) FAILED" in out
    assert err.strip().splitlines() == ["headstart export: error: the exported file 'x.onnx' disagrees with headstart "
                                        "predict"]
    code, out, _ = run_cli("export", runs["linear"], "--json")
    assert code == 1 and json.loads(out)["ok"] is False and "disagrees" in json.loads(out)["error"]


def test_not_a_run_folder_is_one_line(tmp_path, run_cli):
    code, out, err = run_cli("export", tmp_path)
    assert code == 1 and not out and len(err.strip().splitlines()) == 1 and "is not a headstart run" in err


def test_missing_onnx_package_is_one_line_with_the_fix(runs, run_cli, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    code, _, err = run_cli("export", runs["linear"], "--out", runs["root"] / "never.onnx")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "needs the package(s) onnx" in err and "pip install 'headstart[export]'" in err
    assert not (runs["root"] / "never.onnx").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--format", "torchscript", "--quantize", "int8"], "--quantize applies to --format onnx only"),
    (["--format", "torchscript", "--tta", "10crop"], "--tta 10crop applies to --format onnx only"),
    (["--opset", "3"], "opset (--opset) must be an ONNX opset number"),
])
def test_options_that_cannot_work_are_usage_errors(runs, run_cli, argv, fragment):
    code, _, err = run_cli("export", runs["linear"], *argv)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_members_that_need_other_inputs_are_refused(runs):
    run = load_run(runs["linear"])
    other = Run(run.path, {**run.info, "data_config": {**run.info["data_config"], "input_size": [3, 240, 240]}},
                run.head)
    ensemble = EnsembleRun(runs["root"] / "mixed", {"class_names": run.class_names}, [run, other], [1.0, 1.0])
    with pytest.raises(ExportError, match=r"member 0 \(tf_efficientnet_lite0\) takes 224x224 .* member 1 "
                                          r"\(tf_efficientnet_lite0\) takes 240x240.*export the members one by one"):
        graph_input_spec(ensemble)
    with pytest.raises(UsageError, match="tta"):
        graph_input_spec(run, "5crop")


# ------------------------------------------------------------------------------------------ the parts


def _images(folder: Path) -> list[Path]:
    """One image of each kind the reference preprocessing must get right."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1300, 1700, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "large.jpg", quality=90)  # decoded at reduced scale (draft)
    turned = Image.fromarray(pixels[:300, :500])
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(folder / "turned.jpg", exif=exif)
    Image.fromarray(np.dstack([pixels[:300, :410], pixels[:300, :410, :1]])).save(folder / "alpha.png")
    Image.fromarray(pixels[:257, :300]).convert("P").save(folder / "palette.png")
    Image.fromarray(pixels[:400, :259, 0]).save(folder / "grey.png")
    return [folder / n for n in ("large.jpg", "turned.jpg", "alpha.png", "palette.png", "grey.png")] + [
        make_image(folder / "small.png", (200, 30, 30), size=48)]


def test_prepare_image_gives_the_runs_own_pixels(tmp_path):
    spec = input_spec(DATA_CONFIG)
    view = clean_view(DATA_CONFIG)
    mean, std = (torch.tensor(DATA_CONFIG[k]).view(3, 1, 1) for k in ("mean", "std"))
    for path in _images(tmp_path):
        expected = view.transform(decode_image(path, min_size=view.min_size), "")
        pixels = prepare_image(path, spec)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224)
        normalised = (torch.from_numpy(pixels).float() / 255.0 - mean) / std  # what the graph does
        assert torch.equal(normalised, expected), path.name


def test_views_cut_the_crops_of_headstart_tta(tmp_path):
    rng = np.random.default_rng(1)
    for height, width in ((256, 341), (300, 256), (257, 259), (256, 256)):
        x = torch.from_numpy(rng.integers(0, 256, (2, 3, height, width), dtype=np.uint8))
        views = Views("10crop", (224, 224))(x).reshape(10, 2, 3, 224, 224)
        for v, (top, left, flip) in enumerate(crop_boxes((height, width), 224, "10crop")):
            crop = x[..., top:top + 224, left:left + 224]
            assert torch.equal(views[v], crop.flip(-1) if flip else crop), (height, width, v)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 224, 224), dtype=np.uint8))
    assert torch.equal(Views("flip", (224, 224))(x), torch.cat([x, x.flip(-1)]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_logits_are_the_heads_own(kind):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 16)).astype(np.float32) + 3, np.repeat(["a", "b"], 20)
    head = (LinearHead(standardize=True) if kind == "linear" else MLPHead(hidden=8, epochs=2)).fit(x, y)
    features = torch.from_numpy(x)
    with torch.no_grad():
        assert torch.allclose(HeadLogits(head)(features), head.logit_function()(features), atol=1e-6)


def test_ten_crop_graph_takes_any_resized_size_in_onnx_runtime(tmp_path):
    from headstart.export import write_onnx

    rng = np.random.default_rng(3)
    head = LinearHead().fit(rng.normal(size=(20, 3)).astype(np.float32), np.repeat(["a", "b"], 10))
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    spec = input_spec(DATA_CONFIG, crop=False)
    module = ExportedModel(Views("10crop", (224, 224)), [Member(backbone, DATA_CONFIG, head, ["b", "a"])], [1.0], 2)
    written = write_onnx(module.eval(), spec, {"headstart.classes": '["b", "a"]'}, tmp_path / "ten.onnx")
    session = ort.InferenceSession(str(tmp_path / "ten.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 256, 341), (2, 3, 301, 256), (1, 3, 256, 256)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        assert np.abs(session.run(None, {"image": x})[0] - expected).max() < 1e-6, (written["exporter"], shape)
