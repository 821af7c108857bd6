"""Checkpoints written atomically: into a temporary file in the same folder, flushed to disk, then renamed over
the target, so a crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
from __future__ import annotations

import json
import os
import tempfile

import torch


def _atomic_write(path, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path) -> None:
    _atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path) -> dict:
    return torch.load(os.fspath(path), map_location="cpu", weights_only=False)


def write_json_lines(records, path) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    _atomic_write(path, lambda fh: fh.write(text))
