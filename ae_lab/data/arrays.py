"""`dataset=array`: a user's own arrays from a `.npy`, `.npz` or `.pt` file, of any rank from 2 to 4.

(N, D) rows, (N, C, T) sequences or (N, C, H, W) images; a `.npz` or `.pt` may add `labels` (N,)
integer classes and `factors` (N, K) values. The file is split into train/val/test by `split_seed`
(or val and test come from `val_path` and `test_path`), scaled by `dataset.normalize` fitted on the
training split, and checked before anything is trained: every refusal is one line naming the key.

`.npy`, `.npz` (its uncompressed members) and `.pt` files are memory-mapped, so a set larger than memory
is paged in batch by batch; nothing is ever unpickled (`allow_pickle=False`, and `.pt` files are
read with `weights_only=True`, which refuses any Python object but tensors and plain containers).
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data.base import ArrayDataModule, Split, split_indices
from ae_lab.data.files import DataError, combined_sha256, sha256_of_file
from ae_lab.data.scaling import CHUNK_ROWS, Scaling, fit
from ae_lab.data.units import Units

log = logging.getLogger(__name__)

SUFFIXES = (".npy", ".npz", ".pt")
KEYS = ("x", "labels", "factors")  # what a .npz or .pt may hold
MIN_EXAMPLES = {"train": 2, "val": 1, "test": 1}


class MappedRows:
    """Rows of a numpy array (possibly a read-only memory map) served as float32 tensors, batch by batch:
    the array is never copied whole."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[rows.cpu().numpy()], dtype=np.float32))


@dataclass
class ArrayFile:
    """One file's validated arrays (x possibly memory-mapped); an example's values are x / pixel_scale."""

    x: np.ndarray
    labels: np.ndarray | None
    factors: np.ndarray | None
    sha256: str
    pixel_scale: float = 1.0


def plain(value: Any) -> Any:
    """A config enum's value as its string (OmegaConf gives typed fields as Enum members)."""
    return getattr(value, "value", value)


def _refuse(key: str, path: Any, reason: str) -> DataError:
    return DataError(f"{key}={str(path)!r} is not allowed: {reason}")


def _load_npy(path: Path, key: str) -> np.ndarray:
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise _refuse(key, path, "it is not a .npy file (no NumPy header): save the inputs with numpy.save")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a .npz: members stored uncompressed (np.savez) memory-mapped, compressed ones
    (np.savez_compressed) decompressed into memory."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    arrays = {}
    with np.load(path, allow_pickle=False) as archive:
        for name, info in members.items():
            stored = info.compress_type == zipfile.ZIP_STORED
            arrays[name] = _map_npz_member(path, info) if stored else archive[name]
    return arrays


def _map_npz_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map an uncompressed .npz member: a .npy file inside the zip, at a known offset."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(30)  # name and extra-field lengths at bytes 26-29
        handle.seek(info.header_offset + 30 + int.from_bytes(local_header[26:28], "little")
                    + int.from_bytes(local_header[28:30], "little"))
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _load_pt(path: Path, key: str) -> dict[str, np.ndarray]:
    try:  # tensors memory-mapped; files in torch's legacy (pre-1.6) format cannot be, and are read whole
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, torch.Tensor):
        content = {"x": content}
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise _refuse(key, path, "a .pt file must hold a tensor (the inputs) or a dict of tensors "
                                 "'x', 'labels', 'factors'")
    # numpy has no bfloat16: those become float32
    return {name: (value.float() if value.dtype == torch.bfloat16 else value).numpy() for name, value in content.items()}


