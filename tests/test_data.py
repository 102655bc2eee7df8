"""Data discovery, decoding of every image mode, bad inputs, and the stratified split."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_image, make_tree, truncated_jpeg
from PIL import Image

from headstart.data import (
    DRAFT_MARGIN,
    ImageDecodeError,
    decode_bytes,
    decode_image,
    draft_scale,
    list_image_paths,
    load_images,
    stratified_split,
)
from headstart.errors import DataError, DataNotFoundError, HeadstartError, UsageError

# ------------------------------------------------------------------------------------------- layouts


def test_class_folders_layout(tree):
    data = load_images(tree, val_split=0)
    assert data.layout == "class-folders"
    assert data.train.class_names == ["blue", "red"]
    assert len(data.train) == 12 and data.val is None
    assert data.train.class_counts() == {"blue": 6, "red": 6}
    for path, label in zip(data.train.paths, data.train.labels):
        assert path.parent.name == data.train.class_names[label]


def test_class_folders_are_searched_recursively(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    make_image(root / "red" / "nested" / "deep.png", (200, 0, 0))
    data = load_images(root, val_split=0)
    assert data.train.class_counts() == {"blue": 2, "red": 3}


def test_train_val_layout(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=4)
    make_tree(tmp_path / "d" / "val", per_class=2)
    data = load_images(tmp_path / "d", val_split=0.5)
    assert data.layout == "train-val" and data.val_from == "folder"
    assert len(data.train) == 8 and len(data.val) == 4
    assert data.val.class_names == data.train.class_names
    for path, label in zip(data.val.paths, data.val.labels):
        assert path.parent.name == data.val.class_names[label]


def test_train_val_layout_accepts_test_folder_and_subset_of_classes(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=3, classes=("red", "blue", "green"))
    make_tree(tmp_path / "d" / "test", per_class=1, classes=("green",))
    data = load_images(tmp_path / "d")
    assert data.train.class_names == ["blue", "green", "red"]
    assert [data.val.class_names[i] for i in data.val.labels] == ["green"]


def test_val_folder_with_unknown_class_is_refused(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=2)
    make_tree(tmp_path / "d" / "val", per_class=1, classes=("green",))
    with pytest.raises(DataError, match="green"):
        load_images(tmp_path / "d")


def test_csv_manifest(tmp_path):
    make_tree(tmp_path / "imgs", per_class=3)
    rows = ["path,label"] + [f"imgs/{c}/{c}_{i}.png,{c.upper()}" for c in ("red", "blue") for i in range(3)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_images(tmp_path / "labels.csv", val_split=0)
    assert data.layout == "csv"
    assert data.train.class_names == ["BLUE", "RED"]
    assert len(data.train) == 6


def test_csv_missing_file_is_reported_not_fatal(tmp_path):
    make_tree(tmp_path / "imgs", per_class=2)
    rows = ["path,label", "imgs/red/red_0.png,red", "imgs/blue/blue_0.png,blue", "imgs/nope.png,red"]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    data = load_images(tmp_path / "m.csv", val_split=0)
    assert len(data.train) == 2
    assert [b.reason for b in data.bad_files] == ["file not found (listed in the CSV)"]
    assert data.bad_files[0].path.endswith("nope.png")


def test_csv_path_escaping_its_folder_is_refused(tmp_path):
    make_image(tmp_path / "outside.png", (1, 2, 3))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.csv").write_text("path,label\n../outside.png,a\n../outside.png,b\n")
    with pytest.raises(DataError, match="outside the CSV's folder"):
        load_images(tmp_path / "sub" / "m.csv")


def test_csv_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="needs the columns 'path' and 'label'") as info:
        load_images(tmp_path / "m.csv")
    assert "'path'" in str(info.value) and "found ['file', 'class']" in str(info.value)


# ------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist") as info:
        load_images(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, HeadstartError)


def test_fewer_than_two_classes(tmp_path):
    make_tree(tmp_path / "d", classes=("red",))
    with pytest.raises(DataError, match="at least 2 classes to train a classifier; found only 'red'"):
        load_images(tmp_path / "d")


def test_class_without_images(tmp_path):
    root = make_tree(tmp_path / "d")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"'empty'.*hold no image"):
        load_images(root)


def test_unknown_extensions_only(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "x.foo").write_text("x")
        (tmp_path / "d" / c / "y.bar").write_text("y")
    with pytest.raises(DataError, match=r"none with an image extension \(got \.bar, \.foo"):
        load_images(tmp_path / "d")


def test_non_image_files_are_reported(tree):
    (tree / "red" / "notes.txt").write_text("hello")
    data = load_images(tree, val_split=0)
    assert len(data.train) == 12
    assert any(b.path.endswith("notes.txt") and "not an image extension" in b.reason for b in data.bad_files)


def test_bad_val_split(tree):
    with pytest.raises(UsageError, match="val_split"):
        load_images(tree, val_split=1.5)


# ------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_decode_any_mode_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    else:
        img = rgb.convert(mode)
    ext = {"CMYK": "tif", "I;16": "png", "I": "tif", "F": "tif", "LA": "png", "RGBA": "png"}.get(mode, "png")
    path = tmp_path / f"img.{ext}"
    img.save(path)
    out = decode_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_decode_16_bit_uses_full_range(tmp_path):
    img = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    img.save(tmp_path / "deep.png")
    arr = np.asarray(decode_image(tmp_path / "deep.png"))
    assert arr.min() == 0 and arr.max() == 255  # not clipped to white


def test_decode_transparent_palette_composites_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    img.save(tmp_path / "t.png", transparency=0)
    assert np.asarray(decode_image(tmp_path / "t.png")).min() == 255


def test_decode_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert decode_image(tmp_path / "rot.jpg").size == (20, 40)


def test_decode_first_frame_of_gif(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert decode_image(tmp_path / "a.gif").size == (8, 8)


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "text"])
def test_decode_bad_files_raise_with_reason(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    if kind == "zero-byte":
        path.write_bytes(b"")
        reason = "empty file"
    elif kind == "truncated":
        truncated_jpeg(path)
        reason = "cannot decode"
    else:
        path.write_text("this is not a picture")
        reason = "cannot decode"
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_decode_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "missing.png")


def test_decode_does_not_leak_bytes_io(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buffer, "PNG")
    (tmp_path / "x.png").write_bytes(buffer.getvalue())
    assert decode_image(tmp_path / "x.png").size == (5, 5)


# ------------------------------------------------------------------------------------------- reduced scale


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def test_large_jpeg_is_decoded_at_reduced_scale_but_large_enough():
    rng = np.random.default_rng(0)
    data = _jpeg(Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((2000, 1500)))
    full = decode_bytes(data)
    for need, scale in (((224, 224), 2), ((150, 150), 4), ((80, 100), 8), ((400, 400), 1)):
        image = decode_bytes(data, min_size=need)
        assert draft_scale(data, need) == scale and image.size == (-(-2000 // scale), -(-1500 // scale))
        assert image.height >= DRAFT_MARGIN * need[0] and image.width >= DRAFT_MARGIN * need[1]
        small_full = np.asarray(full.resize(image.size, Image.BILINEAR), dtype=np.float32)
        assert np.abs(np.asarray(image, dtype=np.float32) - small_full).mean() < 8  # the same picture
    assert np.array_equal(np.asarray(decode_bytes(data, min_size=(600, 600))), np.asarray(full))  # 1/1: as ever


def test_small_or_non_jpeg_images_are_decoded_in_full(tmp_path):
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500), (1, 2, 3)).save(png)
    assert decode_image(png, min_size=(100, 100)).size == (2000, 1500)
    assert draft_scale(png.read_bytes(), (100, 100)) == 1
    small = make_image(tmp_path / "s.jpg", (90, 90, 90), size=300)
    assert np.array_equal(np.asarray(decode_image(small, min_size=(224, 224))), np.asarray(decode_image(small)))
    assert draft_scale(b"not an image", (10, 10)) == 1
    with pytest.raises(ImageDecodeError, match="cannot decode") as info:
        decode_bytes(truncated_jpeg(tmp_path / "t.jpg").read_bytes(), min_size=(8, 8))
    assert info.value.permanent


def test_reduced_scale_respects_exif_orientation():
    upright = Image.new("RGB", (1500, 2000), (220, 20, 20))  # red top half, blue bottom half
    upright.paste((20, 20, 220), (0, 1000, 1500, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter; shown upright after a 90-degree clockwise turn
    data = _jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    # 450 x 200 upright needs 900 x 400, i.e. 900 of the stored width: 1/2 scale (the wrong way round: none)
    image = decode_bytes(data, min_size=(450, 200))
    assert image.size == (750, 1000)
    array = np.asarray(image)
    assert array[:450, :, 0].mean() > 200 and array[550:, :, 2].mean() > 200


# ------------------------------------------------------------------------------------------- split


def test_stratified_split_is_seeded_and_stratified():
    labels = np.repeat([0, 1, 2], [10, 20, 3])
    tr1, va1 = stratified_split(labels, 0.2, seed=1)
    _tr2, va2 = stratified_split(labels, 0.2, seed=1)
    _, va3 = stratified_split(labels, 0.2, seed=2)
    assert np.array_equal(va1, va2) and not np.array_equal(va1, va3)
    assert set(tr1) | set(va1) == set(range(len(labels))) and not set(tr1) & set(va1)
    assert np.bincount(labels[va1]).tolist() == [2, 4, 1]


def test_split_keeps_an_image_on_each_side_of_small_classes():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    train, val = stratified_split(labels, 0.9)
    assert 0 in labels[train] and 0 in labels[val]


def test_load_images_split(tree):
    data = load_images(tree, val_split=0.5, seed=0)
    assert len(data.train) == 6 and len(data.val) == 6 and data.val_from == "split"
    everything = load_images(tree, val_split=0).train.paths
    assert sorted(map(str, data.train.paths + data.val.paths)) == sorted(map(str, everything))


def test_list_image_paths(tree):
    (tree / "red" / "x.txt").write_text("")
    paths, bad = list_image_paths([tree / "red", tree / "blue" / "blue_0.png"])
    assert len(paths) == 7 and len(bad) == 1
    with pytest.raises(DataNotFoundError, match=r"'.*nope' does not exist"):
        list_image_paths([tree / "nope"])


def test_missing_paths_among_good_ones_are_listed_with_their_reason(tree, tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    paths, bad = list_image_paths([tree / "red" / "red_0.png", tmp_path / "nope.png", tmp_path / "dangling",
                                   tmp_path / "loop"])
    assert paths == [tree / "red" / "red_0.png"]
    assert [b.reason for b in bad] == ["does not exist", f"broken symbolic link (to '{tmp_path / 'gone.png'}', "
                                       "which does not exist)", "a symbolic link loop"]
    with pytest.raises(DataNotFoundError, match="symbolic link loop"):
        list_image_paths([tmp_path / "loop"])


# ------------------------------------------------------------------------------------------- edge cases


def test_csv_quirks_are_reported_with_real_line_numbers(tmp_path):
    make_tree(tmp_path / "imgs", per_class=2)
    text = ("path,label\n\nimgs/red/red_0.png,red\nimgs/red/red_0.png,red\nimgs/blue/blue_0.png,blue,extra\n"
            "imgs/blue/blue_1.png,blue\n,blue\n")
    (tmp_path / "m.csv").write_text(text)
    data = load_images(tmp_path / "m.csv", val_split=0)
    assert len(data.train) == 2
    reasons = {b.path.rsplit(":", 1)[-1]: b.reason for b in data.bad_files}
    assert "duplicate row" in reasons["4"] and "more than the header" in reasons["5"]
    assert "without a path or a label" in reasons["7"]


def test_csv_conflicting_labels_and_encoding(tmp_path):
    make_tree(tmp_path / "imgs", per_class=1)
    (tmp_path / "m.csv").write_text("path,label\nimgs/red/red_0.png,red\nimgs/red/red_0.png,blue\n")
    with pytest.raises(DataError, match="two labels"):
        load_images(tmp_path / "m.csv")
    (tmp_path / "latin.csv").write_bytes("path,label\nimgs/red/red_0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_images(tmp_path / "latin.csv")


def test_csv_beside_a_symlinked_image_folder(tmp_path):
    make_tree(tmp_path / "elsewhere", per_class=2)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "imgs").symlink_to(tmp_path / "elsewhere")
    rows = ["path,label"] + [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    (tmp_path / "proj" / "m.csv").write_text("\n".join(rows))
    assert len(load_images(tmp_path / "proj" / "m.csv", val_split=0).train) == 4


@pytest.mark.parametrize(("train", "val"), [("Train", "Val"), ("training", "validation"), ("train", "valid")])
def test_split_folder_names_are_matched_loosely(tmp_path, train, val):
    make_tree(tmp_path / "d" / train, per_class=2)
    make_tree(tmp_path / "d" / val, per_class=1)
    data = load_images(tmp_path / "d")
    assert data.layout == "train-val" and data.train.class_names == ["blue", "red"] and len(data.val) == 2


def test_train_folder_alone_and_unlabelled_test_folder(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=4)
    make_image(tmp_path / "d" / "test" / "0001.png", (1, 1, 1))  # Kaggle-style: unlabelled
    data = load_images(tmp_path / "d", val_split=0.25)
    assert data.train.class_names == ["blue", "red"] and len(data.val) == 2
    assert any("holds no class folders" in n for n in data.notes)


def test_symlink_loops_are_not_followed_forever(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    (root / "red" / "loop").symlink_to(root / "red")
    assert load_images(root, val_split=0).train.class_counts() == {"blue": 2, "red": 2}


def test_split_keeps_identical_files_together():
    labels = np.array([0] * 10 + [1] * 10)
    groups = [f"g{i // 2}" for i in range(20)]  # pairs of identical files
    _train, val = stratified_split(labels, 0.3, seed=0, groups=groups)
    side = {g: ("val" if i in set(val) else "train") for i, g in enumerate(groups)}
    assert all(side[groups[i]] == ("val" if i in set(val) else "train") for i in range(20))
    assert len(val) % 2 == 0 and len(val) > 0


def test_load_images_split_keeps_copies_of_a_file_on_one_side(tmp_path):
    import shutil

    root = make_tree(tmp_path / "d", per_class=6)
    for cls in ("red", "blue"):  # every image twice, under another name
        for path in sorted((root / cls).iterdir()):
            shutil.copy(path, path.with_name("copy_" + path.name))
    for seed in range(5):
        data = load_images(root, val_split=0.3, seed=seed)
        train, val = {p.name for p in data.train.paths}, {p.name for p in data.val.paths}
        assert val and all(("copy_" + n in val) for n in val if not n.startswith("copy_"))
        assert not any(n.removeprefix("copy_") in train or "copy_" + n in train for n in val)


def test_single_class_is_fine_for_evaluation(tmp_path):
    make_tree(tmp_path / "d", classes=("red",), per_class=2)
    assert load_images(tmp_path / "d", val_split=0, min_classes=1).train.class_names == ["red"]


def test_float_image_in_unit_range(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(decode_image(tmp_path / "f.tif")).mean() == pytest.approx(128, abs=1)


def test_system_and_zip_leftovers_are_ignored_by_rule(tmp_path):
    tree = make_tree(tmp_path / "t")
    make_image(tree / "__MACOSX" / "red" / "._red_0.png", (0, 0, 0))  # what a zip made on a Mac unpacks to
    (tree / "red" / "Thumbs.db").write_bytes(b"\x00" * 10)
    (tree / "blue" / "desktop.ini").write_text("[.ShellClassInfo]")
    (tree / ".DS_Store").write_bytes(b"\x00")
    make_image(tree / "blue" / ".hidden" / "x.png", (0, 0, 0))
    data = load_images(tree, val_split=0)
    assert data.train.class_names == ["blue", "red"] and len(data.train) == 12 and data.bad_files == []


def test_a_run_folder_inside_the_data_is_skipped_and_listed(tmp_path):
    tree = make_tree(tmp_path / "t")
    (tree / "old_run").mkdir()
    (tree / "old_run" / "run.json").write_text("{}")
    make_image(tree / "old_run" / "report_thumb.png", (0, 0, 0))
    data = load_images(tree, val_split=0)
    assert data.train.class_names == ["blue", "red"]
    assert [b.reason for b in data.bad_files] == ["a headstart run folder, not a class: skipped (keep runs outside "
                                                  "the data)"]


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_and_not_remembered(tree, tmp_path, monkeypatch,
                                                                                      run_cli):
    import json

    Image.new("L", (1500, 1000)).save(tree / "red" / "big.png")
    monkeypatch.setenv("HEADSTART_MAX_PIXELS", "1000000")
    args = ["features", tree, "--cache-dir", tmp_path / "c", "--workers", "0", "-q", "--json"]
    code, out, err = run_cli(*args)
    result = json.loads(out)
    assert code == 0 and result["n_computed"] == 12 and err == ""  # no raw Pillow warning either
    assert [b["reason"] for b in result["bad_files"]] == [
        "image too large (1500 x 1000 = 2 MP; the limit is 1 MP; set HEADSTART_MAX_PIXELS to a larger number of "
        "pixels to allow it)"]
    monkeypatch.setenv("HEADSTART_MAX_PIXELS", "2000000")  # raised: the same bytes are decoded this time
    code, out, _ = run_cli(*args)
    assert json.loads(out)["n_computed"] == 1 and json.loads(out)["n_bad"] == 0
    monkeypatch.setenv("HEADSTART_MAX_PIXELS", "lots")
    with pytest.raises(UsageError, match="HEADSTART_MAX_PIXELS must be a whole number"):
        decode_bytes((tree / "red" / "big.png").read_bytes())
    code, _, err = run_cli(*args)
    assert code == 2 and "HEADSTART_MAX_PIXELS must be a whole number" in err


def test_in_class_order_renumbers_and_refuses_unknown_classes():
    from pathlib import Path

    from headstart.data import ImageSet, in_class_order
    from headstart.errors import DataError

    images = ImageSet([Path("a.png"), Path("b.png")], np.array([0, 1]), ["bees", "ants"])
    ordered = in_class_order(images, ["ants", "bees", "wasps"], "data/", "run 'r'", "fix it")
    assert ordered.labels.tolist() == [1, 0] and ordered.class_names == ["ants", "bees", "wasps"]
    with pytest.raises(DataError, match=r"'data/' has class\(es\) \['bees'\] that run 'r' was not trained on .*fix it"):
        in_class_order(images, ["ants"], "data/", "run 'r'", "fix it")
