"""Test-time multi-crop: exact crop boxes, bit-exact centre view, averaging, and the views in extract_views."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.cache import model_key
from headstart.errors import UsageError
from headstart.features import CleanTransform, extract_features, extract_views, feature_description
from headstart.inference import average_views, predict_proba_cached, predict_proba_views
from headstart.preprocess import resize_size
from headstart.tta import TTA_MODES, TTATransform, crop_box, crop_boxes, tta_crops, tta_views

# nearest-neighbour resize and mean 0 / std 1 make pixels traceable: a crop's values are source pixels / 255
CONFIG = {"input_size": (3, 32, 32), "interpolation": "nearest", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
          "crop_pct": 0.8, "crop_mode": "center"}  # scale_size = floor(32 / 0.8) = 40
LITE0 = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
         "crop_pct": 0.875, "crop_mode": "center"}


def coordinate_image(width: int, height: int) -> Image.Image:
    """Each pixel encodes its own position: red = column, green = row, blue = 7."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([cols, rows, np.full_like(cols, 7)], axis=-1).astype(np.uint8))


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """Un-normalise a CONFIG view back to uint8 (H, W, 3)."""
    return np.rint(tensor.numpy().transpose(1, 2, 0) * 255).astype(np.int64)


def test_modes_have_the_documented_views():
    counts = {mode: len(tta_crops(mode)) for mode in TTA_MODES}
    assert counts == {"none": 1, "flip": 2, "5crop": 5, "10crop": 10, "multiscale": 6}
    for mode in TTA_MODES:
        assert tta_crops(mode)[0].is_clean
        assert tta_views(CONFIG, mode)[0].description == {"view": "clean"}
    ten = tta_crops("10crop")
    assert [c.position for c in ten[5:]] == [c.position for c in ten[:5]] and all(c.flip for c in ten[5:])


def test_crop_boxes_coordinates():
    assert crop_boxes((40, 50), 32, "10crop") == [
        (4, 9, False), (0, 0, False), (0, 18, False), (8, 0, False), (8, 18, False),
        (4, 9, True), (0, 0, True), (0, 18, True), (8, 0, True), (8, 18, True)]
    assert crop_boxes((40, 50), 32, "flip") == [(4, 9, False), (4, 9, True)]
    assert crop_boxes((256, 341), 224, "none") == [(16, 58, False)]  # round half to even, as torchvision
    assert crop_box((224, 224), 224, "bottom_right") == (0, 0)
    with pytest.raises(UsageError, match="multiscale"):
        crop_boxes((40, 50), 32, "multiscale")
    with pytest.raises(UsageError, match="does not fit"):
        crop_box((20, 50), 32, "center")
    with pytest.raises(UsageError, match="tta mode must be one of"):
        crop_boxes((40, 50), 32, "12crop")


def test_ten_crops_are_the_documented_pixels():
    image = coordinate_image(50, 40)  # already at scale_size (shorter side 40): the resize is the identity
    views = tta_views(CONFIG, "10crop")
    boxes = crop_boxes((40, 50), 32, "10crop")
    source = np.asarray(image).astype(np.int64)
    for view, (top, left, flip) in zip(views, boxes):
        crop = pixels(view.transform(image, "key"))
        expected = source[top:top + 32, left:left + 32]
        np.testing.assert_array_equal(crop, expected[:, ::-1] if flip else expected)
        # the corners say where the crop came from (red = column, green = row)
        first_col = left + 31 if flip else left
        assert tuple(crop[0, 0, :2]) == (first_col, top)


def test_corner_colours_of_a_quadrant_image():
    """A resized photo-like case: distinct colours in the four quadrants and the centre."""
    array = np.zeros((80, 100, 3), dtype=np.uint8)
    array[:40, :50], array[:40, 50:], array[40:, :50], array[40:, 50:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), \
        (255, 255, 0)
    array[30:50, 40:60] = (255, 255, 255)
    image = Image.fromarray(array)  # resized to 40 x 50: quadrants of 20 x 25, centre block rows 15..25
    crops = [pixels(v.transform(image, "quad")) for v in tta_views(CONFIG, "10crop")]
    red, green, blue, yellow, white = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)
    corner = {1: red, 2: green, 3: blue, 4: yellow}  # the outer corner of each corner crop
    outer = {1: (0, 0), 2: (0, -1), 3: (-1, 0), 4: (-1, -1)}
    for v, colour in corner.items():
        r, c = outer[v]
        assert tuple(crops[v][r, c]) == colour
        assert tuple(crops[v + 5][r, -1 - c if c == 0 else 0]) == colour  # mirrored: the corner changes side
        np.testing.assert_array_equal(crops[v + 5], crops[v][:, ::-1])
    assert tuple(crops[0][16, 16]) == white and tuple(crops[5][16, 16]) == white


