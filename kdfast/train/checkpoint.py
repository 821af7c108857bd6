"""Checkpoints and run outputs. Writes are atomic: into a temporary file in the same folder, flushed to disk, then
renamed over the target, so a crash at any moment leaves either the old file or the new one, never a torn file;
every output gets the mode a plain open() would give (0666 less the umask). Reads never run code: checkpoints are
loaded with torch.load(weights_only=True), which admits tensors and plain containers only, and a file that is not
what it should be raises CheckpointError naming the file and what is wrong with it."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile

import torch

# What the trainer writes into checkpoint.pt (see Trainer._save); a file without these keys is not one of ours.
TRAINER_KEYS = ("distiller", "optimizer", "position", "history", "rng", "seed")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and says what is wrong."""


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def _atomic_write(path, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs follow the umask like open() does
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state, path) -> None:
    """torch.save(state) to path, atomically."""
    _atomic_write(path, lambda fh: torch.save(state, fh))


def write_json(value, path) -> None:
    _atomic_write(path, lambda fh: fh.write(json.dumps(value, indent=1).encode()))


def write_json_lines(records, path) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    _atomic_write(path, lambda fh: fh.write(text))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def state_dict_mismatch(error: RuntimeError, limit: int = 200) -> str:
    """load_state_dict's error (a header, then one line per kind of mismatch) as one short line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[1:] or lines)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_tensors(path):
    """torch.load(path) of tensors and plain containers only (weights_only=True: nothing in the file can run
    code); CheckpointError naming the file when it is missing, unreadable, or holds anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(f"{path}: refused, it holds Python objects other than tensors and plain containers "
                                  f"(loading them could run code)") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated: {_first_line(e)})") \
            from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated: {_first_line(e)})") \
            from None


def load_checkpoint(path) -> dict:
    """A checkpoint.pt written by the Trainer (see load_tensors), checked to hold what the trainer writes."""
    state = load_tensors(path)
    missing = [k for k in TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        found = ", ".join(map(str, list(state)[:6])) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{os.fspath(path)}: not a kdfast trainer checkpoint (it lacks "
                              f"{', '.join(missing)}; found: {found or 'nothing'})")
    position = state["position"]
    if not (isinstance(position, (tuple, list)) and len(position) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in position)):
        raise CheckpointError(f"{os.fspath(path)}: damaged kdfast checkpoint (position {position!r} is not two "
                              f"counts)")
    if not isinstance(state["distiller"], dict) or not isinstance(state["history"], list):
        raise CheckpointError(f"{os.fspath(path)}: damaged kdfast checkpoint (distiller or history of the wrong type)")
    if not (isinstance(state["rng"], torch.Tensor) and state["rng"].dtype == torch.uint8):
        raise CheckpointError(f"{os.fspath(path)}: damaged kdfast checkpoint (rng is not a byte tensor)")
    return state


def load_state_dict_file(path) -> dict:
    """The weights of a network from path: a state dict (a run's student.pt) or a trainer checkpoint.pt, whose
    student is taken."""
    state = load_tensors(path)
    if isinstance(state, dict) and "distiller" in state and isinstance(state["distiller"], dict):
        state = {k[len("student."):]: v for k, v in state["distiller"].items() if k.startswith("student.")}
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise CheckpointError(f"{os.fspath(path)}: not network weights (expected a state dict of tensors, as a run's "
                              f"student.pt or checkpoint.pt)")
    return state
