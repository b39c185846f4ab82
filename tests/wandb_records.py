"""What W&B wrote offline, for tests: the records (`ae_lab.wandb_log.read_records`) and one run's contents."""

from __future__ import annotations

import json
from pathlib import Path

from ae_lab.wandb_log import read_records

__all__ = ["read_records", "run_contents"]


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
