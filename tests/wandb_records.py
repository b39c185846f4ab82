"""Read what W&B wrote offline: a `run-*.wandb` file is a LevelDB-style log of protobuf Records.

Layout: a 7-byte header (":W&B", magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of chunks,
each chunk = CRC-32 of type byte + payload (4 bytes), length (2 bytes LE), type (1 = full, 2 = first, 3 = middle, 4 = last).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
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
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"corrupt chunk at byte {offset}"
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_contents(run_dir: Path) -> dict:
    """Config, summary and history of the single W&B run written under `run_dir/wandb`."""
    [log_file] = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    config, summary, history, run = {}, {}, [], None
    for record in read_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"run": run, "config": config, "summary": summary, "history": history}
