"""Engines: the choice, features within tolerance of fp32 on real photos, keys and runs that record them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ANTS_BEES

from headstart.engines import engine_signature, openvino_available, resolve_engine
from headstart.errors import UsageError

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_takes_openvino_on_a_cpu_only_where_it_can(monkeypatch):
    monkeypatch.delenv("HEADSTART_ENGINE")
    expected = "openvino" if openvino_available() else "torch"
    assert resolve_engine("auto", CPU, "bf16") == expected
    assert resolve_engine("auto", CPU, "fp32") == expected
    assert resolve_engine("auto", CPU, "fp16") == "torch"
    assert resolve_engine("auto", CUDA, "bf16") == "torch"
    assert resolve_engine("torch", CPU, "bf16") == "torch"


def test_the_environment_says_what_auto_means(monkeypatch):
    monkeypatch.setenv("HEADSTART_ENGINE", "torch")
    assert resolve_engine("auto", CPU, "bf16") == "torch"
    monkeypatch.setenv("HEADSTART_ENGINE", "tvm")
    with pytest.raises(UsageError, match=r"\$HEADSTART_ENGINE must be one of"):
        resolve_engine("auto", CPU, "bf16")


def test_an_impossible_engine_is_refused_with_the_fix():
    with pytest.raises(UsageError, match="engine must be one of auto, torch, openvino"):
        resolve_engine("tensorrt", CPU, "fp32")
    with pytest.raises(UsageError, match="--engine torch"):
        resolve_engine("openvino", CUDA, "bf16")
    with pytest.raises(UsageError, match="fp32 or bf16"):
        resolve_engine("openvino", CPU, "fp16")


def test_torch_keeps_the_keys_it_had_and_openvino_gets_its_own():
    assert engine_signature("torch") is None
    if openvino_available():
        assert engine_signature("openvino").startswith("openvino ")


def _photos(n: int = 12) -> list:
    if not ANTS_BEES.is_dir():
        pytest.skip("../shared/data is absent")
    return sorted(ANTS_BEES.rglob("*.jpg"))[:n]


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_features_match_torch_fp32_on_real_photos(backbone, tmp_path, precision):
    from headstart.data import decode_image
    from headstart.engines import openvino_forward
    from headstart.preprocess import eval_transform

    transform = eval_transform(backbone.data_config)
    x = torch.stack([transform(decode_image(p)) for p in _photos()])
    with torch.inference_mode():
        reference = backbone.model.eval()(x).numpy()
    got = openvino_forward(backbone, precision, tmp_path / "engines")(x)
    cosine = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert got.shape == reference.shape and got.dtype == np.float32
    assert cosine.min() >= (0.9999 if precision == "fp32" else 0.99)
    if precision == "fp32":
        np.testing.assert_allclose(got, reference, atol=2e-3, rtol=1e-3)
    odd = openvino_forward(backbone, precision, tmp_path / "engines")(x[:5])  # any batch size
    np.testing.assert_allclose(odd, got[:5], atol=1e-5 if precision == "fp32" else 5e-2)


@needs_openvino
def test_extraction_keys_rows_by_engine_and_records_it(tree, backbone, cache):
    from headstart.features import extract_features

    paths = sorted(tree.rglob("*.png"))
    torch_rows = extract_features(backbone, paths, cache=cache, engine="torch", num_workers=0, progress=False)
    ov_rows = extract_features(backbone, paths, cache=cache, engine="openvino", num_workers=0, progress=False)
    assert (torch_rows.engine, ov_rows.engine) == ("torch", "openvino")
    assert ov_rows.model_key != torch_rows.model_key and ov_rows.n_computed == len(paths)  # never mixed
    a, b = torch_rows.features.astype(np.float64), ov_rows.features.astype(np.float64)
    assert ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min() >= 0.99
    again = extract_features(backbone, paths, cache=cache, engine="openvino", num_workers=0, progress=False)
    assert again.n_computed == 0 and again.model_key == ov_rows.model_key
    assert list((cache.root / "engines").glob("*.xml")), "the converted network is kept beside the features"


@needs_openvino
def test_a_run_records_its_engine_and_is_scored_with_it_whatever_the_default(tree, tmp_path, monkeypatch):
    import headstart

    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False}
    run = headstart.train(tree, tmp_path / "run", engine="openvino", select="none", **kw)
    assert run.info["preprocessing"]["engine"] == "openvino"
    monkeypatch.setenv("HEADSTART_ENGINE", "torch")  # another default now
    again = headstart.evaluate(tmp_path / "run", tree, **kw)
    assert again["ablation"][0]["features_computed"] == 0  # the run's own (OpenVINO) rows were found
    torch_run = headstart.train(tree, tmp_path / "torch_run", select="none", **kw)
    assert torch_run.info["preprocessing"]["engine"] == "torch"
    monkeypatch.setenv("HEADSTART_ENGINE", "openvino")
    assert headstart.evaluate(tmp_path / "torch_run", tree, **kw)["ablation"][0]["features_computed"] == 0


def test_the_engine_is_checked_before_any_work(tree, tmp_path):
    import headstart

    with pytest.raises(UsageError, match="engine must be one of"):
        headstart.train(tree, tmp_path / "run", engine="tvm", progress=False)


def test_the_cli_offers_the_engines():
    from headstart._constants import ENGINES
    from headstart.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["extract", "photos", "--engine", "torch"]).engine == "torch"
    assert parser.parse_args(["train", "photos", "--out", "run"]).engine == "auto" and "openvino" in ENGINES
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "photos", "--out", "s", "--engine", "tvm"])