def open_arrays(path_value: str, key: str) -> dict[str, np.ndarray]:
    """Every array of the file `path_value` (given as config key or option `key`) by name: a .npy's as
    'x', a .npz's members, a .pt's tensor ('x') or dict of tensors; memory-mapped where the format
    allows, nothing unpickled. Every file that cannot be read so is refused in one line (DataError)."""
    path = Path(path_value).expanduser()
    if not path.is_file():
        raise _refuse(key, path_value, "no such file" if not path.exists() else "not a file")
    if path.suffix not in SUFFIXES:
        raise _refuse(key, path_value, f"the file must end in {', '.join(SUFFIXES)}")
    try:
        if path.suffix == ".npy":
            return {"x": _load_npy(path, key)}
        return _load_npz(path) if path.suffix == ".npz" else _load_pt(path, key)
    except DataError:
        raise
    except (ValueError, pickle.UnpicklingError, RuntimeError) as error:
        message = str(error).lower()
        if "pickle" in message or "python objects" in message or isinstance(error, pickle.UnpicklingError):
            raise _refuse(key, path_value, "it holds pickled Python objects, which ae_lab never unpickles "
                                           "(allow_pickle=False, weights_only=True): save plain numeric arrays") from None
        raise _refuse(key, path_value, f"it cannot be read as {path.suffix}: {error}") from None
    except (OSError, EOFError, TypeError, zipfile.BadZipFile) as error:
        raise _refuse(key, path_value, f"it cannot be read as {path.suffix}: {error}") from None


def read_file(path_value: str, key: str) -> ArrayFile:
    """Read and check the arrays of the file `path_value` (given as config key `key`)."""
    arrays = open_arrays(path_value, key)
    unknown = [name for name in arrays if name not in KEYS]
    if unknown or "x" not in arrays:
        what = "tensor" if Path(path_value).suffix == ".pt" else "array"
        problem = f"unknown {what} {unknown[0]!r}" if unknown else f"no {what} x"
        raise _refuse(key, path_value, f"{problem}: it holds {list(arrays)}; ae_lab reads 'x' (the inputs, "
                                       "required), 'labels' and 'factors' (optional)")
    x = arrays["x"]
    if x.dtype.kind not in "biuf":
        raise _refuse(key, path_value, f"x has dtype {x.dtype}; it must be numeric (bool, integer or float)")
    if not 2 <= x.ndim <= 4:
        raise _refuse(key, path_value, f"x has shape {x.shape} (rank {x.ndim}); allowed ranks are 2 (N, D) rows, "
                                       "3 (N, C, T) sequences, 4 (N, C, H, W) images")
    labels, factors = arrays.get("labels"), arrays.get("factors")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "biu":
            raise _refuse(key, path_value, f"labels have shape {labels.shape} and dtype {labels.dtype}; they must be "
                                           "one integer class per example, shape (N,)")
        if len(labels) != len(x):
            raise _refuse(key, path_value, f"{len(labels)} labels for {len(x)} examples in x")
        labels = labels.astype(np.int64)
    if factors is not None:
        factors = np.asarray(factors, dtype=np.float64)
        factors = factors[:, None] if factors.ndim == 1 else factors
        if factors.ndim != 2 or len(factors) != len(x):
            raise _refuse(key, path_value, f"factors have shape {factors.shape}; they must be (N, K) with N = "
                                           f"{len(x)}, the examples in x")
        _check_finite(factors, key, path_value, "factors")
    _check_finite(x, key, path_value, "x")
    return ArrayFile(x, labels, factors, sha256_of_file(Path(path_value).expanduser()))


def _check_finite(array: np.ndarray, key: str, path: Any, name: str) -> None:
    """Refuse NaN or infinite values, saying how many and in which example the first is."""
    if array.dtype.kind != "f":
        return
    count, first = 0, None
    for start in range(0, len(array), CHUNK_ROWS):
        bad = ~np.isfinite(array[start:start + CHUNK_ROWS]).reshape(min(CHUNK_ROWS, len(array) - start), -1)
        count += int(bad.sum())
        if first is None and bad.any():
            first = start + int(np.flatnonzero(bad.any(1))[0])
    if count:
        raise _refuse(key, path, f"{name} holds {count} NaN or infinite value(s), the first in example {first}")


def _same_layout(main: ArrayFile, other: ArrayFile, key: str, path: str) -> None:
    if other.x.shape[1:] != main.x.shape[1:]:
        raise _refuse(key, path, f"its examples have shape {other.x.shape[1:]}, those of dataset.path "
                                 f"{main.x.shape[1:]}")
    for name in ("labels", "factors"):
        if (getattr(other, name) is None) != (getattr(main, name) is None):
            raise _refuse(key, path, f"it {'has no' if getattr(other, name) is None else 'has'} {name} and "
                                     f"dataset.path {'has' if getattr(main, name) is not None else 'has not'}: "
                                     "give both or neither")
        if name == "factors" and other.factors is not None and other.factors.shape[1] != main.factors.shape[1]:
            raise _refuse(key, path, f"{other.factors.shape[1]} factors, dataset.path has {main.factors.shape[1]}")


