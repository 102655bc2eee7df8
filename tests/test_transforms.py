"""Tests for headstart.transforms: shared invariants for every transform and preset, then specifics."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from headstart.errors import UsageError
from headstart.transforms import (
    IMAGENET_PCA,
    PRESETS,
    AugmentPipeline,
    ChannelShift,
    ElasticWarp,
    GridDistortion,
    PCAColor,
    PCAStats,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ResizeCenterCrop,
    build_pipeline,
    describe_presets,
    fit_pca_stats,
    preview_grid,
    transform_from_config,
)
from headstart.transforms import functional as F

H, W = 40, 56  # input images
OUT = (32, 48)  # output of the transforms that set a size


def make_images(n: int = 3, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """Smooth coloured waves plus noise: every geometric change moves pixel values."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = []
    for _ in range(n):
        phase = torch.rand(3, generator=g) * 6
        waves = torch.stack([127 + 110 * torch.sin(7 * xx + 4 * yy + phase[c]) for c in range(3)])
        images.append((waves + torch.rand(3, h, w, generator=g) * 16 - 8).clamp(0, 255).to(torch.uint8))
    return torch.stack(images)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())


def as_tensor(out) -> torch.Tensor:
    return torch.from_numpy(np.array(out)).permute(2, 0, 1) if isinstance(out, Image.Image) else out


TRANSFORMS = {
    "flip": lambda: RandomHorizontalFlip(p=0.5),
    "crop": lambda: RandomCrop(OUT, padding=4, fill=(10, 20, 30)),
    "crop-edge": lambda: RandomCrop(OUT, padding=(3, 5), padding_mode="edge"),
    "resized_crop": lambda: RandomResizedCrop(OUT, scale=(0.2, 1.0)),
    "resize": lambda: ResizeCenterCrop(OUT),
    "affine": lambda: RandomAffine(20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=(-10, 10, -5, 5),
                                   fill=(9, 99, 199)),
    "affine-symmetric": lambda: RandomAffine(30, padding_mode="symmetric"),
    "elastic": lambda: ElasticWarp(alpha=4, sigma=12),
    "grid_distortion": lambda: GridDistortion(steps=4, limit=0.3, padding_mode="edge"),
    "channel_shift": lambda: ChannelShift(((-20, 0), (0, 0), (0, 30))),
    "pca_color": lambda: PCAColor(sigma=0.3),
    **{f"preset-{name}": (lambda name=name: build_pipeline(name, size=OUT)) for name in PRESETS},
}
DETERMINISTIC = {"resize", "preset-none"}
KEEPS_SIZE = {"flip", "affine", "affine-symmetric", "elastic", "grid_distortion", "channel_shift", "pca_color"}


def check_transform(t, random: bool, out_size: tuple[int, int], returns_tensor: bool) -> None:
    """The invariants every transform keeps; raises AssertionError naming the one that broke."""
    batch = make_images(4)
    img = batch[0]
    before = batch.clone()

    out = t(img, generator=gen(0))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8, "output must be a uint8 tensor"
    assert tuple(out.shape) == (3, *out_size), f"output shape {tuple(out.shape)} != {(3, *out_size)}"
    assert torch.equal(batch, before), "input modified in place"
    out_batch = t(batch, generator=gen(0))
    assert tuple(out_batch.shape) == (4, 3, *out_size), "batch output shape"
    assert torch.equal(batch, before), "batch input modified in place"
    out[...] = 0  # the output must not alias the input
    assert torch.equal(batch, before), "output shares memory with the input"

    # same seed -> same output; a different seed -> a different output
    assert torch.equal(t(batch, generator=gen(1)), t(batch, generator=gen(1))), "same seed, different output"
    if random:
        assert not torch.equal(t(batch, generator=gen(1)), t(batch, generator=gen(2))), "seed has no effect"

    # a batch equals one-by-one, for pinned params and for a shared generator
    params = t.make_params(batch, generator=gen(3))
    assert isinstance(params, list) and len(params) == 4
    pinned = t(batch, params=params)
    for i in range(4):
        assert torch.equal(pinned[i], as_tensor(t(batch[i], params=params[i]))), f"batch != single for image {i}"
    g = gen(4)
    singles = torch.stack([as_tensor(t(batch[i], generator=g)) for i in range(4)])
    assert torch.equal(t(batch, generator=gen(4)), singles), "batch draws differ from image-by-image draws"

    # PIL in: PIL out for single transforms, a tensor from a pipeline; same pixels as the tensor path
    pil_out = t(to_pil(img), generator=gen(0))
    assert isinstance(pil_out, torch.Tensor if returns_tensor else Image.Image)
    assert torch.equal(as_tensor(pil_out), t(img, generator=gen(0))), "PIL and tensor inputs disagree"

    # pickle and config round trips keep the behaviour
    assert torch.equal(pickle.loads(pickle.dumps(t))(batch, generator=gen(5)), t(batch, generator=gen(5)))
    cfg = json.loads(json.dumps(t.get_config()))
    rebuilt = AugmentPipeline.from_config(cfg) if isinstance(t, AugmentPipeline) else transform_from_config(cfg)
    assert rebuilt.get_config() == cfg, "config round trip changed the config"
    assert torch.equal(rebuilt(batch, generator=gen(6)), t(batch, generator=gen(6))), "rebuilt transform differs"

    # inside torchvision's Compose, with a label passing through (global RNG)
    torch.manual_seed(7)
    composed, label = v2.Compose([t])(img, 3)
    torch.manual_seed(7)
    assert label == 3 and torch.equal(composed, t(img)), "v2.Compose gives a different result"


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_invariants(name):
    t = TRANSFORMS[name]()
    out_size = (H, W) if name in KEEPS_SIZE else OUT
    check_transform(t, random=name not in DETERMINISTIC, out_size=out_size, returns_tensor=name.startswith("preset"))


