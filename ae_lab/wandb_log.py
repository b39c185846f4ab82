"""Reading what W&B wrote offline, so that a resumed run can tell what its earlier attempts' records hold.

A `run-*.wandb` file (W&B's transaction log) is a LevelDB-style log of protobuf `Record`s: a 7-byte
header (":W&B", magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of chunks, each chunk = CRC-32
of type byte + payload (4 bytes), length (2 bytes LE), type (1 = full, 2 = first, 3 = middle, 4 = last).

W&B (0.31) writes the file a block at a time, or every `x_transaction_log_flush_interval` seconds (15 by
default): a process killed with SIGKILL loses the records of its last seconds (its unwritten block),
the kill allowing no flush. The file then ends in whole blocks, the last record possibly cut.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list:
    """The `wandb_internal_pb2.Record`s of the log at `path`, up to the first cut or corrupt chunk
    (what a killed writer left is read as far as it goes)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record log")
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:  # trailer padding
            offset += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        chunk = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != checksum:
            break
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(path: Path) -> list[dict]:
    """The history rows (`wandb.log` calls) of the log at `path`, each as key -> value."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in read_records(path) if record.WhichOneof("record_type") == "history"]


def logged_points(run_dir: Path, run_id: str, step_key: str = "trainer/global_step") -> set[tuple[int, str]]:
    """(step, key) of every value the offline attempts of W&B run `run_id` under `run_dir/wandb` hold
    in their history (the step being `step_key`'s value)."""
    points = set()
    for log in sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for row in history_rows(log):
            if step_key in row:
                points.update((int(row[step_key]), key) for key in row if not key.startswith("_"))
    return points
