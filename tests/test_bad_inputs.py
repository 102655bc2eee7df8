"""A corpus of bad inputs, made in code, each with its exact expected behaviour (issue 13).

Fastest first: decoding bytes (is it an RGB image, an ``ImageDecodeError`` with which reason, or an
image with one ``ImageWarning``?), listing a data folder or CSV manifest (which files are bad files, and
why; or which error), the CLI's argument checks (exit code 2 and the message, refused before a single
file is read), then two end-to-end runs on tiny images that hold many kinds at once (exit 0, every bad
file listed with its reason, the run continues) and a bounded fuzz of mutated bytes.

Each test's id is the kind it covers; ``KINDS`` below counts them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, make_image, make_tree, truncated_jpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from headstart.cli import main
from headstart.data import ImageDecodeError, ImageWarning, decode_bytes, decode_image, list_image_paths, load_images
from headstart.errors import DataError, DataNotFoundError, UsageError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(height: int = 24, width: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF block lists a tag with 100 bytes of data at an offset past its end."""
    tiff = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 100, 1000)
    return encode(noise(), "JPEG", exif=b"Exif\x00\x00" + tiff + struct.pack("<I", 0))


def rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(noise(20, 40), "JPEG", exif=exif.tobytes())


def damaged_tiff() -> bytes:
    """An LZW TIFF whose ResolutionUnit holds 40, a value libtiff complains about (on stderr) but decodes."""
    data = bytearray(encode(noise(), "TIFF", compression="tiff_lzw", dpi=(72, 72)))
    entry = bytes(data).index(struct.pack("<HHI", 0x0128, 3, 1))
    data[entry + 8:entry + 10] = struct.pack("<H", 40)
    return bytes(data)


def truncated_lzw_tiff() -> bytes:
    data = bytearray(encode(noise(), "TIFF", compression="tiff_lzw"))
    with Image.open(io.BytesIO(bytes(data))) as img:
        offset, count = img.tag_v2[273][0], img.tag_v2[279][0]
    data[offset + 10:offset + count] = b"\x00" * (count - 10)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def palette_with_transparency() -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(np.linspace(1000, 60000, 64, dtype=np.uint16).reshape(8, 8)), "PNG")


def full_jpeg() -> bytes:
    return encode(noise(96, 96), "JPEG")


# --------------------------------------------------------------------------------------------- decoding

# kind -> (bytes, expected): ("rgb", (width, height)) or ("bad", reason pattern, permanent)
DECODE_KINDS = {
    "zero-byte file": (lambda: b"", ("bad", r"^x: empty file \(0 bytes\)$", True)),
    "text renamed .jpg": (lambda: b"this is not a picture",
                          ("bad", r"^x: cannot decode image \(not a format Pillow reads; it starts with "
                                  r"b'this is ': a web page, a text file, an unfinished download\?\)$", True)),
    "HTML page saved as .jpg": (lambda: b"<html><body>404</body></html>", ("bad", r"starts with b'<html><b'", True)),
    "PNG signature only": (lambda: b"\x89PNG\r\n\x1a\n", ("bad", r"cannot decode image \(not a format", True)),
    "truncated JPEG": (lambda: full_jpeg()[:len(full_jpeg()) // 2],
                       ("bad", r"^x: cannot decode image \(image file is truncated", True)),
    "JPEG header only": (lambda: full_jpeg()[:100], ("bad", r"^x: cannot decode image \(", True)),
    "truncated PNG": (lambda: encode(noise(), "PNG")[:300],
                      ("bad", r"^x: cannot decode image \(image file is truncated", True)),
    "truncated LZW TIFF (libtiff's own words)": (
        truncated_lzw_tiff, ("bad", r"^x: cannot decode image \(decoder error -2; libtiff: LZWDecode: .*\)$", True)),
    "huge dimensions refused by header": (
        lambda: png_header(12000, 12000),
        ("bad", r"^x: image too large \(12000 x 12000 = 144 MP; the limit is 90 MP; set HEADSTART_MAX_PIXELS", False)),
    "beyond Pillow's own limit": (lambda: png_header(100000, 100000),
                                  ("bad", r"^x: image too large \(over 179 MP, the most Pillow opens", False)),
    "PNG bytes named .jpg (wrong extension)": (lambda: encode(noise(), "PNG"), ("rgb", (32, 24))),
    "JPEG bytes named .png (wrong extension)": (lambda: encode(noise(), "JPEG"), ("rgb", (32, 24))),
    "animated GIF": (animated_gif, ("rgb", (8, 8))),
    "16-bit PNG": (sixteen_bit_png, ("rgb", (8, 8))),
    "CMYK JPEG": (lambda: encode(noise().convert("CMYK"), "JPEG"), ("rgb", (32, 24))),
    "palette with transparency": (palette_with_transparency, ("rgb", (4, 4))),
    "grayscale": (lambda: encode(noise().convert("L"), "PNG"), ("rgb", (32, 24))),
    "grayscale with alpha": (lambda: encode(noise().convert("LA"), "PNG"), ("rgb", (32, 24))),
    "RGBA": (lambda: encode(noise().convert("RGBA"), "PNG"), ("rgb", (32, 24))),
    "1x1 image": (lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), ("rgb", (1, 1))),
    "EXIF rotation": (rotated_jpeg, ("rgb", (20, 40))),
    "BMP, WebP, ICO, PPM": (lambda: encode(noise(), "WEBP"), ("rgb", (32, 24))),
}


