"""`dataset=image_folder`: a folder of PNG/JPEG images, decoded with Pillow.

One subfolder per class gives each image its label (the classes numbered in sorted name order, as
`held_out_class` counts them); images directly in the folder have none. Every image is converted to
grey or RGB (`dataset.colour`; a folder mixing both is converted to RGB, with a warning) and resized to
`dataset.size`. The decoded uint8 array is cached under `dataset.root`, named after the checksums of
every file and the decoding settings: a changed, added or removed file is decoded afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ae_lab.data.arrays import ArrayFile, build, plain, recorded_scaling
from ae_lab.data.base import ArrayDataModule
from ae_lab.data.files import DataError, cached_arrays, combined_sha256, sha256_of_file
from ae_lab.data.units import Units

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
WHITE = 255.0  # the decoded pixels are 0..255


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """Raw images are 8-bit pixels (C, H, W), 0..255, grey or RGB and of the size trained on (as
    `read_images` gives them); the model sees them divided by 255, then scaled by `dataset.normalize`."""
    return Units(scale=WHITE, scaling=recorded_scaling(run_dir, input_shape), pixels=True)


def _images(folder: Path, key: str) -> tuple[list[Path], list[int], list[str]]:
    """The image files, their labels (-1 without classes) and the class names."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(path, label) for label, name in enumerate(classes)
                 for path in sorted((folder / name).iterdir()) if path.is_file() and not path.name.startswith(".")]
        loose = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if loose:
            raise DataError(f"{key}={str(folder)!r} is not allowed: it has class subfolders and also the files "
                            f"{loose[:3]} beside them: put every image in its class's subfolder")
    else:
        files = [(path, -1) for path in sorted(folder.iterdir()) if path.is_file() and not path.name.startswith(".")]
    if not files:
        raise DataError(f"{key}={str(folder)!r} is not allowed: it holds no images (PNG or JPEG files, directly "
                        "or one subfolder per class)")
    for path, _ in files:
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{key}={str(folder)!r} is not allowed: {path} is not an image "
                            f"(allowed: {', '.join(SUFFIXES)})")
    return [path for path, _ in files], [label for _, label in files], classes


def _modes(paths: list[Path], key: str) -> list[str]:
    """Each file's colour mode, read from its header (refusing a file Pillow cannot open)."""
    from PIL import Image, UnidentifiedImageError

    modes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                modes.append(image.mode)
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{key}={str(path.parent)!r} is not allowed: {path} is not a readable image "
                            f"({error.__class__.__name__})") from None
    return modes


def _size(value: object) -> tuple[int, int]:
    size = list(value) if not isinstance(value, int) else [value, value]
    if len(size) != 2 or not all(isinstance(side, int) and side >= 1 for side in size):
        raise DataError(f"dataset.size={value!r} is not allowed: an integer >= 1 (square images) or "
                        "[height, width]")
    return size[0], size[1]


def read_images(paths: list[Path], channels: int, size: tuple[int, int]) -> np.ndarray:
    """Image files as uint8 pixels (N, C, H, W): converted to grey (`channels` 1) or RGB (3) and resized
    to `size` (height, width) with bilinear filtering, as `dataset=image_folder` decodes its folder.
    A file Pillow cannot read is refused in one line (DataError)."""
    from PIL import Image, UnidentifiedImageError

    height, width = size
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                resized = image.convert("L" if channels == 1 else "RGB").resize((width, height),
                                                                              Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path} is not a readable image ({error.__class__.__name__}): give PNG or JPEG "
                            "files") from None
        pixels = np.asarray(resized, dtype=np.uint8)
        images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    return np.stack(images)


def write_images(pixels: np.ndarray, paths: list[Path]) -> None:
    """uint8 pixels (N, C, H, W), C 1 (grey) or 3 (RGB), as image files (PNG, or by each path's suffix)."""
    from PIL import Image

    for image, path in zip(pixels, paths):
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)


def load(cfg: DictConfig) -> ArrayDataModule:
    key = "dataset.path"
    if cfg.path is None:
        raise DataError("dataset.path=None is not allowed: give a folder of PNG/JPEG images, e.g. "
                        "dataset.path=photos/")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{key}={cfg.path!r} is not allowed: {'no such folder' if not folder.exists() else 'not a folder'}")
    size = _size(cfg.size)
    paths, labels, classes = _images(folder, key)
    modes = _modes(paths, key)
    grey = [mode in GREY_MODES for mode in modes]
    colour = plain(cfg.colour)
    if colour == "auto":
        colour = "grey" if all(grey) else "rgb"
        if any(grey) and not all(grey):
            first_grey = paths[grey.index(True)]
            first_rgb = paths[grey.index(False)]
            log.warning("%s mixes grey images (%d, e.g. %s) and colour ones (%d, e.g. %s): all are converted to "
                        "RGB (set dataset.colour=grey for grey)", folder, sum(grey), first_grey.name,
                        len(grey) - sum(grey), first_rgb.name)
    checksums = {str(path.relative_to(folder)): sha256_of_file(path) for path in paths}
    checksum = combined_sha256({**checksums, "decoding": f"{colour} {size[0]}x{size[1]}"})
    cache_folder = Path(cfg.root) / "image_folder_cache"
    arrays = cached_arrays(cache_folder, checksum,
                           lambda: {"x": read_images(paths, 1 if colour == "grey" else 3, size)},
                           enabled=cfg.cache)
    label_array = np.asarray(labels, dtype=np.int64) if classes else None
    data = build(cfg, "image_folder", {"train": ArrayFile(arrays["x"], label_array, None, checksum, WHITE)})
    log.info("dataset.path=%s: %d images, %s, classes %s", folder, len(paths), colour, classes or "none")
    return data