def _split(cfg: DictConfig, files: dict[str, ArrayFile]) -> dict[str, tuple[ArrayFile, np.ndarray]]:
    """Each split's file and rows: val and test from their own files when given, else drawn from
    dataset.path by `split_seed`."""
    main = files["train"]
    val_fraction = 0.0 if "val" in files else cfg.val_fraction
    test_fraction = 0.0 if "test" in files else cfg.test_fraction
    parts = split_indices(len(main.x), val_fraction, test_fraction, cfg.split_seed)
    splits = {"train": (main, np.sort(parts["train"]))}
    for name in ("val", "test"):
        splits[name] = (files[name], np.arange(len(files[name].x))) if name in files else (main, np.sort(parts[name]))
    sizes = {name: len(rows) for name, (_, rows) in splits.items()}
    if any(sizes[name] < need for name, need in MIN_EXAMPLES.items()):
        raise _refuse("dataset.path", cfg.path, f"its {len(main.x)} examples give train/val/test splits of "
                      f"{sizes['train']}/{sizes['val']}/{sizes['test']} examples (dataset.val_fraction="
                      f"{cfg.val_fraction}, dataset.test_fraction={cfg.test_fraction}); each split needs at "
                      "least " + ", ".join(f"{need} ({name})" for name, need in MIN_EXAMPLES.items()))
    return splits


def build(cfg: DictConfig, name: str, files: dict[str, ArrayFile]) -> ArrayDataModule:
    """The data module of validated files: split, scaled by `dataset.normalize` fitted on the training
    examples trained on (without `dataset.held_out_class`)."""
    splits = _split(cfg, files)
    train_file, train_rows = splits["train"]
    fitted = train_rows  # the examples trained on: a held-out class (the anomalies) is not
    if cfg.get("held_out_class") is not None and train_file.labels is not None:
        kept = train_rows[train_file.labels[train_rows] != cfg.held_out_class]
        fitted = kept if len(kept) else train_rows  # nothing left: refused by the checks that follow
    scaling = fit(plain(cfg.normalize), fitted, lambda rows: train_file.x[rows] / train_file.pixel_scale,
                  train_file.x.shape[1:])

    def as_split(file: ArrayFile, rows: np.ndarray) -> Split:
        tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return Split(MappedRows(file.x), tensor(file.labels), tensor(file.factors if file.factors is None
                                                                       else file.factors.astype(np.float32)),
                     index=torch.from_numpy(rows.astype(np.int64)), pixel_scale=file.pixel_scale,
                     scaling=scaling)

    checksum = combined_sha256({split: file.sha256 for split, (file, _) in splits.items()}) if len(files) > 1 \
        else files["train"].sha256
    return ArrayDataModule(name, {split: as_split(*part) for split, part in splits.items()}, cfg.batch_size,
                           cfg.num_workers, checksum, scaling=scaling)


def recorded_scaling(run_dir: Path, input_shape: tuple[int, ...]) -> Scaling:
    """The `dataset.normalize` a run on a user's data applied, from its folder's `scaling.json`."""
    path = run_dir / "scaling.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: a run on your own data records there the dataset.normalize it applied "
                        "(fitted on its training split), without which raw inputs cannot be scaled as in training")
    return Scaling.from_record(json.loads(path.read_text()), input_shape)


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """Raw examples are the file's values; the model sees them scaled by the run's `dataset.normalize`."""
    return Units(scaling=recorded_scaling(run_dir, input_shape))


def load(cfg: DictConfig) -> ArrayDataModule:
    if cfg.path is None:
        raise DataError("dataset.path=None is not allowed: give the file of your data, e.g. dataset.path=data.npz "
                        "(.npy, .npz with x and optional labels/factors, or .pt)")
    files = {"train": read_file(cfg.path, "dataset.path")}
    for split in ("val", "test"):
        path = cfg.get(f"{split}_path")
        if path is not None:
            files[split] = read_file(path, f"dataset.{split}_path")
            _same_layout(files["train"], files[split], f"dataset.{split}_path", path)
    return build(cfg, "array", files)
