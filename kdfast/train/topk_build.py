"""`python -m kdfast topk-build`: run a Hugging Face teacher over a corpus once and keep its top-k
log-probabilities (or, with --sample N, N tokens drawn from its softmax) in a TopKStore, for
`python -m kdfast llm-train`.

The text (plain text files, one document each, or JSONL with a text field) is tokenized with the teacher's own
tokenizer, cut into sequences of --seq-len tokens, and run through the teacher --batch-size sequences at a time.
Beside STORE it writes STORE.tokens and STORE.lengths (the token stream, so that training reads the very
positions the teacher saw) and STORE.meta.json (the tokenizer's identity and the last complete batch). Run it
again with the same arguments to continue after the last complete batch. Under torchrun each process runs the
teacher on its share of the batches and rank 0 writes them in order.

--sample N writes a sampled store (kind "sampled", a kdfast.Sampled teacher a row): N ids drawn with replacement
from softmax(logits / T) at T = --sample-temperature (recorded in the store's header), repeats merged into counts,
with their log-probabilities at T. kdfast's sampled loss (sampled_kd_div, fused_linear_kd with a Sampled teacher)
estimates KL(p_t || p_s) at the temperature the samples were drawn at, so llm-train distils such a store at that
temperature. The draws of batch b come from a generator seeded by (--seed, b): the same store after a resume and
under torchrun (on the same kind of device).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import struct

import numpy as np
import torch
import torch.distributed as dist

from .._validate import MAX_TEMPERATURE, MIN_TEMPERATURE
from ..topk import Sampled, TopK, sample_from_logits, topk_from_logits
from ..topk_store import _ROWS_OFFSET, HEADER_BYTES, MAX_COUNT, TopKStore, _record_bytes
from . import hf_data
from .hf_data import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Rows of teacher logits made at a time (chunk x V float32 at most this many bytes).
LOGIT_BYTES = 64 << 20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdfast topk-build", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's folder (save_pretrained: config, "
                   "weights and tokenizer)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="plain text files (one document each) "
                   "or .jsonl files (one document a line)")
    p.add_argument("--text-field", default="text", help="the field holding the text in JSONL lines")
    p.add_argument("--out", required=True, metavar="STORE", help="the store file to write (its companions go beside "
                   "it: STORE.tokens, STORE.lengths, STORE.meta.json)")
    p.add_argument("--k", type=int, default=None, help="log-probabilities kept a position, a top-k store (None: 64; "
                   "not with --sample)")
    p.add_argument("--sample", type=int, default=None, metavar="N", help="instead of the top-k, draw N tokens a "
                   "position from the teacher's softmax at --sample-temperature (a sampled store; not with --k)")
    p.add_argument("--sample-temperature", type=float, default=1.0, metavar="T", help="with --sample: the "
                   "temperature the tokens are drawn at (recorded in the store; llm-train distils at it)")
    p.add_argument("--seed", type=int, default=0, help="with --sample: seed of the draws")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens a sequence (longer documents are cut)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences a teacher forward (per process)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens of text")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the teacher's weights")
    p.add_argument("--logprob-dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="the store's log-probabilities")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args) -> None:
    if args.sample is not None and args.k is not None:
        raise PipelineError(f"--k {args.k} and --sample {args.sample}: give one (--k keeps the teacher's top-k, "
                            f"--sample draws from its softmax)")
    if args.sample is None:
        args.k = 64 if args.k is None else args.k
        if args.sample_temperature != 1.0:
            raise PipelineError(f"--sample-temperature {args.sample_temperature} needs --sample N (a top-k store "
                                f"holds log-probabilities at T = 1)")
    elif args.seed < 0:
        raise PipelineError(f"--seed must be >= 0, got {args.seed}")
    elif not 1 <= args.sample <= MAX_COUNT:
        raise PipelineError(f"--sample must be in [1, {MAX_COUNT}] (draws a position), got {args.sample}")
    elif not MIN_TEMPERATURE <= args.sample_temperature <= MAX_TEMPERATURE:
        raise PipelineError(f"--sample-temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got "
                            f"{args.sample_temperature}")
    for name in ("k", "seq_len", "batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq_len" else 1):
            raise PipelineError(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {value}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise PipelineError(f"--out {args.out}: its folder {folder} does not exist")
    if os.path.isdir(args.out):
        raise PipelineError(f"--out {args.out} is a folder; give the store's file name")


def _rewind_store(path: str, rows: int, k: int, kind: str) -> None:
    """Cuts a store back to its first `rows` rows: what a killed run appended after its last complete batch."""
    size = HEADER_BYTES + rows * _record_bytes(k, kind)
    if os.path.getsize(path) < size:
        raise PipelineError(f"{path}: shorter than the {rows} rows its meta file records")
    with open(path, "r+b") as fh:
        fh.truncate(size)
        fh.seek(_ROWS_OFFSET)
        fh.write(struct.pack("<Q", rows))


def _settings(args, teacher, tokenizer, seqs) -> dict:
    """What must not change between a run and its resumption (the text's tokens included, by hash)."""
    text = hashlib.sha256(np.asarray([len(s) for s in seqs], dtype="<i4").tobytes())
    text.update(np.asarray([t for s in seqs for t in s], dtype="<i4").tobytes())
    kind = {"kind": "topk", "k": args.k} if args.sample is None else \
        {"kind": "sampled", "k": args.sample, "temperature": args.sample_temperature, "seed": args.seed}
    return {"sequences_sha256": text.hexdigest(),
            "teacher": os.path.abspath(args.teacher), "tokenizer": hf_data.tokenizer_identity(tokenizer),
            "vocab_size": hf_data.output_weight(teacher).shape[0], **kind,
            "seq_len": args.seq_len, "data": [os.path.abspath(f) for f in args.data], "text_field": args.text_field,
            "max_tokens": args.max_tokens, "logprob_dtype": args.logprob_dtype}


def open_store(path: str, settings: dict, append: bool) -> TopKStore:
    """The store of these settings (its kind, k, V, dtype and sampling temperature), new or continued."""
    return TopKStore.create(path, settings["k"], settings["vocab_size"], append=append,
                            logprob_dtype=DTYPES[settings["logprob_dtype"]], kind=settings["kind"],
                            temperature=settings.get("temperature"))


def _prepare(args, settings) -> dict:
    """The meta record to continue from: a fresh one, or the existing store's after it is cut back to its last
    complete batch. Rank 0 only."""
    store, stream = args.out, hf_data.TokenStream(args.out)
    meta = {"format": "kdfast-topk-build", "version": hf_data.META_VERSION, **settings,
            "batches": 0, "sequences": 0, "tokens": 0, "rows": 0, "complete": False}
    if os.path.exists(store):
        old = hf_data.read_meta(store, "--out")
        changed = [key for key in settings if old.get(key) != settings[key]]
        if changed:
            raise PipelineError(f"--out {store}: a store built with other settings ({', '.join(changed)}); delete it "
                                f"(and its companions) or write elsewhere")
        meta = old
        _rewind_store(store, meta["rows"], meta["k"], meta["kind"])
    else:
        open_store(store, settings, append=False).close()
    stream.truncate(meta["sequences"], meta["tokens"])
    hf_data.write_meta(store, meta)
    return meta


@torch.no_grad()
def teacher_rows(teacher, batch, pad_id: int, settings: dict, device, generator=None) -> tuple:
    """The store's rows of a batch, at every position that has a next token, in the store's row order: the
    teacher's top-k (indices int32, log-probabilities float32) or, for a sampled store, settings["k"] draws at
    settings["temperature"] from generator (indices int32, counts int32, log-probabilities float32)."""
    ids, mask, rows = hf_data.pad_batch(batch, pad_id)
    hidden = hf_data.body(teacher)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   use_cache=False).last_hidden_state
    hidden = hidden[:, :-1][rows.to(device)]
    weight = hf_data.output_weight(teacher)
    bias = teacher.get_output_embeddings().bias
    chunk = max(1, LOGIT_BYTES // (4 * weight.shape[0]))
    parts = []
    for lo in range(0, hidden.shape[0], chunk):
        logits = torch.nn.functional.linear(hidden[lo:lo + chunk], weight, bias).float()
        if settings["kind"] == "topk":
            rows = topk_from_logits(logits, settings["k"])
        else:
            rows = sample_from_logits(logits, settings["k"], settings["temperature"], generator=generator)
        *ints, logprobs = rows  # indices (and counts), then the log-probabilities
        parts.append([*(t.to("cpu", torch.int32) for t in ints), logprobs.cpu()])
    return tuple(torch.cat(column) for column in zip(*parts))


def batch_generator(seed: int, batch: int, device):
    """The generator of a batch's draws: seeded by (seed, batch number), so a batch draws the same ids whichever
    process runs it and whether or not the build was resumed."""
    state = np.random.SeedSequence([seed, batch]).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def run(args) -> dict:
    _check_args(args)
    rank, world, device = hf_data.start_processes(args.device)
    teacher, tokenizer = hf_data.load_model(args.teacher, "--teacher", DTYPES[args.dtype])
    teacher.to(device).eval()
    vocab = hf_data.output_weight(teacher).shape[0]
    if args.sample is None and args.k > vocab:
        raise PipelineError(f"--k {args.k} is more than the teacher's vocabulary ({vocab})")
    documents = hf_data.read_documents(args.data, args.text_field)
    seqs = hf_data.sequences(documents, tokenizer, args.seq_len, args.max_tokens)
    if not seqs:
        raise PipelineError(f"--data {' '.join(args.data)}: no sequence of 2 or more tokens in the text")
    settings = _settings(args, teacher, tokenizer, seqs)
    meta = _prepare(args, settings) if rank == 0 else None
    if world > 1:
        box = [meta]
        dist.broadcast_object_list(box, src=0)
        meta = box[0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [seqs[i:i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]
    total_tokens = sum(len(s) for s in seqs)
    bar = hf_data.progress(total_tokens, meta["tokens"], "tok", rank, not args.no_progress)
    store = open_store(args.out, settings, append=True) if rank == 0 else None
    form = TopK if settings["kind"] == "topk" else Sampled
    stream = hf_data.TokenStream(args.out)
    try:
        for first in range(meta["batches"], len(batches), world):
            mine = first + rank
            generator = batch_generator(args.seed, mine, device) if args.sample is not None else None
            result = teacher_rows(teacher, batches[mine], pad_id, settings, device, generator) \
                if mine < len(batches) else None
            results = [None] * world if rank == 0 else None
            if world > 1:
                dist.gather_object(result, results, dst=0)
            else:
                results = [result]
            if rank == 0:
                for offset, got in enumerate(results):
                    if got is None:
                        continue
                    batch = batches[first + offset]
                    stream.append(batch)          # the token stream first, then the rows, then the resume point:
                    store.append(form(*got))      # a run killed in between is cut back to the meta file's counts
                    meta.update(batches=meta["batches"] + 1, sequences=meta["sequences"] + len(batch),
                                tokens=meta["tokens"] + sum(len(s) for s in batch),
                                rows=meta["rows"] + got[0].shape[0])
                    hf_data.write_meta(args.out, meta)
                    bar.update(sum(len(s) for s in batch))
        if rank == 0:
            meta["complete"] = True
            hf_data.write_meta(args.out, meta)
    finally:
        bar.close()
        if store is not None:
            store.close()
    if world > 1:
        dist.barrier()
    return {key: meta[key] for key in ("sequences", "tokens", "rows", "kind", "k", "vocab_size", "temperature")
            if key in meta} if rank == 0 else {}


def main(argv=None) -> int:
    args, summary = hf_data.run_command(parser(), run, argv)
    if summary is None:
        return 2
    if summary:  # rank 0
        what = f"top-{summary['k']}" if summary["kind"] == "topk" else \
            f"{summary['k']} draws at T = {summary['temperature']:g}"
        print(f"{args.out}: {summary['rows']} rows of {what} (V={summary['vocab_size']}) from "
              f"{summary['sequences']} sequences, {summary['tokens']} tokens")
    return 0
