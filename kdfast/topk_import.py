"""`python -m kdfast topk-import`: other tools' teacher outputs into a TopKStore (kdfast/topk_store.py).

Formats (one store row per token position, in file order):
  axolotl  axolotl's KD datasets: one record per sequence with `target_token_ids`, `target_logprobs` and
           `target_mask`, each a list over positions of lists over the top-k entries (JSONL, or parquet with the
           `parquet` extra); an entry whose mask is 0 is padding.
  openai   OpenAI/vLLM completion log-probabilities with token ids (vLLM's `return_tokens_as_token_ids`: tokens
           written "token_id:N"), JSONL: each line a response (`choices[i].logprobs`) or one `logprobs` object,
           either the completions form (`top_logprobs`: a {token: logprob} dict per position, null where there is
           none) or the chat form (`content`: [{token, logprob, top_logprobs: [{token, logprob}]}]).
A position with fewer than k entries is padded (log-probability -inf); one with more keeps its k largest.

Temperature: a store holds log-probabilities at T = 1, and topk_kd_div divides them by its temperature T. A source
sampled at T_gen != 1 gives log p_gen; it is stored as T_gen * log p_gen renormalised over the row's entries, so
that distilling at T uses p_gen^(T_gen / T) renormalised over the k entries. That is an approximation: the mass the
source left off its k entries is unknown at T = 1, so the stored rows hold no tail (tail="bucket" sees none). At
T_gen = 1 the entries are stored as given. T_gen is recorded in the side file OUT.json (with the format, k, V and
the row count), beside the store.

Bad records raise TopKImportError naming the file and line (record, for parquet); the store and its side file are
written under temporary names and renamed at the end, so a failed import leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from .topk_store import TopKStore

FORMATS = ("axolotl", "openai")
_TOKEN_ID = "token_id:"


class TopKImportError(ValueError):
    """A source record that cannot be read as top-k teacher outputs (the message names the file and line)."""


# ---- reading the sources: each yields (where, rows), rows a list of [(token id, logprob), ...] per position ----

def _json_lines(path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TopKImportError(f"{where}: not JSON ({exc.msg})") from None


def _parquet_records(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TopKImportError(f"{path}: reading parquet needs pyarrow: pip install \"kdfast[parquet]\"") from None
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(
            columns=["target_token_ids", "target_logprobs", "target_mask"]):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}: record {number}", record


def _axolotl_rows(where, record):
    if not isinstance(record, dict):
        raise TopKImportError(f"{where}: a record must be an object, got {type(record).__name__}")
    fields = [record.get(name) for name in ("target_token_ids", "target_logprobs", "target_mask")]
    for name, value in zip(("target_token_ids", "target_logprobs", "target_mask"), fields):
        if not isinstance(value, list):
            raise TopKImportError(f"{where}: {name} must be a list over positions, got "
                                  f"{'nothing' if value is None else type(value).__name__}")
    ids, lps, mask = fields
    if not len(ids) == len(lps) == len(mask):
        raise TopKImportError(f"{where}: target_token_ids, target_logprobs and target_mask cover {len(ids)}, "
                              f"{len(lps)} and {len(mask)} positions")
    rows = []
    for pos, (i, lp, m) in enumerate(zip(ids, lps, mask)):
        if not (isinstance(i, list) and isinstance(lp, list) and isinstance(m, list)) or \
                not len(i) == len(lp) == len(m):
            raise TopKImportError(f"{where}: position {pos}: target_token_ids, target_logprobs and target_mask must "
                                  f"be lists of one length")
        rows.append([(t, v) for t, v, keep in zip(i, lp, m) if keep])
    return rows


def _token_id(where, token):
    if isinstance(token, str) and token.startswith(_TOKEN_ID):
        try:
            return int(token[len(_TOKEN_ID):])
        except ValueError:
            pass
    raise TopKImportError(f"{where}: token {token!r} is not a token id \"token_id:N\" (serve with vLLM's "
                          f"return_tokens_as_token_ids)")


def _openai_logprobs(where, logprobs):
    """The rows of one `logprobs` object (completions or chat form)."""
    if not isinstance(logprobs, dict):
        raise TopKImportError(f"{where}: logprobs must be an object, got {type(logprobs).__name__}")
    if isinstance(logprobs.get("content"), list):  # chat completions
        rows = []
        for entry in logprobs["content"]:
            top = entry.get("top_logprobs") if isinstance(entry, dict) else None
            if not isinstance(top, list):
                raise TopKImportError(f"{where}: a content entry needs a top_logprobs list")
            rows.append([(_token_id(where, e.get("token")), e.get("logprob")) if isinstance(e, dict) else
                         (None, None) for e in top])
        return rows
    top = logprobs.get("top_logprobs")
    if not isinstance(top, list):
        raise TopKImportError(f"{where}: logprobs has neither top_logprobs (completions) nor content (chat)")
    rows = []
    for position in top:
        if position is None:  # vLLM's first prompt token under echo: no distribution
            rows.append([])
        elif isinstance(position, dict):
            rows.append([(_token_id(where, token), value) for token, value in position.items()])
        else:
            raise TopKImportError(f"{where}: a top_logprobs position must be an object or null, got "
                                  f"{type(position).__name__}")
    return rows


def _openai_rows(where, record):
    if isinstance(record, dict) and isinstance(record.get("choices"), list):
        rows = []
        for choice in record["choices"]:
            logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
            if logprobs is None:
                raise TopKImportError(f"{where}: a choice without logprobs (request them with logprobs=k)")
            rows += _openai_logprobs(where, logprobs)
        return rows
    return _openai_logprobs(where, record)


def _records(fmt, path):
    """(where, rows) of each record of the source."""
    if fmt == "axolotl":
        records = _parquet_records(path) if path.endswith(".parquet") else _json_lines(path)
        return ((where, _axolotl_rows(where, record)) for where, record in records)
    return ((where, _openai_rows(where, record)) for where, record in _json_lines(path))


def _check_row(where, pos, row, vocab_size):
    for token, value in row:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise TopKImportError(f"{where}: position {pos}: token id {token!r} is not in [0, {vocab_size}) (the "
                                  f"vocabulary, --vocab-size)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 0:
            raise TopKImportError(f"{where}: position {pos}: log-probability {value!r} is not a number <= 0")


def _batch(rows, k, gen_temperature):
    """(indices (n, k) int64, logprobs (n, k) float64) of rows: the k largest entries of each, padded with -inf,
    rescaled to T = 1 when gen_temperature != 1."""
    idx = np.zeros((len(rows), k), dtype=np.int64)
    lp = np.full((len(rows), k), -np.inf)
    for r, row in enumerate(rows):
        row = sorted(row, key=lambda e: -e[1])[:k]
        if not row:
            continue
        idx[r, :len(row)] = [e[0] for e in row]
        lp[r, :len(row)] = [e[1] for e in row]
    if gen_temperature != 1.0:
        scaled = lp * gen_temperature
        top = scaled.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = top + np.log(np.exp(scaled - top).sum(axis=1, keepdims=True))
            lp = np.where(np.isfinite(lp), scaled - lse, -np.inf)
    return torch.from_numpy(idx), torch.from_numpy(lp)


def import_topk(fmt, source, out, vocab_size, *, k=None, gen_temperature=1.0, logprob_dtype=torch.bfloat16,
                rows_per_append=4096) -> dict:
    """Converts `source` (format `fmt`, FORMATS) into the TopKStore `out` and its side file `out`.json; returns
    the side file's contents. k: entries per row (default: the most any position has)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not (isinstance(gen_temperature, (int, float)) and math.isfinite(gen_temperature) and gen_temperature > 0):
        raise ValueError(f"gen_temperature must be a finite number > 0, got {gen_temperature!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    source, out = os.fspath(source), os.fspath(out)
    widest = 0
    for where, rows in _records(fmt, source):  # first pass: every record checked, k found
        for pos, row in enumerate(rows):
            _check_row(where, pos, row, vocab_size)
            widest = max(widest, len(row))
    k = k or widest
    if k < 1:
        raise TopKImportError(f"{source}: no position holds a log-probability")
    meta = {"format": fmt, "source": os.path.basename(source), "generation_temperature": float(gen_temperature),
            "rescaled_to_t1": gen_temperature != 1.0, "k": k, "vocab_size": vocab_size}
    tmp, meta_tmp = f"{out}.tmp{os.getpid()}", f"{out}.json.tmp{os.getpid()}"
    try:
        with TopKStore.create(tmp, k, vocab_size, logprob_dtype=logprob_dtype) as store:
            pending = []
            for _, rows in _records(fmt, source):
                pending += rows
                if len(pending) >= rows_per_append:
                    store.append(*_batch(pending, k, gen_temperature))
                    pending = []
            if pending:
                store.append(*_batch(pending, k, gen_temperature))
            meta["rows"] = len(store)
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_tmp, f"{out}.json")
        os.replace(tmp, out)
    finally:
        for path in (tmp, meta_tmp):
            if os.path.exists(path):
                os.remove(path)
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast topk-import",
                                     description="Convert other tools' teacher top-k outputs into a kdfast top-k "
                                                 "store (and its side file OUT.json).")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="axolotl: KD datasets (target_token_ids/target_logprobs/target_mask; JSONL or .parquet); "
                             "openai: OpenAI/vLLM completion log-probs with token ids (JSONL)")
    parser.add_argument("source", help="the file to convert")
    parser.add_argument("out", help="the top-k store to write")
    parser.add_argument("--vocab-size", type=int, required=True, help="the vocabulary size V of the teacher")
    parser.add_argument("--k", type=int, default=None, help="entries per row (default: the most of any position)")
    parser.add_argument("--gen-temperature", type=float, default=1.0,
                        help="the temperature the source was sampled at (recorded; != 1 rescales to T = 1)")
    parser.add_argument("--logprob-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args(argv)
    try:
        meta = import_topk(args.format, args.source, args.out, args.vocab_size, k=args.k,
                           gen_temperature=args.gen_temperature, logprob_dtype=getattr(torch, args.logprob_dtype))
    except (OSError, ValueError) as exc:
        print(f"topk-import: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {meta['rows']} rows of k={meta['k']} (V={meta['vocab_size']}, generation temperature "
          f"{meta['generation_temperature']:g}); side file {args.out}.json")
    return 0