@pytest.mark.parametrize("kind", list(DECODE_KINDS), ids=list(DECODE_KINDS))
def test_decode(kind):
    make, expected = DECODE_KINDS[kind]
    data = make()
    if expected[0] == "rgb":
        image = decode_bytes(data, "x")
        assert image.mode == "RGB" and image.size == expected[1]
        return
    with pytest.raises(ImageDecodeError, match=expected[1]) as info:
        decode_bytes(data, "x")
    assert info.value.permanent is expected[2]  # permanent: remembered in the cache, never retried


def test_decoded_pixels_of_the_odd_modes():
    gif = np.asarray(decode_bytes(animated_gif()))
    assert tuple(gif[0, 0]) == (255, 0, 0)  # the first frame
    sixteen = np.asarray(decode_bytes(sixteen_bit_png()))
    assert sixteen.min() == 0 and sixteen.max() == 255  # the full 16-bit range stretched onto 8 bits
    palette = np.asarray(decode_bytes(palette_with_transparency()))
    assert tuple(palette[0, 0]) == (255, 255, 255) and tuple(palette[1, 1]) == (255, 0, 0)  # on white
    gray = np.asarray(decode_bytes(encode(noise().convert("L"), "PNG")))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for fmt in ("BMP", "PPM", "TIFF"):
        assert decode_bytes(encode(noise(), fmt)).size == (32, 24)
    assert decode_bytes(encode(noise(), "ICO")).mode == "RGB"  # an icon keeps its own standard size


