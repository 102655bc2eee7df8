"""The GPU clean-view path: geometry, batching and fallbacks checked on the CPU; nvJPEG itself on a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import ANTS_BEES, make_image
from PIL import Image

from headstart.data import decode_bytes
from headstart.features import extract_features
from headstart.gpu_decode import (
    DEVICE_VIEW,
    DeviceCleanBatches,
    device_path_applies,
    preprocess,
    resize_plan,
    size_groups,
    supported,
)
from headstart.views import ViewsOfFiles, augmented_views, clean_view

CONFIG = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("shape", [(256, 256), (300, 400), (400, 300), (1080, 1920), (97, 500), (257, 255)])
def test_resize_plan_matches_torchvision_resize_and_center_crop(shape):
    plan = resize_plan(*shape, CONFIG)
    image = torch.zeros((1, *shape))
    assert tuple(TF.resize(image, 256, antialias=True).shape[1:]) == plan.size  # timm: floor(224 / 0.875)
    coded = torch.arange(plan.size[0] * plan.size[1], dtype=torch.float64).view(1, *plan.size)
    cropped = TF.center_crop(coded, [224, 224])
    top, left, h, w = plan.crop
    assert (h, w) == (224, 224)
    assert cropped[0, 0, 0].item() == top * plan.size[1] + left


def test_size_groups_keep_first_appearance_order():
    assert size_groups([(2, 3), (4, 5), (2, 3), (1, 1), (4, 5)]) == [[0, 2], [1, 4], [3]]


def test_supported_configs():
    assert supported(CONFIG)
    assert not supported({**CONFIG, "crop_mode": "squash"})
    assert not supported({**CONFIG, "input_size": (3, 224, 320)})
    assert not supported({**CONFIG, "interpolation": "lanczos"})


def test_path_applies_only_to_the_clean_view_on_cuda():
    clean = [clean_view(CONFIG)]
    assert device_path_applies(torch.device("cuda"), clean, CONFIG, True, None)
    assert not device_path_applies(torch.device("cpu"), clean, CONFIG, True, None)
    assert not device_path_applies(torch.device("cuda"), clean, CONFIG, False, None)  # a caller's own decoder
    assert not device_path_applies(torch.device("cuda"), clean, CONFIG, True, object())  # activations at a cut
    from headstart.transforms.pipeline import build_pipeline

    views = augmented_views(build_pipeline("light"), CONFIG, 2)
    assert not device_path_applies(torch.device("cuda"), views, CONFIG, True, None)


def test_preprocess_batches_by_size_and_matches_pillows_eval_transform():
    rng = np.random.default_rng(0)
    smooth = [np.clip(rng.normal(128, 40, (h // 8, w // 8, 3)), 0, 255).astype(np.uint8) for h, w in
              [(480, 640), (480, 640), (600, 400)]]
    images = [Image.fromarray(a).resize((a.shape[1] * 8, a.shape[0] * 8), Image.BILINEAR) for a in smooth]
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    ours = preprocess(tensors, CONFIG)
    view = clean_view(CONFIG, draft=False)
    theirs = torch.stack([view.transform(im, "") for im in images])
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    diff = (ours - theirs).abs() * 0.5 * 255  # back to 0..255 levels
    assert diff.mean() < 0.3 and diff.max() < 3  # bilinear instead of bicubic: 0.56 / 7; a 1-pixel shift: 7 / 52


def _files(tmp_path):
    photo = make_image(tmp_path / "a.jpg", (200, 80, 40), size=300)
    png = make_image(tmp_path / "b.png", (20, 80, 240), size=120)
    rotated = tmp_path / "c.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.open(photo).resize((320, 200)).save(rotated, exif=exif)
    cmyk = tmp_path / "d.jpg"
    Image.open(photo).convert("CMYK").save(cmyk)
    broken = tmp_path / "e.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    return [photo, png, rotated, cmyk, broken, tmp_path / "missing.jpg"]


def test_device_batches_match_the_cpu_views_and_report_bad_files(tmp_path):
    paths = _files(tmp_path)
    batches = list(DeviceCleanBatches(paths, CONFIG, batch_size=4, device=torch.device("cpu")))
    assert [len(b) for b in batches] == [4, 2]
    items = [item for batch in batches for item in batch]
    assert [item["index"] for item in items] == list(range(6))
    reference = ViewsOfFiles(paths, [[0]] * 6, [clean_view(CONFIG, draft=False)], decode_bytes)
    for i in range(4):  # JPEG, PNG, EXIF-rotated JPEG, CMYK JPEG: the same view as the CPU path's
        ref = reference[i]
        assert items[i]["digest"] == ref["digest"] and not items[i]["error"]
        assert items[i]["tensors"].shape == ref["tensors"].shape == (1, 3, 224, 224)
        assert ((items[i]["tensors"] - ref["tensors"]).abs() * 127.5).mean() < 2.0
    assert items[4]["error"].startswith("cannot decode image") and items[4]["permanent"]
    assert items[5]["error"] == "file not found" and items[5]["tensors"] is None


@pytest.mark.skipif(not ANTS_BEES.is_dir(), reason="../shared is absent")
def test_device_pipeline_features_agree_with_the_cpu_path_on_real_photos(backbone):
    paths = sorted(ANTS_BEES.rglob("*.jpg"))[:8]
    cpu = extract_features(backbone, paths, num_workers=0, progress=False, precision="fp32").features
    batch = torch.cat([item["tensors"] for b in DeviceCleanBatches(paths, backbone.data_config, 8,
                                                                   torch.device("cpu")) for item in b])
    from headstart.features import forward_batch

    ours = forward_batch(backbone, batch, torch.device("cpu"), "fp32")
    cos = (ours * cpu).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() >= 0.99


@needs_cuda
def test_cuda_extraction_decodes_on_the_device_with_its_own_cache_key(backbone, tmp_path):
    from headstart.cache import FeatureCache

    paths = sorted(ANTS_BEES.rglob("*.jpg"))[:32] if ANTS_BEES.is_dir() else [
        make_image(tmp_path / f"{i}.jpg", (40 * i % 255, 90, 160), size=256, seed=i) for i in range(8)]
    with FeatureCache(tmp_path / "cache") as cache:
        gpu = extract_features(backbone, paths, cache=cache, device="cuda", precision="fp32", progress=False)
        cpu = extract_features(backbone, paths, cache=cache, device="cpu", precision="fp32", progress=False,
                               num_workers=0)
    assert gpu.model_key != cpu.model_key and gpu.n_computed == cpu.n_computed == len(paths)
    f, g = cpu.features, gpu.features
    assert ((f * g).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(g, axis=1)).min() >= 0.99
    assert DEVICE_VIEW["decode"] == "device"
