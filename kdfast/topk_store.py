"""TopKStore: a corpus's sparse teacher outputs on disk, written batch by batch and read back memory-mapped by row
range. A student is then distilled from a teacher that was run last week, without running it again. Two kinds:
"topk" (a kdfast.TopK: int32 indices + bfloat16/float16 log-probabilities at T = 1, 6 bytes an entry) and
"sampled" (a kdfast.Sampled: int32 indices + uint16 counts + 16-bit log-probabilities, 8 bytes an entry, the
samples drawn at the temperature the header records).

File layout (little-endian), raw arrays behind a fixed header, so reading one runs no code (no pickle):
    0   8 bytes  magic b"KDFTOPK\0"
    8   u32      format version (2; version 1, top-k only and without the fields from byte 33, is still read)
    12  u32      k, entries per row
    16  u64      vocabulary size V (every valid index is in [0, V))
    24  u64      rows written (updated after each append)
    32  u8       log-probability dtype: 1 = bfloat16, 2 = float16
    33  u8       kind: 1 = top-k, 2 = sampled
    34..39       zero
    40  f64      sampled: the temperature the samples were drawn at (their log-probabilities are at it); top-k: 1
    48..63       zero
    64  rows records of k int32 indices, (sampled) k uint16 counts, then k 16-bit log-probabilities, each record
        padded to a multiple of 4 bytes.
Padding entries (log-probability -inf; count 0) are stored with index 0.
"""
from __future__ import annotations

import ctypes
import math
import os
import struct

import torch

from ._validate import check_temperature
from .topk import Sampled, TopK, TopKIndexError

MAGIC = b"KDFTOPK\0"
VERSION = 2
HEADER_BYTES = 64
_HEADER_V1 = struct.Struct("<8sIIQQB")
_HEADER = struct.Struct("<8sIIQQBB6xd")
_ROWS_OFFSET = 24
_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
KINDS = ("topk", "sampled")
_KIND_CODES = {"topk": 1, "sampled": 2}
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
_CLASSES = {"topk": TopK, "sampled": Sampled}
MAX_COUNT = 2**16 - 1


class TopKStoreError(ValueError):
    """A file that is not a top-k store of a version this kdfast reads, is truncated, or does not match the
    expected shape, kind or temperature."""


def _record_bytes(k: int, kind: str = "topk") -> int:
    return ((8 if kind == "sampled" else 6) * k + 3) // 4 * 4


def _describe(kind, temperature) -> str:
    return "a top-k teacher" if kind == "topk" else f"a sampled teacher (drawn at T = {temperature:g})"