def test_multiscale_views_are_centre_crops_of_rescaled_images():
    from torchvision import transforms

    image = coordinate_image(50, 40)
    views = tta_views(CONFIG, "multiscale")
    # shorter side max(32, round(40 * s)): 40, 35, 46 for s = 1.0, 0.875, 1.143
    for view, side in zip(views, [40, 35, 46, 40, 35, 46]):
        expected = transforms.Compose([transforms.Resize(side, interpolation=transforms.InterpolationMode.NEAREST),
                                       transforms.CenterCrop(32)])(image)
        expected = np.asarray(expected).astype(np.int64)
        crop = pixels(view.transform(image, "ms"))
        np.testing.assert_array_equal(crop, expected[:, ::-1] if view.description.get("flip") else expected)
    assert [v.description.get("scale", 1.0) for v in views] == [1.0, 0.875, 1.143, 1.0, 0.875, 1.143]


@pytest.mark.parametrize("size", [(48, 48), (300, 200), (201, 333), (223, 225), (640, 427)])
@pytest.mark.parametrize("config", [LITE0, {**LITE0, "input_size": (3, 160, 192), "crop_pct": 0.9},
                                    {**LITE0, "crop_mode": "squash", "crop_pct": 1.0},
                                    {**LITE0, "crop_pct": 1.1}])  # crop_pct > 1: the crop is zero-padded
def test_centre_view_is_the_clean_transform_bit_for_bit(size, config):
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    clean = CleanTransform(config)(image, "k")
    for mode in TTA_MODES:
        views = tta_views(config, mode)
        centre = views[0].transform(image, "k")
        assert centre.dtype == clean.dtype and torch.equal(centre, clean)
        for view in views[1:]:
            assert view.transform(image, "k").shape == clean.shape


def test_views_of_an_image_resize_it_once(monkeypatch):
    views = tta_views(LITE0, "10crop")
    image = coordinate_image(300, 200)
    calls = {"n": 0}
    real = Image.Image.resize

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", counting)
    first = [v.transform(image, "a") for v in views]
    assert calls["n"] == 1
    other = coordinate_image(200, 300)
    [v.transform(other, "b") for v in views]
    assert calls["n"] == 2
    again = [v.transform(image, "a") for v in views]  # memo moved on to "b": recomputed, same values
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    first[0].zero_()  # callers may modify what they get: the memo must not change
    assert torch.equal(views[0].transform(image, "a"), again[0])


def test_transform_pickles_and_keeps_one_memo():
    views = pickle.loads(pickle.dumps(tta_views(LITE0, "multiscale")))
    assert len({id(v.transform.memo) for v in views}) == 1
    image = coordinate_image(120, 90)
    assert torch.equal(views[0].transform(image, "x"), CleanTransform(LITE0)(image, "x"))


def test_shared_crops_share_cache_keys():
    flip = [v.description for v in tta_views(CONFIG, "flip")]
    ten = [v.description for v in tta_views(CONFIG, "10crop")]
    multi = [v.description for v in tta_views(CONFIG, "multiscale")]
    assert flip[1] == ten[5] == multi[3]  # the mirrored centre, whichever mode asks
    assert flip[1]["view"] == "tta" and flip[1]["flip"] is True and flip[1]["version"] == 1
    assert len({str(d) for d in ten + multi}) == 14  # 10 + 6 views, 2 shared


def test_transform_rejects_bad_arguments():
    with pytest.raises(UsageError, match=r"views 0\.\.1"):
        TTATransform(CONFIG, "flip", 2)
    with pytest.raises(UsageError, match="crop_mode"):
        TTATransform({**CONFIG, "crop_mode": "border"}, "10crop", 3)
    border = {**LITE0, "crop_mode": "border"}
    image = coordinate_image(120, 90)
    assert torch.equal(tta_views(border, "none")[0].transform(image, "k"), CleanTransform(border)(image, "k"))


def test_average_views_by_hand():
    proba = np.array([[[0.8, 0.2], [0.4, 0.6]], [[0.5, 0.5], [1.0, 0.0]]])
    np.testing.assert_allclose(average_views(proba), [[0.6, 0.4], [0.75, 0.25]])
    a, b = np.sqrt(0.8 * 0.4), np.sqrt(0.2 * 0.6)
    np.testing.assert_allclose(average_views(proba, "geomean")[0], [a / (a + b), b / (a + b)])
    second = average_views(proba, "geomean")[1]  # a zero in one view nearly vetoes the class, without NaN
    assert np.isfinite(second).all() and second[1] < 1e-5 and second.sum() == pytest.approx(1.0)
    tiny = np.full((1, 3, 2), 1e-300)
    np.testing.assert_allclose(average_views(tiny, "geomean"), [[0.5, 0.5]])
    with pytest.raises(UsageError, match="method"):
        average_views(proba, "median")
    with pytest.raises(UsageError, match="shape"):
        average_views(proba[0])