ZERO = {
    "flip": lambda: RandomHorizontalFlip(p=0.0),
    "crop": lambda: RandomCrop((H, W)),
    "resized_crop": lambda: RandomResizedCrop((H, W), scale=(1.0, 1.0), ratio=(W / H, W / H)),
    "resize": lambda: ResizeCenterCrop((H, W)),
    "affine": lambda: RandomAffine(0),
    "elastic": lambda: ElasticWarp(alpha=0.0),
    "grid_distortion": lambda: GridDistortion(limit=0.0),
    "channel_shift": lambda: ChannelShift(0),
    "pca_color": lambda: PCAColor(0.0),
    "preset-none": lambda: build_pipeline("none", size=(H, W)),
    "preset-heavy-zeroed": lambda: build_pipeline("heavy", size=(H, W), overrides={
        "resized_crop": {"scale": (1.0, 1.0), "ratio": (W / H, W / H)}, "flip": {"p": 0.0},
        "affine": {"degrees": 0, "shear": 0}, "elastic": {"alpha": 0}, "grid_distortion": {"limit": 0},
        "channel_shift": {"shift": 0}, "pca_color": {"sigma": 0}}),
    "preset-warps-tiny": lambda: build_pipeline("none", size=(H, W), overrides={
        "elastic": {"alpha": 1e-9}, "grid_distortion": {"limit": 1e-9}}),
}


@pytest.mark.parametrize("name", list(ZERO))
def test_zero_strength_is_identity(name):
    batch = make_images(3)
    out = ZERO[name]()(batch, generator=gen(0))
    assert (out.int() - batch.int()).abs().max() <= 1


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 300, 90), (1, 64, 64), (3, 224, 224)])
def test_pipeline_output_is_exactly_size(preset, shape):
    if shape[0] == 1 and preset in ("standard", "heavy"):  # colour needs RGB
        with pytest.raises(UsageError, match="RGB"):
            build_pipeline(preset, size=(24, 40))(torch.zeros(shape, dtype=torch.uint8))
        return
    out = build_pipeline(preset, size=(24, 40))(torch.randint(0, 256, shape, dtype=torch.uint8), generator=gen(0))
    assert out.shape == (shape[0], 24, 40) and out.dtype == torch.uint8


# --------------------------------------------------------------------------------------------- geometry