@pytest.mark.parametrize(("kind", "make", "said"), [
    ("corrupt EXIF", corrupt_exif_jpeg, "x.jpg: corrupt EXIF data (ignored, image used)"),
    ("damaged TIFF tag (libtiff on stderr)", damaged_tiff,
     'x.jpg: damaged TIFF data (libtiff: _TIFFVSetField: tempfile.tif: Bad value 40 for "ResolutionUnit" tag.; '
     "image used)"),
])
def test_a_decoder_warning_is_one_image_warning_naming_the_file(kind, make, said, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = decode_bytes(make(), "x.jpg")
    assert image.mode == "RGB"
    assert [(w.category, str(w.message)) for w in caught] == [(ImageWarning, said)]
    assert capfd.readouterr().err == ""  # nothing of Pillow's or libtiff's own reaches stderr


def test_the_orientation_read_without_pillows_warnings_agrees_with_pillow():
    """The GPU path's reader threads read the orientation without Pillow's EXIF parser (whose warnings
    cannot be caught in threads); a damaged block sends the file to Pillow, which names it."""
    from headstart.data.decode import quiet_orientation

    xmp = encode(noise(), "JPEG", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
    truncated_ifd = encode(noise(), "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00")
    for data, expected in ((rotated_jpeg(6), 6), (rotated_jpeg(3), 3), (full_jpeg(), 1), (xmp, 8),
                           (truncated_ifd, None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without JFIF density, opening parses EXIF for the dpi (and warns)
            with Image.open(io.BytesIO(data)) as img:
                assert quiet_orientation(img) == expected
                if expected is not None:
                    assert img.getexif().get(0x0112, 1) == expected


def test_the_pixel_limit_is_configurable(monkeypatch):
    data = encode(noise(100, 100), "PNG")
    monkeypatch.setenv("HEADSTART_MAX_PIXELS", "5000")
    with pytest.raises(ImageDecodeError, match=r"100 x 100 = 0 MP; the limit is 0.005 MP"):
        decode_bytes(data, "x")
    monkeypatch.setenv("HEADSTART_MAX_PIXELS", "10000")
    assert decode_bytes(data, "x").size == (100, 100)
    monkeypatch.setenv("HEADSTART_MAX_PIXELS", "-3")
    with pytest.raises(UsageError, match=r"\$HEADSTART_MAX_PIXELS must be a whole number of pixels, e.g. 200000000; "
                                         "got '-3'"):
        decode_bytes(data, "x")


@pytest.mark.skipif(IS_ROOT, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = make_image(tmp_path / "locked.png", (1, 2, 3))
    path.chmod(0)
    with pytest.raises(ImageDecodeError, match=r"locked.png: cannot read file \(Permission denied\)"):
        decode_image(path)


def test_missing_file_between_listing_and_decoding(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"gone.png: file not found$"):
        decode_image(tmp_path / "gone.png")


_BASES = [full_jpeg(), rotated_jpeg(), corrupt_exif_jpeg(), encode(noise(), "PNG"), animated_gif(),
          encode(noise(), "BMP"), encode(noise(), "WEBP"), encode(noise(), "TIFF", compression="tiff_lzw"),
          encode(noise().convert("CMYK"), "JPEG"), sixteen_bit_png(), palette_with_transparency()]


@st.composite
def mutated_images(draw):
    """A real encoded image with a few bytes changed, inserted, deleted, or its tail cut off."""
    data = bytearray(draw(st.sampled_from(_BASES)))
    for _ in range(draw(st.integers(1, 6))):
        op, at = draw(st.sampled_from(["set", "cut", "insert", "delete"])), draw(st.integers(0, len(data)))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(mutated_images(), st.binary(max_size=256)))
def test_fuzzed_bytes_decode_to_rgb_or_fail_cleanly(data, capfd):
    """Any bytes: an RGB image (warnings, if any, are ImageWarnings naming the file) or ImageDecodeError;
    never another exception, never a library's own warning or text on stderr."""
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        patch.setenv("HEADSTART_MAX_PIXELS", "4000000")  # a mutated header may claim a large image: keep it quick
        warnings.simplefilter("always")
        try:
            image = decode_bytes(data, "fuzz.jpg")
            assert image.mode == "RGB" and min(image.size) >= 1
        except ImageDecodeError as exc:
            assert str(exc).startswith(("fuzz.jpg: cannot decode image (", "fuzz.jpg: empty file",
                                        "fuzz.jpg: image too large ("))
    assert all(w.category is ImageWarning and str(w.message).startswith("fuzz.jpg: ") for w in caught)
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- listing


def _reasons(bad) -> dict[str, str]:
    return {Path(b.path).name: b.reason for b in bad}


def test_files_that_are_not_images_where_images_belong(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    (root / "red" / "notes.txt").write_text("shot on a sunny day")
    make_image(root / "stray.png", (0, 0, 0))  # beside the class folders, not in one
    os.symlink("nowhere.png", root / "red" / "broken.png")
    os.symlink("loop_b.png", root / "red" / "loop_a.png")
    os.symlink("loop_a.png", root / "red" / "loop_b.png")
    data = load_images(root, val_split=0)
    assert len(data.train) == 4
    assert _reasons(data.bad_files) == {
        "stray.png": "not inside a class folder (images must be in ROOT/<class>/)",
        "notes.txt": "not an image extension (.txt); expected one of .bmp, .gif, .jfif, .jpeg, .jpg, .pbm, .pgm, "
                     ".png, .ppm, .tif, .tiff, .webp",
        "broken.png": "broken symbolic link (to 'nowhere.png', which does not exist)",
        "loop_a.png": "a symbolic link loop",
        "loop_b.png": "a symbolic link loop",
    }


def test_names_and_folders_that_are_not_what_they_seem(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    make_image(root / "red" / "folder.jpg" / "inside.png", (220, 30, 30))  # a directory named x.jpg: searched
    make_image(root / "red" / "with space ünïcødé 猫.png", (220, 30, 30))
    (root / "blue" / "loop").symlink_to(root / "blue")  # a folder link loop: walked once
    names = {"inside.png", "with space ünïcødé 猫.png"}
    if sys.platform == "linux":  # only Linux file systems take names that are not UTF-8
        shutil.copy(root / "red" / "red_0.png", root / "red" / os.fsdecode(b"\xff\xfeodd.png"))
        names.add(os.fsdecode(b"\xff\xfeodd.png"))
    data = load_images(root, val_split=0)
    assert data.bad_files == [] and names <= {p.name for p in data.train.paths}
    assert data.train.class_counts() == {"blue": 2, "red": 2 + len(names)}
    assert all(decode_image(p).mode == "RGB" for p in data.train.paths)


def test_what_systems_and_zip_tools_leave_behind_is_ignored_by_rule(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    make_image(root / "__MACOSX" / "red" / "._red_0.png", (0, 0, 0))
    (root / "red" / "._red_0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble resource fork
    (root / "red" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".DS_Store").write_bytes(b"\x00")
    (root / "blue" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "blue" / "desktop.ini").write_text("[.ShellClassInfo]")
    make_image(root / "blue" / ".hidden.png", (0, 0, 0))
    make_image(root / ".git" / "objects" / "x.png", (0, 0, 0))
    data = load_images(root, val_split=0)
    assert data.train.class_names == ["blue", "red"] and len(data.train) == 4 and data.bad_files == []


def test_a_run_folder_inside_the_data_is_skipped_and_listed(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    (root / "my_run").mkdir()
    (root / "my_run" / "run.json").write_text("{}")
    data = load_images(root, val_split=0)
    assert data.train.class_names == ["blue", "red"]
    assert _reasons(data.bad_files) == {"my_run": "a headstart run folder, not a class: skipped (keep runs outside "
                                                  "the data)"}


FOLDER_ERRORS = [  # (kind, how to build it under the data folder, error, message pattern)
    ("empty class folder", lambda r: (make_tree(r, 2), (r / "green").mkdir()), DataError,
     r"^class folder\(s\) 'green' in '.*' hold no image file; add images or remove the folder\(s\)$"),
    ("class folder with no image file", lambda r: (make_tree(r, 2), (r / "green").mkdir(),
                                                   (r / "green" / "a.txt").write_text("x")), DataError,
     r"'green' in '.*' hold no image file"),
    ("single class", lambda r: make_tree(r, 2, ("red",)), DataError,
     r"needs at least 2 classes to train a classifier; found only 'red'. Give each class its own folder"),
    ("images loose in the root", lambda r: [make_image(r / f"{i}.png", (0, 0, 0)) for i in range(2)], DataError,
     r"holds no class folders; expected a folder of class folders"),
    ("only unknown extensions", lambda r: [(r / c).mkdir(parents=True) or (r / c / "x.heic").write_bytes(b"x")
                                           for c in ("a", "b")], DataError,
     r"none with an image extension \(got \.heic; expected one of"),
    ("data path missing", lambda r: None, DataNotFoundError, r"^data path '.*' does not exist; expected a folder"),
    ("data path is a file, not a CSV", lambda r: r.parent.mkdir(exist_ok=True) or r.write_text("x"), DataError,
     r"is a file but not a \.csv manifest"),
    ("val/ class unknown to train/", lambda r: (make_tree(r / "train", 2), make_tree(r / "val", 1, ("green",))),
     DataError, r"validation folder '.*val' has class\(es\) \['green'\] that '.*train' lacks"),
    ("val/ without train/", lambda r: (make_tree(r / "val", 1), make_tree(r / "other", 1)), DataError,
     r"has a 'val/' folder but no 'train/' folder beside it; rename the training folder to 'train'"),
]


@pytest.mark.parametrize(("kind", "build", "error", "message"), FOLDER_ERRORS, ids=[k[0] for k in FOLDER_ERRORS])
def test_data_folders_that_cannot_be_used(tmp_path, kind, build, error, message):
    root = tmp_path / "d"
    build(root)
    with pytest.raises(error, match=message):
        load_images(root, val_split=0)


def _manifest(tmp_path, *rows: str, encoding: str = "utf-8") -> Path:
    make_tree(tmp_path / "imgs", per_class=2)
    path = tmp_path / "m.csv"
    path.write_bytes("\n".join(rows).encode(encoding))
    return path


GOOD_ROWS = ("imgs/red/red_0.png,red", "imgs/blue/blue_0.png,blue")


CSV_SKIPPED = [  # (kind, rows after the good ones, bad files: name -> reason)
    ("CSV: missing file", ("imgs/red/nope.png,red",), {"nope.png": "file not found (listed in the CSV)"}),
    ("CSV: empty label", ("imgs/red/red_1.png,",), {"m.csv:4": "row without a path or a label"}),
    ("CSV: duplicate rows", ("imgs/red/red_0.png,red",),
     {"m.csv:4": "duplicate row for 'imgs/red/red_0.png' (kept the first)"}),
    ("CSV: extra field", ("imgs/red/red_1.png,red,sunny",),
     {"m.csv:4": "row has 1 field(s) more than the header; quote paths that contain commas"}),
    ("CSV: not an image", ("imgs/red/notes.txt,red",), {"notes.txt": "not an image extension (.txt)"}),
]


@pytest.mark.parametrize(("kind", "rows", "bad"), CSV_SKIPPED, ids=[k[0] for k in CSV_SKIPPED])
def test_csv_rows_that_are_skipped(tmp_path, kind, rows, bad):
    data = load_images(_manifest(tmp_path, "path,label", *GOOD_ROWS, *rows), val_split=0)
    assert len(data.train) == 2 and _reasons(data.bad_files) == bad


CSV_ERRORS = [  # (kind, rows, encoding, message pattern)
    ("CSV: wrong columns", ("file,class", "imgs/red/red_0.png,red"), "utf-8",
     r"needs the columns 'path' and 'label' in a header row; missing 'path', 'label', found \['file', 'class'\]"),
    ("CSV: one path, two labels", ("path,label", *GOOD_ROWS, "imgs/red/red_0.png,blue"), "utf-8",
     r"line 4: 'imgs/red/red_0.png' is listed with two labels, 'red' and 'blue'; keep one"),
    ("CSV: not UTF-8", ("path,label", "imgs/red/red_0.png,café"), "latin-1", r"is not UTF-8 text .*; save it as UTF-8"),
    ("CSV: path leaving its folder", ("path,label", "../outside.png,red"), "utf-8",
     r"points outside the CSV's folder .*; give paths relative to the CSV, below its folder"),
    ("CSV: no usable row", ("path,label", "imgs/red/gone.png,red"), "utf-8",
     r"lists no usable image \(1 rows skipped, e.g. .*gone.png: file not found \(listed in the CSV\)\); give rows"),
]


@pytest.mark.parametrize(("kind", "rows", "encoding", "message"), CSV_ERRORS, ids=[k[0] for k in CSV_ERRORS])
def test_csv_manifests_that_cannot_be_used(tmp_path, kind, rows, encoding, message):
    with pytest.raises(DataError, match=message):
        load_images(_manifest(tmp_path, *rows, encoding=encoding), val_split=0)


def test_predict_inputs_missing_or_odd_among_good_ones(tmp_path):
    good = make_image(tmp_path / "good.png", (1, 2, 3))
    (tmp_path / "notes.txt").write_text("x")
    make_image(tmp_path / "folder" / "in_folder.png", (1, 2, 3))
    (tmp_path / "folder" / "readme.md").write_text("x")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    paths, bad = list_image_paths([good, tmp_path / "nope.jpg", tmp_path / "folder", tmp_path / "notes.txt",
                                   tmp_path / "dangling.jpg"])
    assert [p.name for p in paths] == ["good.png", "in_folder.png", "notes.txt"]  # a named file is tried (and fails)
    assert _reasons(bad) == {"nope.jpg": "does not exist", "readme.md": "not an image extension (.md)",
                             "dangling.jpg": f"broken symbolic link (to '{tmp_path / 'gone.jpg'}', which does not "
                                             "exist)"}
    with pytest.raises(DataNotFoundError, match=r"'.*nope.jpg' does not exist; give image files or folders of images"):
        list_image_paths([tmp_path / "nope.jpg"])


# ---------------------------------------------------------------------------------- copies and leakage


def _split(data_dir: Path, tmp_path: Path, capsys):
    from headstart.cache import FeatureCache
    from headstart.train_common import split_train_val
    from headstart.training import TrainConfig

    with FeatureCache(tmp_path / "c") as cache:
        out = split_train_val(load_images(data_dir, val_split=0), TrainConfig(), cache, progress=True)
    return out, capsys.readouterr().err


def test_byte_identical_files_across_classes_are_warned_about(tmp_path, capsys):
    root = make_tree(tmp_path / "d", per_class=3)
    shutil.copy(root / "red" / "red_0.png", root / "blue" / "looks_blue.png")
    _, err = _split(root, tmp_path, capsys)
    assert err.startswith("warning: 1 image(s) appear, byte for byte, in more than one class, e.g. [")
    assert "looks_blue.png" in err and "red_0.png" in err


def test_byte_identical_train_and_val_copies_are_warned_about_and_returned(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train", per_class=3)
    make_tree(tmp_path / "d" / "val", per_class=1, classes=("blue", "red"))
    shutil.copy(tmp_path / "d" / "train" / "red" / "red_2.png", tmp_path / "d" / "val" / "red" / "again.png")
    (_, _, _, leaks), err = _split(tmp_path / "d", tmp_path, capsys)
    assert [(Path(a).name, Path(b).name) for a, b in leaks] == [("red_2.png", "again.png")]
    assert "warning: 1 of 3 validation image(s) are byte-identical copies of training images" in err


# ----------------------------------------------------------------------------- CLI values, refused early


@pytest.fixture
def no_file_read(monkeypatch):
    """Fail the test if any image file is read and hashed (what comes before every feature)."""
    from headstart.cache import FeatureCache

    def refuse(self, paths):
        raise AssertionError(f"{len(paths)} files read before the bad argument was refused")
    monkeypatch.setattr(FeatureCache, "image_keys", refuse)


BAD_ARGUMENTS = [  # (kind, argv after the data or run argument, exit code, message pattern)
    ("train --cv 1", ["--cv", "1"], 2, r"cv \(--cv\) must be at least 2 folds"),
    ("train --cv -3", ["--cv", "-3"], 2, r"cv \(--cv\) must be at least 2 folds .*; got -3"),
    ("train --cv 0 with selection", ["--cv", "0"], 2, r"--cv 0 turns cross-validation off.*use --select none"),
    ("train --cv too large", ["--select", "none", "--cv", "100"], 2,
     r"--cv 100 needs at least 100 images in every class \(the smallest has 3\); lower --cv to 3 or less"),
    ("train --cv not a number", ["--cv", "five"], 2, r"argument --cv: invalid int value: 'five'"),
    ("train --batch-size 0", ["--batch-size", "0"], 2, r"batch_size must be a positive integer; got 0"),
    ("train --batch-size -1", ["--batch-size", "-1"], 2, r"batch_size must be a positive integer; got -1"),
    ("train --workers -1", ["--workers", "-1"], 2, r"num_workers must be an integer >= 0"),
    ("train --val-split 1.5", ["--val-split", "1.5"], 2, r"val_split must be in \[0, 1\); got 1.5"),
    ("train --val-split -0.1", ["--val-split", "-0.1"], 2, r"val_split must be in \[0, 1\); got -0.1"),
    ("train --val-split abc", ["--val-split", "abc"], 2, r"argument --val-split: invalid float value: 'abc'"),
    ("train --seed -1", ["--seed", "-1"], 2, r"seed must be an integer >= 0; got -1"),
    ("train --ensemble 0", ["--ensemble", "0"], 2, r"ensemble \(members per backbone\) must be a positive integer"),
    ("train --epochs 0 (mlp)", ["--select", "none", "--head", "mlp", "--epochs", "0"], 2,
     r"epochs must be a positive integer; got 0"),
    ("train --epochs without a use", ["--epochs", "-3"], 2, r"--epochs sets the epochs of fine-tuning .* drop it"),
    ("train --hidden 0", ["--select", "none", "--head", "mlp", "--hidden", "0"], 2,
     r"hidden must be a positive integer; got 0"),
    ("train --hidden on a linear head", ["--select", "none", "--hidden", "8"], 2,
     r"--hidden is the width of the mlp head; add --select none --head mlp"),
    ("train --weight-decay -1", ["--select", "none", "--weight-decay", "-1"], 2, r"weight_decay must be"),
    ("train --lr without fine-tuning", ["--lr", "0.1"], 2,
     r"--lr set\(s\) fine-tuning, but --freeze is 'all'.*add --freeze none, N, auto or probe, or drop them"),
    ("train --lr -1", ["--freeze", "none", "--lr", "-1"], 2, r"lr \(--lr\) must be a number > 0, e.g. 1e-3; got -1.0"),
    ("train --patience -1", ["--freeze", "none", "--patience", "-1"], 2,
     r"patience \(--patience\) must be an integer >= 0 \(0 = off\); got -1"),
    ("train --freeze 99", ["--freeze", "99"], 2,
     r"--freeze 99: tf_efficientnet_lite0 has 8 stages \(.*\); give N from 0 to 8 \(see 'headstart backbones"),
    ("train --freeze lots", ["--freeze", "lots"], 2, r"--freeze must be all, none, auto, probe or a number"),
    ("train --budget 0", ["--freeze", "auto", "--budget", "0"], 2, r"budget \(minutes > 0\)"),
    ("train --aug-views 0", ["--augment", "standard", "--aug-views", "0"], 2, r"aug_views must be a positive integer"),
    ("train --aug-param without a preset", ["--aug-param", "affine.degrees=3"], 2,
     r"aug_params \(--aug-param\) \['affine'\] change an augmentation preset, but there is none; add e.g. --augment"),
    ("train --aug-param unknown setting", ["--augment", "standard", "--aug-param", "affine.nosuch=3"], 2,
     r"'affine' has no setting 'nosuch'"),
    ("train --aug-param malformed", ["--aug-param", "nonsense"], 2, r"--aug-param 'nonsense' must look like STEP"),
    ("train --grid-C 0", ["--grid-C", "0"], 2, r"grid C must list numbers > 0"),
    ("train --grid-C abc", ["--grid-C", "abc"], 2, r"--grid-C must list values separated by commas; got 'abc'"),
    ("train --grid-mlp -4", ["--grid-mlp", "-4"], 2, r"grid mlp must list hidden widths \(positive integers\)"),
    ("train --grid-max-images 10", ["--grid-max-images", "10"], 2, r"max_images must be a whole number >= 100"),
    ("train unknown backbone", ["--backbone", "resnet5O"], 2, r"'resnet5O' is not a known backbone; did you mean"),
    ("train unknown head", ["--head", "forest"], 2, r"argument --head: invalid choice: 'forest'"),
    ("train --weights missing", ["--weights", "{tmp}/nope.pth"], 2,
     r"weights \(--weights\) '.*nope.pth' is neither 'default', 'random' nor an existing file"),
    ("train --weights a folder", ["--weights", "{tmp}"], 2, r"weights \(--weights\) '.*' is a folder"),
    ("train --out inside the data", ["--out", "{data}/run"], 2,
     r"--out '.*run' is inside the data folder .*; write the run outside the data folder"),
    ("sweep --cv 1", ["sweep", "--cv", "1"], 2, r"cv \(--cv\) must be an integer >= 2"),
    ("sweep --top 0", ["sweep", "--top", "0"], 2, r"--top must be >= 1; got 0"),
    ("sweep --aug-views -1", ["sweep", "--aug-views", "-1"], 2, r"aug_views \(--aug-views\) must list view counts"),
    ("sweep unknown backbone", ["sweep", "--backbone", "nosuchnet"], 2, r"--backbone: 'nosuchnet' is not a known"),
    ("sweep --out inside the data", ["sweep", "--out", "{data}/sweep"], 2,
     r"--out '.*sweep' is inside the data folder .* where the sweep would be read as a class"),
    ("features --batch-size 0", ["features", "--batch-size", "0"], 2, r"batch_size \(--batch-size\) must be"),
    ("features --weights missing", ["features", "--weights", "{tmp}/nope.pth"], 2, r"weights \(--weights\)"),
    ("predict --top-k 0", ["predict", "--top-k", "0"], 2, r"top_k \(--top-k\) must be a whole number >= 1"),
    ("predict --top-k x", ["predict", "--top-k", "x"], 2, r"argument --top-k: invalid int value: 'x'"),
    ("predict --tta bogus", ["predict", "--tta", "bogus"], 2, r"argument --tta: invalid choice: 'bogus'"),
    ("predict --workers -1", ["predict", "--workers", "-1"], 2, r"num_workers \(--workers\) must be an integer >= 0"),
    ("evaluate --batch-size -2", ["evaluate", "--batch-size", "-2"], 2, r"batch_size \(--batch-size\) must be"),
    ("augment-preview --out not a PNG", ["augment-preview", "--out", "{tmp}/x.jpg"], 2,
     r"--out must name a .png file, e.g. preview.png"),
    ("augment-preview --n 0", ["augment-preview", "--out", "{tmp}/x.png", "--n", "0"], 2, r"n \(--n\) must be"),
    ("pca-stats --seed -1", ["pca-stats", "--seed", "-1"], 2, r"seed \(--seed\) must be an integer >= 0; got -1"),
    ("$HEADSTART_MAX_PIXELS not a number", ["features", "--env", "HEADSTART_MAX_PIXELS=lots"], 2,
     r"\$HEADSTART_MAX_PIXELS must be a whole number of pixels"),
]


def _argv(args: list[str], data: Path, tmp_path: Path) -> list[str]:
    """The full command line: ``train DATA --out OUT`` unless ``args`` starts with another command."""
    args = [a.format(data=data, tmp=tmp_path) for a in args]
    command = args.pop(0) if args and not args[0].startswith("-") else "train"
    where = {"train": [str(data)], "sweep": [str(data)], "features": [str(data)], "augment-preview": [str(data)],
             "pca-stats": [str(data)], "predict": [str(tmp_path / "no-run"), str(data)],
             "evaluate": [str(tmp_path / "no-run"), str(data)]}[command]
    out = [] if command not in ("train", "sweep") or "--out" in args else ["--out", str(tmp_path / "out")]
    return [command, *where, *args, *out]


@pytest.mark.parametrize(("kind", "args", "code", "message"), BAD_ARGUMENTS, ids=[k[0] for k in BAD_ARGUMENTS])
def test_bad_argument_is_refused_before_any_file_is_read(kind, args, code, message, tmp_path, capsys, monkeypatch,
                                                         no_file_read):
    data = make_tree(tmp_path / "data", per_class=3)
    args = list(args)
    if "--env" in args:
        name, value = args.pop(args.index("--env") + 1).split("=")
        args.remove("--env")
        monkeypatch.setenv(name, value)
    argv = _argv(list(args), data, tmp_path)
    try:
        got = main([*argv, "--cache-dir", str(tmp_path / "c"), "-q"])
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    err = capsys.readouterr().err
    assert got == code, err
    assert re_search(message, err), err
    if "invalid" not in message:  # argparse prints its usage first; ours is one line
        assert len(err.strip().splitlines()) == 1, err


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


# ------------------------------------------------------------------------------------- end to end


SPOILT = {  # file under the data folder -> the reason it is listed with in bad_files.json (a regex)
    "red/zero.jpg": r"^empty file \(0 bytes\)$",
    "red/text.jpg": r"^cannot decode image \(not a format Pillow reads; it starts with b'not an i'",
    "red/truncated.jpg": r"^cannot decode image \(image file is truncated",
    "blue/truncated.png": r"^cannot decode image \(image file is truncated",
    "blue/huge.png": r"^image too large \(12000 x 12000 = 144 MP; the limit is 90 MP",
    "blue/notes.txt": r"^not an image extension \(\.txt\)",
    "blue/broken.png": r"^broken symbolic link \(to 'nowhere.png', which does not exist\)$",
    "blue/loop.jpg": r"^a symbolic link loop$",
    "stray.png": r"^not inside a class folder",
    "old_run": r"^a headstart run folder, not a class: skipped",
    "green/empty.png": r"^empty file \(0 bytes\)$",
}


def _spoilt_tree(root: Path) -> tuple[Path, int]:
    """Good images of three classes (green has one) among the bad kinds of ``SPOILT`` and odd but good ones;
    returns the folder and the number of usable images."""
    make_tree(root, per_class=4, classes=("red", "blue"))
    make_image(root / "green" / "only.png", COLORS["green"])  # a class with a single image
    (root / "red" / "zero.jpg").write_bytes(b"")
    (root / "red" / "text.jpg").write_text("not an image, just text")
    truncated_jpeg(root / "red" / "truncated.jpg")
    (root / "blue" / "truncated.png").write_bytes(encode(noise(), "PNG")[:300])
    (root / "blue" / "huge.png").write_bytes(png_header(12000, 12000))
    (root / "blue" / "notes.txt").write_text("x")
    os.symlink("nowhere.png", root / "blue" / "broken.png")
    os.symlink("loop.jpg", root / "blue" / "loop.jpg")
    make_image(root / "stray.png", (0, 0, 0))
    (root / "old_run").mkdir()
    (root / "old_run" / "run.json").write_text("{}")
    (root / "green" / "empty.png").write_bytes(b"")
    odd = {"red/exif.jpg": corrupt_exif_jpeg(), "red/rotated.jpg": rotated_jpeg(), "red/cmyk.jpg":
           encode(noise(seed=3).convert("CMYK"), "JPEG"), "red/gray.png": encode(noise(seed=4).convert("L"), "PNG"),
           "blue/anim.gif": animated_gif(), "blue/deep16.png": sixteen_bit_png(), "blue/pal.png":
           palette_with_transparency(), "blue/tiny.png": encode(Image.new("RGB", (1, 1), (0, 0, 200)), "PNG"),
           "blue/really_a_png.jpg": encode(noise(seed=5), "PNG"), "red/naïve name.png": encode(noise(seed=6), "PNG")}
    for name, data in odd.items():
        (root / name).write_bytes(data)
    make_image(root / "red" / "folder.jpg" / "inside.png", COLORS["red"])
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._x.png").write_bytes(b"\x00\x05")
    (root / "red" / ".DS_Store").write_bytes(b"\x00")
    (root / "blue" / "Thumbs.db").write_bytes(b"\x00")
    (root / "red" / "._red_0.png").write_bytes(b"\x00\x05")
    shutil.copy(root / "red" / "red_0.png", root / "blue" / "red_in_blue.png")  # the same bytes in two classes
    return root, 4 + 4 + 1 + len(odd) + 1 + 1


@pytest.fixture(scope="module")
def spoilt(tmp_path_factory):
    """One ``headstart train`` on the spoilt tree: (data, run, usable images, exit code, stderr)."""
    tmp = tmp_path_factory.mktemp("spoilt")
    data, usable = _spoilt_tree(tmp / "data")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default", ImageWarning)
        code = main(["train", str(data), "--out", str(tmp / "run"), "--cache-dir", str(tmp / "c"), "--workers", "0"])
    return data, tmp / "run", usable, code, err.getvalue()


def test_a_train_on_a_spoilt_folder_lists_every_bad_file_and_continues(spoilt):
    data, run, usable, code, err = spoilt
    assert code == 0, err
    bad = {os.path.relpath(b["path"], data): b["reason"] for b in json.loads((run / "bad_files.json").read_text())}
    assert set(bad) == set(SPOILT), bad
    for name, pattern in SPOILT.items():
        assert re_search(pattern, bad[name]), (name, bad[name])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_train"] == usable
    assert json.loads((run / "run.json").read_text())["class_names"] == ["blue", "green", "red"]


def test_a_train_on_a_spoilt_folder_says_each_thing_once_in_one_line(spoilt):
    data, _, _, _, err = spoilt
    lines = err.splitlines()
    assert f"headstart train: warning: {data / 'red' / 'exif.jpg'}: corrupt EXIF data (ignored, image used)" in lines
    assert sum("appear, byte for byte, in more than one class" in line for line in lines) == 1
    assert any(line.startswith("note: a class has a single distinct usable image") for line in lines)
    for name in SPOILT:
        assert sum(line.startswith(f"skipped {data / name}: ") for line in lines) == 1, name
    assert not [line for line in lines if "Traceback" in line or "UserWarning" in line or "PIL" in line]


@pytest.mark.filterwarnings("default::headstart.data.ImageWarning")
def test_predict_skips_what_it_cannot_read_and_classifies_the_rest_in_worker_processes(spoilt, tmp_path, capfd):
    data, run, _, _, _ = spoilt
    (tmp_path / "listing.txt").write_text("not an image")
    argv = ["predict", str(run), str(data / "red" / "red_1.png"), str(data / "red" / "exif.jpg"),
            str(tmp_path / "missing.jpg"), str(data / "red" / "folder.jpg"), str(tmp_path / "listing.txt"),
            str(data / "blue" / "broken.png"), "--format", "json", "--cache-dir", str(tmp_path / "c"),
            "--workers", "1", "--batch-size", "1", "-q"]
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert sorted(Path(p["path"]).name for p in result["predictions"]) == ["exif.jpg", "inside.png", "red_1.png"]
    assert {Path(b["path"]).name: b["reason"].split(" (")[0] for b in result["bad_files"]} == {
        "missing.jpg": "does not exist", "listing.txt": "cannot decode image",
        "broken.png": "broken symbolic link"}
    lines = err.splitlines()  # the decoding happened in a worker process: its warning is the same one line
    assert any(line.endswith(f"headstart predict: warning: {data / 'red' / 'exif.jpg'}: corrupt EXIF data "
                             "(ignored, image used)") for line in lines), err
    assert sum(line.startswith("skipped ") for line in lines) == 3


# ------------------------------------------------------------------------------------------ the count

KINDS = (list(DECODE_KINDS) + ["decoded pixels of odd modes", "corrupt EXIF", "damaged TIFF tag",
                               "configurable pixel limit", "unreadable file", "file gone before decoding",
                               "fuzzed bytes", "not-image file in a class", "image outside a class folder",
                               "broken symlink", "symlink loop", "directory named x.jpg", "spaces and unicode names",
                               "non-UTF-8 name", "folder link loop", "hidden files", "__MACOSX, ._*, .DS_Store, "
                               "Thumbs.db", "run folder inside the data", "empty class folder", "single class",
                               "class with one image (end to end)", "byte-identical files across classes",
                               "byte-identical train/val copies", "predict: missing, folder, non-image, broken link"]
         + [k[0] for k in FOLDER_ERRORS + CSV_SKIPPED + CSV_ERRORS + BAD_ARGUMENTS])


def test_the_corpus_has_at_least_40_kinds():
    assert len(set(KINDS)) >= 40