def test_predict_proba_views_reshapes_per_view():
    class Head:
        def predict_proba(self, x):
            return np.stack([x[:, 0], 1 - x[:, 0]], axis=1)

    features = np.array([[[0.8, 9.0], [0.4, 9.0]]])
    np.testing.assert_allclose(predict_proba_views(Head(), features), [[0.6, 0.4]])


def test_tta_views_in_extract_views_reuse_clean_cache(tree, backbone, cache):
    paths = sorted(tree.rglob("*.png"))[:3] + sorted(tree.rglob("*.png"))[-1:]
    clean = extract_features(backbone, paths, cache=cache, num_workers=0, progress=False)
    views = tta_views(backbone.data_config, "10crop")
    result = extract_views(backbone, paths, views, cache=cache, num_workers=0, progress=False, batch_size=20)
    assert result.ok.all() and result.features.shape == (4, 10, backbone.num_features)
    assert result.n_cached == 4 and result.n_computed == 36  # the centre came from the clean cache
    np.testing.assert_array_equal(result.features[:, 0], clean.features)
    assert not np.allclose(result.features[:, 1], result.features[:, 0])
    flip = extract_views(backbone, paths, tta_views(backbone.data_config, "flip"), cache=cache, num_workers=0,
                         progress=False)
    assert flip.n_computed == 0  # the mirrored centre was cached by 10crop
    np.testing.assert_array_equal(flip.features[:, 1], result.features[:, 5])
    clean_key = model_key(feature_description(backbone, result.precision, dtype=cache.dtype.name,
                                              view={"view": "clean"}, min_size=resize_size(backbone.data_config)))
    assert result.model_key == clean.model_key == clean_key


@pytest.mark.parametrize("max_rows", [1, 7, 4096])
def test_predict_proba_cached_equals_the_in_memory_path(tree, tmp_path, backbone, cache, max_rows):
    from headstart.heads import LinearHead

    paths = sorted(tree.rglob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [*paths[:4], broken, *paths[-3:]]
    views = tta_views(backbone.data_config, "10crop")
    loaded = extract_views(backbone, paths, views, cache=cache, num_workers=0, progress=False)
    assert loaded.ok.tolist() == [True] * 4 + [False] + [True] * 3
    head = LinearHead().fit(loaded.features[loaded.ok, 0], [p.parent.name for p in np.array(paths)[loaded.ok]])
    located = extract_views(backbone, paths, views, cache=cache, num_workers=0, progress=False, load=False)
    assert located.n_computed == 0 and located.features.shape == (8, 10, 0)
    for method in ("mean", "geomean"):
        expected = predict_proba_views(head, loaded.features[loaded.ok], method)
        got = predict_proba_cached(head, cache, located, method, max_rows=max_rows)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_predict_proba_cached_needs_locations(backbone):
    from headstart.features import FeatureResult

    with pytest.raises(UsageError, match="load=False"):
        predict_proba_cached(None, None, FeatureResult(features=np.zeros((1, 1, 0)), ok=np.ones(1, bool)))


def test_multiscale_views_of_a_large_jpeg_decode_once_with_enough_pixels(tmp_path, backbone, cache, monkeypatch):
    import headstart.views
    from headstart.data import DRAFT_MARGIN, decode_bytes
    from headstart.features import Decoder

    path = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((2000, 1500), Image.BICUBIC).save(
        path, quality=90)
    views = tta_views(backbone.data_config, "multiscale")
    assert [v.min_size for v in views[:3]] == [(256, 256), (224, 224), (293, 293)]  # lite0: 224 px, crop 0.875
    decoded = []

    def counting(data, path, min_size=None):
        image = decode_bytes(data, path, min_size)
        decoded.append(image.size)
        return image

    monkeypatch.setattr(headstart.views, "decode_bytes", counting)  # known to decode as decode_bytes does
    drafted = extract_views(backbone, [path], views, cache=cache, num_workers=0, progress=False,
                            decoder=Decoder(decode=counting))
    assert decoded == [(1000, 750)]  # one 1/2-scale decode serves all six views ...
    assert min(decoded[0]) >= DRAFT_MARGIN * 293  # ... with room for the largest scale
    full = extract_views(backbone, [path], tta_views(backbone.data_config, "multiscale", draft=False), cache=cache,
                         num_workers=0, progress=False)
    assert full.n_computed == 6
    a, b = drafted.features[0], full.features[0]
    assert (np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.99