def test_flip_and_crop_are_exact_copies():
    img = make_images(1)[0]
    assert torch.equal(RandomHorizontalFlip(p=1.0)(img), img.flip(-1))
    crop = RandomCrop((20, 30), padding=4, fill=(1, 2, 3))
    out = crop(img, params={"top": -2, "left": -3})
    assert torch.equal(out[:, 2:, 3:], img[:, :18, :27])
    assert (out[:, :2] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()
    assert (out[:, :, :3] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()


@pytest.mark.parametrize("mode", ["edge", "symmetric"])
def test_crop_padding_modes_match_numpy(mode):
    img = make_images(1)[0]
    padded = torch.from_numpy(np.pad(img.numpy(), ((0, 0), (5, 5), (6, 6)), mode=mode))
    out = F.crop(img, -5, -6, H + 10, W + 12, padding_mode=mode)
    assert torch.equal(out, padded)
    mirrored = F.warp(img, F.crop_matrix(-5, -6) @ F.hflip_matrix(W + 12), (H + 10, W + 12), padding_mode=mode)
    assert torch.equal(mirrored, padded.flip(-1))


def test_resized_crop_matches_torchvision():
    img = make_images(1)[0]
    for size in ((17, 23), (60, 80)):
        ours = F.resized_crop(img, 3, 5, 30, 41, size)
        theirs = TF.resized_crop(img, 3, 5, 30, 41, list(size), antialias=True)
        assert (ours.int() - theirs.int()).abs().max() <= 1


@pytest.mark.parametrize("angle, shear, scale, translate", [
    (30.0, (0.0, 0.0), 1.0, (0, 0)), (-17.0, (0.0, 0.0), 1.0, (0, 0)), (0.0, (8.0, 0.0), 1.0, (0, 0)),
    (0.0, (0.0, -6.0), 1.0, (0, 0)), (0.0, (0.0, 0.0), 1.2, (3, -2)),
])
def test_affine_matches_torchvision(angle, shear, scale, translate):
    """Same geometry as torchvision, whose affine angle is clockwise and shear opposite: ours follow the screen."""
    img = make_images(1)[0]
    ours = F.affine(img, angle, translate, scale, shear)
    theirs = TF.affine(img, angle=-angle, translate=list(translate), scale=scale, shear=[-shear[0], -shear[1]],
                       interpolation=InterpolationMode.BILINEAR)
    assert (ours.int() - theirs.int())[:, 6:-6, 6:-6].abs().max() <= 1


def test_rotation_is_counter_clockwise():
    img = make_images(1, 32, 32)[0]
    out = RandomAffine(degrees=(90, 90))(img, generator=gen(0))
    assert (out.int() - img.rot90(1, dims=(-2, -1)).int()).abs().max() <= 1


def test_fused_pipeline_equals_sequential_steps():
    full = make_images(2, 60, 90)
    pipe = build_pipeline("light", size=OUT)
    params = pipe.make_params(full, generator=gen(0))
    crop, flip = pipe.transforms
    for i in range(2):
        sequential = flip(crop(full[i], params=params[i][0]), params=params[i][1])
        assert torch.equal(pipe(full[i], params=params[i]), sequential)
    # rotation after a crop: one resample vs two; equal inside the crop
    pipe = build_pipeline("none", size=(H, W), overrides={"affine": {"degrees": 15}})
    p = pipe.make_params(full[0][:, :H, :W].contiguous(), generator=gen(1))
    fused = pipe(full[0][:, :H, :W], params=p)
    alone = pipe.transforms[1](full[0][:, :H, :W], params=p[1])
    assert (fused.int() - alone.int())[:, 8:-8, 8:-8].abs().max() <= 1


def test_resampling_keeps_brightness():
    """Rounding is to nearest: a near-identity resample neither darkens nor brightens (truncation would)."""
    img = make_images(1, 64, 64)[0]
    out = F.affine(img, angle=0.5, translate=(0.3, 0.2), scale=1.0, shear=(0.0, 0.0))
    assert abs(out[:, 4:-4, 4:-4].double().mean() - img[:, 4:-4, 4:-4].double().mean()) < 0.2


def test_plan_composes_warps_and_affines_exactly():
    from headstart.transforms import WarpPlan

    centres = F.pixel_centres((20, 30))
    ramp = torch.stack([0.05 * centres[0], torch.zeros(20, 30)])  # x displacement growing with x
    plan = WarpPlan((20, 30))
    plan.then_displacement(ramp)
    plan.then_displacement(torch.tensor([3.0, -2.0]).view(2, 1, 1).expand(2, 20, 30))
    expected_x = 3.0 + 0.05 * (centres[0] + 3.0)  # d2 + d1(p + d2)
    assert torch.allclose(plan.displacement[0, 4:-4, 4:-20], expected_x[4:-4, 4:-20], atol=1e-4)
    assert torch.allclose(plan.displacement[1], torch.full((20, 30), -2.0))
    plan.then_affine(F.crop_matrix(1, 2), (10, 12))  # displacement read at p + (2, 1)
    assert plan.size == (10, 12) and plan.displacement.shape == (2, 10, 12)
    assert torch.allclose(plan.displacement[0, 3:9, 2:8], expected_x[4:10, 4:10], atol=1e-4)
    np.testing.assert_allclose(plan.matrix, F.crop_matrix(1, 2))


def dot_image(y: int, x: int, size: int = 96) -> torch.Tensor:
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[:, y - 1:y + 2, x - 1:x + 2] = 255
    return img


def centroid(img: torch.Tensor) -> torch.Tensor:
    mass = img[0].double()
    ys, xs = torch.meshgrid(torch.arange(mass.shape[0]), torch.arange(mass.shape[1]), indexing="ij")
    return torch.stack([(mass * ys).sum(), (mass * xs).sum()]) / mass.sum()


@pytest.mark.parametrize("make, bound", [
    (lambda: ElasticWarp(alpha=5, sigma=16), 5.0),
    (lambda: GridDistortion(steps=4, limit=0.2), 0.2 * 96 / 4),
])
def test_local_warps_move_a_dot_at_most_their_limit(make, bound):
    t = make()
    moves = []
    for seed, (y, x) in enumerate([(30, 40), (50, 20), (70, 70), (20, 75), (48, 48), (60, 33)] * 3):
        img = dot_image(y, x)
        out = t(img, generator=gen(seed))
        assert out[0].double().sum() > 0.5 * img[0].double().sum(), "the dot vanished"
        shift = (centroid(out) - centroid(img)).abs()
        assert (shift <= bound + 0.75).all(), f"dot moved {shift.tolist()} > {bound} px"
        moves.append(float(shift.max()))
    assert max(moves) > 0.2 * bound, "the warp hardly moves anything"


def test_displacement_fields_respect_their_bound():
    control = (torch.rand(2, 9, 11, generator=gen(0)) * 2 - 1) * 7
    field = F.bspline_field(control, (80, 100))
    assert field.shape == (2, 80, 100) and field.abs().max() <= 7 + 1e-5
    grid = F.grid_distortion_field(torch.tensor([0.3, -0.3, 0.2]), torch.tensor([-0.1, 0.4, 0.0]), (80, 100))
    assert grid[0].abs().max() <= 0.3 * 25 + 1e-5 and grid[1].abs().max() <= 0.4 * 20 + 1e-5
    x_map = torch.arange(100) + 0.5 + grid[0, 0]
    assert (x_map.diff() > 0).all(), "grid distortion folded the image"


# --------------------------------------------------------------------------------------------- colour


def covariance_images(eigvals, eigvecs, n=60, size=64, seed=0):
    """uint8 images whose RGB values (0..1) have mean 0.5 and covariance V diag(eigvals) V^T."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        z = rng.standard_normal((size * size, 3)) * np.sqrt(eigvals)
        rgb = 0.5 + z @ eigvecs.T
        out.append(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8).reshape(size, size, 3))
    return out


def random_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    return q


def test_fit_pca_recovers_a_known_covariance():
    eigvals, eigvecs = np.array([0.012, 0.004, 0.001]), random_rotation(1)
    stats = fit_pca_stats(covariance_images(eigvals, eigvecs), max_pixels_per_image=4096, seed=0)
    assert stats.n_pixels == 60 * 4096 and stats.source == "fitted"
    np.testing.assert_allclose(stats.eigvals, eigvals, rtol=0.05)
    assert (np.abs(np.sum(stats.eigvecs * eigvecs, axis=0)) > 0.995).all(), "eigenvectors differ (up to sign)"
    np.testing.assert_allclose(stats.mean, 0.5, atol=0.01)


def test_fit_pca_reads_every_image_form_alike():
    arrays = covariance_images(np.array([0.01, 0.003, 0.001]), random_rotation(2), n=4, size=20)
    forms = [
        arrays,
        [Image.fromarray(a) for a in arrays],
        [torch.from_numpy(a).permute(2, 0, 1) for a in arrays],
        [torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])],
        [a.astype(np.float32) / 255 for a in arrays],
    ]
    fits = [fit_pca_stats(f, max_pixels_per_image=100, seed=3) for f in forms]
    for fit in fits[1:]:
        np.testing.assert_allclose(fit.eigvals, fits[0].eigvals, rtol=1e-5)
        np.testing.assert_allclose(fit.eigvecs, fits[0].eigvecs, atol=1e-5)
    with pytest.raises(UsageError, match="at least one image"):
        fit_pca_stats([])
    with pytest.raises(UsageError, match="RGB"):
        fit_pca_stats([np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(UsageError, match=r"0\.\.1"):
        fit_pca_stats([np.full((8, 8, 3), 7.0)])


def test_pca_noise_lies_in_the_eigenvector_span_with_the_right_variance():
    vecs = random_rotation(3)
    stats = PCAStats(np.array([0.3, 0.1, 0.0]), vecs)
    sigma = 0.5
    t = PCAColor(sigma=sigma, stats=stats)
    grey = torch.full((4000, 3, 1, 1), 128, dtype=torch.uint8)
    noise = (t(grey, generator=gen(0)).double() - 128).reshape(-1, 3).numpy()
    along = noise @ vecs  # coordinates along each eigenvector
    expected = (255 * sigma * stats.eigvals) ** 2 + 1 / 12  # + rounding to whole grey levels
    np.testing.assert_allclose(along.var(axis=0)[:2], expected[:2], rtol=0.08)
    assert along.var(axis=0)[2] < 0.2, "noise leaks outside the span of the eigenvectors"
    # the offset itself: 255 * V (alpha * lambda), exactly in the span
    alpha = torch.tensor([0.2, -1.0, 3.0])
    offset = t.offset({"alpha": alpha}).double().numpy()
    np.testing.assert_allclose(offset, 255 * vecs @ (alpha.double().numpy() * stats.eigvals), atol=1e-3)
    np.testing.assert_allclose(F.pca_offset(alpha, stats.eigvals, vecs).numpy(), offset, atol=1e-3)


def test_pca_stats_round_trip_and_fallback():
    stats = fit_pca_stats(covariance_images(np.array([0.01, 0.003, 0.001]), random_rotation(4), n=3, size=16))
    back = PCAStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    np.testing.assert_array_equal(back.eigvecs, stats.eigvecs)
    assert back.n_pixels == stats.n_pixels and back.source == "fitted"
    assert build_pipeline("standard").get_config()["pca_source"] == "imagenet-alexnet"
    assert build_pipeline("light").get_config()["pca_source"] is None
    assert isinstance(build_pipeline("standard").steps[-1], PCAColor)
    assert not any(isinstance(s, PCAColor) for s in build_pipeline("light").steps)
    fitted = build_pipeline("heavy", pca=stats).get_config()
    assert fitted["pca_source"] == "fitted"
    assert fitted["transforms"][-1]["stats"]["eigvals"] == stats.eigvals.tolist()
    np.testing.assert_allclose(PCAColor().stats.eigvals, IMAGENET_PCA.eigvals)
    with pytest.raises(UsageError, match="negative"):
        PCAStats(np.array([0.1, -0.1, 0.0]), np.eye(3))


def test_channel_shift_ranges_per_channel():
    grey = torch.full((500, 3, 1, 1), 100, dtype=torch.uint8)
    out = ChannelShift(((-20, -10), (0, 0), (5, 30)))(grey, generator=gen(0)).reshape(-1, 3).int() - 100
    assert out[:, 0].min() >= -20 and out[:, 0].max() <= -10
    assert (out[:, 1] == 0).all()
    assert out[:, 2].min() >= 5 and out[:, 2].max() <= 30 and out[:, 2].float().std() > 5
    assert torch.equal(F.channel_shift(torch.full((3, 2, 2), 250, dtype=torch.uint8), [10, -300, 0])[:, 0, 0],
                       torch.tensor([255, 0, 250], dtype=torch.uint8))


# --------------------------------------------------------------------------------------------- pipeline


def test_config_round_trip_reproduces_outputs():
    batch = make_images(3, 70, 50)
    for preset in PRESETS:
        pipe = build_pipeline(preset, size=(30, 36), overrides={"render": {"fill": 77}})
        cfg = json.loads(json.dumps(pipe.get_config()))
        assert cfg["preset"] == preset and cfg["size"] == [30, 36] and cfg["render"]["fill"] == 77
        again = AugmentPipeline.from_config(cfg)
        assert again.get_config() == cfg
        assert torch.equal(again(batch, generator=gen(9)), pipe(batch, generator=gen(9)))


def test_overrides_change_add_and_remove_transforms():
    overrides = {"affine": {"degrees": 20}, "elastic": {}, "pca_color": None}
    cfg = build_pipeline("standard", overrides=overrides).get_config()
    names = [t["name"] for t in cfg["transforms"]]
    assert names == ["resized_crop", "flip", "affine", "elastic", "channel_shift"]
    assert cfg["transforms"][2]["degrees"] == [-20.0, 20.0]
    assert [t["name"] for t in build_pipeline("light", overrides={"resize": True}).get_config()["transforms"]] == [
        "resize", "flip"]
    with pytest.raises(UsageError, match="did you mean 'affine'"):
        build_pipeline("standard", overrides={"afine": {"degrees": 20}})
    with pytest.raises(UsageError, match="did you mean 'degrees'"):
        build_pipeline("standard", overrides={"affine": {"degree": 20}})
    with pytest.raises(UsageError, match="size="):
        build_pipeline("standard", overrides={"resized_crop": {"size": 100}})
    with pytest.raises(UsageError, match="render"):
        build_pipeline("standard", overrides={"affine": {"fill": 3}})
    with pytest.raises(UsageError, match="did you mean 'standard'"):
        build_pipeline("standrd")
    with pytest.raises(UsageError, match="needs one of"):
        build_pipeline("light", overrides={"resized_crop": None})
    with pytest.raises(UsageError, match="scale"):
        build_pipeline("light", overrides={"resized_crop": {"scale": (0.9, 0.1)}})


def test_describe_presets_lists_every_preset():
    described = describe_presets()
    assert [d["name"] for d in described] == list(PRESETS)
    assert all(d["summary"] and d["transforms"] for d in described)
    json.dumps(described)


def test_bad_inputs_raise_usage_errors():
    t = RandomAffine(10)
    with pytest.raises(UsageError, match="uint8"):
        t(torch.rand(3, 8, 8))
    with pytest.raises(UsageError, match="RGB"):
        t(Image.new("RGBA", (8, 8)))
    with pytest.raises(UsageError, match="3 sets of params"):
        t(make_images(2), params=t.make_params(make_images(3)))
    with pytest.raises(UsageError, match="padding_mode"):
        RandomCrop(8, padding_mode="reflect")
    with pytest.raises(UsageError, match="fill"):
        RandomAffine(10, fill=300)


def test_preview_grid_has_two_rows_per_image():
    images = [to_pil(img) for img in make_images(2, 50, 80)]
    sheet = preview_grid(images, build_pipeline("heavy", size=64), n_views=3, seed=0, tile=32)
    assert sheet.size == (3 * 32, 2 * 2 * 32)
    pixels = np.asarray(sheet).astype(int)
    background = pixels[0, 32 + 16]
    assert (pixels[:32, 32:] == background).all(), "row 1 beyond the original should be blank"
    assert (pixels[8:24, 8:24] != background).any(), "the original is missing"
    assert (pixels[32:64] != background).any(axis=-1).mean() > 0.5, "the views are missing"
    again = preview_grid(images, build_pipeline("heavy", size=64), n_views=3, seed=0, tile=32)
    assert np.array_equal(np.asarray(again), np.asarray(sheet))


class _Views(Dataset):
    """Image i, view v -> pipeline(image, generator seeded by (i, v)), as a caching trainer would do."""

    def __init__(self):
        self.images = make_images(4, 48, 64)
        self.pipeline = build_pipeline("heavy", size=32)

    def __len__(self):
        return 8

    def __getitem__(self, index):
        image, view = divmod(index, 2)
        return self.pipeline(self.images[image], generator=gen(1000 * image + view))


def test_same_seeds_give_same_views_with_any_worker_count():
    single = torch.cat(list(DataLoader(_Views(), batch_size=2, num_workers=0)))
    workers = torch.cat(list(DataLoader(_Views(), batch_size=2, num_workers=2)))
    assert torch.equal(single, workers)
    assert not torch.equal(single[0], single[1])


def test_preset_names_are_the_shared_constant():
    from headstart._constants import AUGMENT_PRESETS

    assert PRESETS is AUGMENT_PRESETS and [d["name"] for d in describe_presets()] == list(AUGMENT_PRESETS)
