"""TopKStore: a corpus's top-k teacher outputs on disk (int32 indices + bfloat16/float16 log-probabilities,
6 bytes an entry), written batch by batch and read back memory-mapped by row range. A student is then distilled
from a teacher that was run last week, without running it again.

File layout (little-endian), raw arrays behind a fixed header, so reading one runs no code (no pickle):
    0   8 bytes  magic b"KDFTOPK\\0"
    8   u32      format version (1)
    12  u32      k, entries per row
    16  u64      vocabulary size V (every valid index is in [0, V))
    24  u64      rows written (updated after each append)
    32  u8       log-probability dtype: 1 = bfloat16, 2 = float16
    33..63       zero
    64  rows records of k int32 indices then k 16-bit log-probabilities, each padded to a multiple of 4 bytes.
Padding entries (log-probability -inf) are stored with index 0.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

from .topk import TopK, TopKIndexError

MAGIC = b"KDFTOPK\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQB")
_ROWS_OFFSET = 24
_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class TopKStoreError(ValueError):
    """A file that is not a top-k store of this version, is truncated, or does not match the expected shape."""


def _record_bytes(k: int) -> int:
    return (6 * k + 3) // 4 * 4


class TopKStore:
    """A top-k store file. Write: `TopKStore.create(path, k, vocab_size)` then `append(indices, logprobs)` per batch
    (or `append(topk)`), then `close()` (or use it as a context manager); `append=True` continues an existing file of
    the same k, V and dtype. Read: `TopKStore.open(path, k=..., vocab_size=...)` (the expected shape is checked when
    given), `len(store)` rows, `store.read(start, stop)` or `store[start:stop]` -> TopK(int32 indices, log-probs).
    """

    def __init__(self, path, k: int, vocab_size: int, logprob_dtype: torch.dtype, rows: int, writable: bool):
        self.path, self.k, self.vocab_size, self.logprob_dtype = os.fspath(path), k, vocab_size, logprob_dtype
        self._rows, self._writable = rows, writable
        self._file = open(self.path, "r+b") if writable else None
        self._map = None

    # ---- creating and opening ----
    @classmethod
    def create(cls, path, k: int, vocab_size: int, *, logprob_dtype=torch.bfloat16, append: bool = False):
        for name, value in (("k", k), ("vocab_size", vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if vocab_size > 2**31:
            raise ValueError(f"vocab_size must be at most 2^31 (indices are stored as int32), got {vocab_size}")
        if logprob_dtype not in _DTYPE_CODES:
            raise TypeError(f"logprob_dtype must be torch.bfloat16 or torch.float16, got {logprob_dtype}")
        if append and os.path.exists(path):
            store = cls.open(path, k=k, vocab_size=vocab_size)
            if store.logprob_dtype != logprob_dtype:
                raise TopKStoreError(f"{os.fspath(path)}: holds {store.logprob_dtype} log-probabilities, not "
                                     f"{logprob_dtype}")
            return cls(path, k, vocab_size, logprob_dtype, len(store), writable=True)
        with open(path, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, k, vocab_size, 0, _DTYPE_CODES[logprob_dtype]).ljust(HEADER_BYTES,
                                                                                                      b"\0"))
        return cls(path, k, vocab_size, logprob_dtype, 0, writable=True)

    @classmethod
    def open(cls, path, *, k: int | None = None, vocab_size: int | None = None):
        path = os.fspath(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise TopKStoreError(f"{path}: not a kdfast top-k store (no {MAGIC!r} header)")
        magic, version, fk, fv, rows, code = _HEADER.unpack_from(head)
        if version != VERSION:
            raise TopKStoreError(f"{path}: top-k store format version {version}, this kdfast reads version {VERSION}")
        if code not in _CODE_DTYPES or fk < 1 or fv < 1:
            raise TopKStoreError(f"{path}: corrupt top-k store header (k={fk}, V={fv}, dtype code {code})")
        if (k is not None and k != fk) or (vocab_size is not None and vocab_size != fv):
            raise TopKStoreError(f"{path}: holds k={fk}, V={fv}; expected k={k if k is not None else fk}, "
                                 f"V={vocab_size if vocab_size is not None else fv}")
        size = os.path.getsize(path)
        if size != HEADER_BYTES + rows * _record_bytes(fk):
            raise TopKStoreError(f"{path}: {size} bytes, but its header says {rows} rows of k={fk} "
                                 f"({HEADER_BYTES + rows * _record_bytes(fk)} bytes): truncated or not closed")
        return cls(path, fk, fv, _CODE_DTYPES[code], rows, writable=False)

    # ---- writing ----
    def append(self, indices, logprobs=None) -> None:
        """Appends rows: indices and logprobs (..., k) (or one TopK), flattened to rows. Valid indices must be in
        [0, vocab_size); log-probabilities are rounded to the store's dtype."""
        if not self._writable:
            raise ValueError(f"{self.path}: opened for reading; use TopKStore.create(..., append=True) to add rows")
        if logprobs is None:
            if not isinstance(indices, TopK):
                raise TypeError("append takes (indices, logprobs) or one TopK")
            indices, logprobs = indices
        TopK(indices, logprobs)  # checks the pair
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
        record = np.zeros((n, _record_bytes(self.k)), dtype=np.uint8)
        record[:, :4 * self.k] = idx.numpy().view(np.uint8).reshape(n, 4 * self.k)
        record[:, 4 * self.k:6 * self.k] = lp.view(torch.int16).numpy().view(np.uint8).reshape(n, 2 * self.k)
        self._file.seek(0, os.SEEK_END)
        self._file.write(record.tobytes())
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
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=HEADER_BYTES,
                                  shape=(self._rows, _record_bytes(self.k)))
        return self._map

    def read(self, start: int, stop: int) -> TopK:
        """Rows [start, stop) as TopK(indices (n, k) int32, logprobs (n, k) of the store's dtype), copied out of
        the memory-mapped file (only those rows are read from disk)."""
        if self._writable:
            raise ValueError(f"{self.path}: open the store with TopKStore.open to read it")
        start, stop, step = slice(start, stop).indices(self._rows)
        stop = max(start, stop)
        if self._rows == 0 or stop == start:
            return TopK(torch.empty((0, self.k), dtype=torch.int32), torch.empty((0, self.k), dtype=self.logprob_dtype))
        rec = np.ascontiguousarray(self._records()[start:stop])
        n = stop - start
        idx = torch.from_numpy(rec[:, :4 * self.k].copy().view(np.int32)).reshape(n, self.k)
        lp = torch.from_numpy(rec[:, 4 * self.k:6 * self.k].copy().view(np.int16)).reshape(n, self.k)
        return TopK(idx, lp.view(self.logprob_dtype))

    def __getitem__(self, rows) -> TopK:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("index a TopKStore with a row range store[start:stop]")
        return self.read(rows.start, rows.stop)

    def __repr__(self) -> str:
        return f"TopKStore({self.path!r}, rows={self._rows}, k={self.k}, vocab_size={self.vocab_size}, " \
               f"logprobs={self.logprob_dtype})"