class TopKStore:
    """A top-k (or sampled) teacher store file. Write: `TopKStore.create(path, k, vocab_size)` then
    `append(indices, logprobs)` per batch (or `append(topk)`; for `kind="sampled"`, `append(sampled)`), then
    `close()` (or use it as a context manager); `append=True` continues an existing file of the same k, V, dtype,
    kind and temperature. Read: `TopKStore.open(path, k=..., vocab_size=..., kind=..., temperature=...)` (each
    expectation given is checked), `len(store)` rows, `store.read(start, stop)` or `store[start:stop]` ->
    TopK(int32 indices, log-probs) or Sampled(int32 indices, int32 counts, log-probs)."""

    def __init__(self, path, k: int, vocab_size: int, logprob_dtype: torch.dtype, rows: int, writable: bool,
                 kind: str = "topk", temperature: float = 1.0):
        self.path, self.k, self.vocab_size, self.logprob_dtype = os.fspath(path), k, vocab_size, logprob_dtype
        self.kind, self.temperature = kind, temperature
        self._rows, self._writable = rows, writable
        self._file = open(self.path, "r+b") if writable else None
        self._map = None

    # ---- creating and opening ----
    @classmethod
    def create(cls, path, k: int, vocab_size: int, *, logprob_dtype=torch.bfloat16, append: bool = False,
               kind: str = "topk", temperature: float | None = None):
        """A new store (or, with append=True, an existing one continued). kind "topk" (log-probabilities at T = 1;
        no temperature) or "sampled" (temperature: the one the samples are drawn at, required)."""
        for name, value in (("k", k), ("vocab_size", vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if vocab_size > 2**31:
            raise ValueError(f"vocab_size must be at most 2^31 (indices are stored as int32), got {vocab_size}")
        if logprob_dtype not in _DTYPE_CODES:
            raise TypeError(f"logprob_dtype must be torch.bfloat16 or torch.float16, got {logprob_dtype}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if kind == "sampled":
            if temperature is None:
                raise ValueError("a sampled store needs the temperature its samples are drawn at: temperature=")
            temperature = check_temperature(temperature)
        elif temperature is not None:
            raise ValueError("a top-k store holds log-probabilities at T = 1 and takes no temperature (the loss's "
                             "temperature is the training's choice)")
        else:
            temperature = 1.0
        if append and os.path.exists(path):
            store = cls.open(path, k=k, vocab_size=vocab_size, kind=kind, temperature=temperature)
            if store.logprob_dtype != logprob_dtype:
                raise TopKStoreError(f"{os.fspath(path)}: holds {store.logprob_dtype} log-probabilities, not "
                                     f"{logprob_dtype}")
            return cls(path, k, vocab_size, logprob_dtype, len(store), True, kind, temperature)
        with open(path, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, k, vocab_size, 0, _DTYPE_CODES[logprob_dtype], _KIND_CODES[kind],
                                 temperature).ljust(HEADER_BYTES, b"\0"))
        return cls(path, k, vocab_size, logprob_dtype, 0, True, kind, temperature)

    @classmethod
    def open(cls, path, *, k: int | None = None, vocab_size: int | None = None, kind: str | None = None,
             temperature: float | None = None):
        """A store for reading. Each expectation given (k, vocab_size, kind, temperature: a sampled store's) is
        checked against the header; a mismatch raises TopKStoreError naming the file."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise TopKStoreError(f"{path}: not a kdfast top-k store (no {MAGIC!r} header)")
        version = _HEADER.unpack_from(head)[1]
        if version == 1:
            _, _, fk, fv, rows, code = _HEADER_V1.unpack_from(head)
            fkind, ftemp = "topk", 1.0
        elif version == VERSION:
            _, _, fk, fv, rows, code, kind_code, ftemp = _HEADER.unpack_from(head)
            fkind = _CODE_KINDS.get(kind_code)
        else:
            raise TopKStoreError(f"{path}: top-k store format version {version}, this kdfast reads versions 1 and "
                                 f"{VERSION}")
        if code not in _CODE_DTYPES or fkind is None or fk < 1 or fv < 1 or not math.isfinite(ftemp) or ftemp <= 0:
            raise TopKStoreError(f"{path}: corrupt top-k store header (k={fk}, V={fv}, dtype code {code}, kind "
                                 f"{fkind}, temperature {ftemp})")
        if (k is not None and k != fk) or (vocab_size is not None and vocab_size != fv):
            raise TopKStoreError(f"{path}: holds k={fk}, V={fv}; expected k={k if k is not None else fk}, "
                                 f"V={vocab_size if vocab_size is not None else fv}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        want_kind = kind or fkind
        if want_kind != fkind or (temperature is not None and fkind == "sampled" and temperature != ftemp):
            want_t = ftemp if temperature is None else temperature
            raise TopKStoreError(f"{path}: holds {_describe(fkind, ftemp)}; expected {_describe(want_kind, want_t)}")
        size = os.path.getsize(path)
        if size != HEADER_BYTES + rows * _record_bytes(fk, fkind):
            raise TopKStoreError(f"{path}: {size} bytes, but its header says {rows} rows of k={fk} "
                                 f"({HEADER_BYTES + rows * _record_bytes(fk, fkind)} bytes): truncated or not closed")
        return cls(path, fk, fv, _CODE_DTYPES[code], rows, False, fkind, ftemp)

    # ---- writing ----
    def append(self, indices, logprobs=None) -> None:
        """Appends rows: indices and logprobs (..., k) or one TopK (a top-k store), one Sampled (a sampled store),
        flattened to rows. Valid indices must be in [0, vocab_size); log-probabilities are rounded to the store's
        dtype; counts must be in [0, 65535]."""
        if not self._writable:
            raise ValueError(f"{self.path}: opened for reading; use TopKStore.create(..., append=True) to add rows")
        teacher = indices if logprobs is None else TopK(indices, logprobs)  # TopK checks the pair
        if not isinstance(teacher, (TopK, Sampled)):
            raise TypeError("append takes (indices, logprobs), one TopK or one Sampled")
        kind = "sampled" if isinstance(teacher, Sampled) else "topk"
        if kind != self.kind:
            raise TopKStoreError(f"{self.path}: holds {_describe(self.kind, self.temperature)}; cannot append "
                                 f"{_describe(kind, self.temperature).split(' (')[0]}")
        indices, logprobs = teacher.indices, teacher.logprobs
        if indices.shape[-1] != self.k:
            raise ValueError(f"this store holds k={self.k} entries a row, got (..., {indices.shape[-1]})")
        lp = logprobs.detach().reshape(-1, self.k).to("cpu", self.logprob_dtype)
        idx = indices.detach().reshape(-1, self.k).cpu()
        valid = lp > float("-inf")
        bad = valid & ((idx < 0) | (idx >= self.vocab_size))
        if bool(bad.any()):
            raise TopKIndexError(f"indices holds {int(idx[bad][0])}, outside [0, {self.vocab_size})")
        check_lp = lp[valid]
        if check_lp.numel() and bool((check_lp > 0).any()):
            raise ValueError("logprobs must be log-probabilities (<= 0; -inf for padding)")
        idx = torch.where(valid, idx, torch.zeros_like(idx)).to(torch.int32)
        n = idx.shape[0]
        fields = [idx.view(torch.uint8)]  # (n, 4k): each field's little-endian bytes, as the format says
        if self.kind == "sampled":
            counts = teacher.counts.detach().reshape(-1, self.k).cpu()
            if counts.numel() and not (0 <= int(counts.min()) and int(counts.max()) <= MAX_COUNT):
                raise ValueError(f"counts must be in [0, {MAX_COUNT}] to be stored, got [{int(counts.min())}, "
                                 f"{int(counts.max())}]")
            fields.append(counts.to(torch.uint16).view(torch.uint8))
        fields.append(lp.contiguous().view(torch.uint8))
        width = _record_bytes(self.k, self.kind)  # records are padded to 4 bytes
        fields.append(torch.zeros(n, width - sum(f.shape[1] for f in fields), dtype=torch.uint8))
        self._file.seek(0, os.SEEK_END)
        record = torch.cat(fields, 1).contiguous()
        self._file.write((ctypes.c_char * record.numel()).from_address(record.data_ptr()))  # no copy
        self._rows += n
        self._file.seek(_ROWS_OFFSET)
        self._file.write(struct.pack("<Q", self._rows))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- reading ----
    def __len__(self) -> int:
        return self._rows

    def _records(self):
        """The records, (rows, record bytes) uint8, memory-mapped (private: nothing is written back)."""
        if self._map is None:
            width = _record_bytes(self.k, self.kind)
            whole = torch.from_file(os.fspath(self.path), shared=False, size=HEADER_BYTES + self._rows * width,
                                    dtype=torch.uint8)
            self._map = whole[HEADER_BYTES:].view(self._rows, width)
        return self._map

    def read(self, start: int, stop: int):
        """Rows [start, stop) as TopK(indices (n, k) int32, logprobs (n, k) of the store's dtype), or for a sampled
        store Sampled(indices, counts (n, k) int32, logprobs), copied out of the memory-mapped file (only those
        rows are read from disk)."""
        if self._writable:
            raise ValueError(f"{self.path}: open the store with TopKStore.open to read it")
        start, stop, step = slice(start, stop).indices(self._rows)
        n = max(start, stop) - start
        rec = self._records()[start:start + n]

        def field(at, dtype):  # (n, k) of dtype from the records' bytes at offset `at`, copied out of the mapping
            return rec[:, at:at + dtype.itemsize * self.k].clone().view(dtype)

        idx = field(0, torch.int32)
        lp = field(6 * self.k if self.kind == "sampled" else 4 * self.k, self.logprob_dtype)
        if self.kind == "topk":
            return TopK(idx, lp)
        return Sampled(idx, field(4 * self.k, torch.uint16).to(torch.int32), lp)

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("index a TopKStore with a row range store[start:stop]")
        return self.read(rows.start, rows.stop)

    def __repr__(self) -> str:
        sampled = f", sampled at T={self.temperature:g}" if self.kind == "sampled" else ""
        return f"TopKStore({self.path!r}, rows={self._rows}, k={self.k}, vocab_size={self.vocab_size}, " \
            f"logprobs={self.logprob_dtype}{sampled})"
