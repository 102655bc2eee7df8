"""Find labelled images in a folder or CSV manifest, decode them safely, and split them.

Three layouts are understood (see :func:`load_images`):

* ``ROOT/<class>/<image>`` -- one class folder per class (torchvision's ImageFolder layout);
* ``ROOT/train/<class>/<image>`` plus ``ROOT/val/...`` (or ``valid/``, ``validation/``, ``test/``);
* a CSV manifest with the columns ``path,label`` (paths relative to the CSV's folder).

``images`` finds files and labels, ``decode`` turns bytes into RGB, ``split`` owns the one
stratified, content-grouped split, and ``load`` recognises the layout and puts them together.
"""

from __future__ import annotations

from .decode import (
    DECODE_VERSION,
    DRAFT_MARGIN,
    ImageDecodeError,
    ImageWarning,
    decode_bytes,
    decode_image,
    draft_description,
    draft_scale,
    max_pixels,
)
from .images import (
    IMAGE_EXTENSIONS,
    LAYOUT_HINT,
    BadFile,
    ImageSet,
    LoadedData,
    in_class_order,
    is_image_file,
    list_image_paths,
    read_csv_manifest,
    require_every_class,
    scan_class_folders,
)
from .load import TRAIN_FOLDER_NAMES, VAL_FOLDER_NAMES, load_images
from .split import content_groups, stratified_split

__all__ = [
    "DECODE_VERSION", "DRAFT_MARGIN", "IMAGE_EXTENSIONS", "LAYOUT_HINT", "TRAIN_FOLDER_NAMES", "VAL_FOLDER_NAMES",
    "BadFile", "ImageDecodeError", "ImageSet", "ImageWarning", "LoadedData", "content_groups", "decode_bytes",
    "decode_image", "draft_description", "draft_scale", "in_class_order", "is_image_file", "list_image_paths",
    "load_images", "max_pixels", "read_csv_manifest", "require_every_class", "scan_class_folders", "stratified_split",
]
