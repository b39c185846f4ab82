"""Data files on disk: download from mirrors with checksum and atomic write, IDX decoding, decoded caches.

A file is only ever used after its SHA-256 matched the known value; a download is written to a
temporary name and renamed into place only once complete and verified, so a partial or corrupt file
never sits under the final name.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ae_lab.errors import ConfigError

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """A data file is missing, corrupt or cannot be fetched."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str | None  # None: no published checksum; the file's own is recorded instead


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str | None) -> str:
    """Return the file's SHA-256; raise DataError when it differs from `expected`."""
    actual = sha256_of_file(path)
    if expected is not None and actual != expected:
        raise DataError(f"{path} is corrupt or truncated: its SHA-256 is {actual}, expected {expected}. "
                        "Delete it to download it again, or replace it with a good copy.")
    if expected is None:
        log.warning("%s has no known checksum to verify against; its SHA-256 %s is recorded", path, actual)
    return actual


def ensure_file(file: RemoteFile, folder: Path, mirrors: Sequence[str], download: bool,
                timeout: float) -> tuple[Path, str]:
    """Return the verified local file and its SHA-256, downloading it from the first mirror that works."""
    path = folder / file.name
    if path.exists():
        return path, verify(path, file.sha256)
    tried: list[str] = []
    if download:
        for mirror in mirrors:
            url = f"{mirror.rstrip('/')}/{file.name}"
            try:
                return path, _download(url, path, file.sha256, timeout)
            except (OSError, DataError) as error:  # URLError and timeouts are OSErrors
                tried.append(f"{url} ({error})")
                log.warning("could not fetch %s: %s", url, error)
    where = f"{file.name} is missing: looked for {path}"
    how = (f"Place it there by hand (from any mirror: {', '.join(mirrors) or 'none configured'})"
           + (f" and check its SHA-256 is {file.sha256}" if file.sha256 else ""))
    if not download:
        raise DataError(f"{where} (dataset.download=false). {how}.")
    raise DataError(f"{where}; every mirror failed: {'; '.join(tried) or 'no mirrors'}. {how}, "
                    "or set dataset.mirrors / dataset.root.")


def _download(url: str, path: Path, expected: str | None, timeout: float) -> str:
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn(f"download {path.name}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn())
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task("download", total=total)
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise DataError(f"checksum mismatch: got SHA-256 {actual}, expected {expected}")
        os.replace(partial, path)
        return actual
    finally:
        partial.unlink(missing_ok=True)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped IDX file (the MNIST format): magic 0,0,type,ndim; big-endian uint32 sizes; data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path} holds {len(data) - header} data bytes, its header promises {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def cached_arrays(folder: Path, source_sha256: str, decode: Callable[[], dict[str, np.ndarray]],
                  enabled: bool = True) -> dict[str, np.ndarray]:
    """Arrays decoded from source files, kept as .npy files in `folder/decoded-<source checksum>/`.

    The cache is named after the checksum of the (verified) sources it came from, so a changed
    source never meets a stale cache. Cached arrays are memory-mapped: loading takes milliseconds and
    large sets are paged in on demand rather than copied. Read-only folders simply go uncached.
    """
    cache = folder / f"decoded-{source_sha256[:16]}"
    if enabled and (cache / "complete").exists():
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(cache.glob("*.npy"))}
    arrays = decode()
    if not enabled:
        return arrays
    staging = folder / f".{cache.name}.{os.getpid()}.tmp"
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for key, array in arrays.items():
            np.save(staging / f"{key}.npy", array)
        (staging / "complete").touch()
        os.replace(staging, cache)
    except OSError as error:
        log.info("not caching decoded data in %s: %s", folder, error)
    finally:
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    return arrays


def combined_sha256(checksums: dict[str, str]) -> str:
    """One checksum for a set of files (name and SHA-256 of each)."""
    digest = hashlib.sha256()
    for name in sorted(checksums):
        digest.update(f"{name}:{checksums[name]}\n".encode())
    return digest.hexdigest()
