"""What `python -m kdfast topk-build` and `llm-train` share: Hugging Face models and tokenizers from local
folders, the text they read, the sequences cut from it, and the files kept beside a top-k store.

A store STORE built by topk-build has three companions:
    STORE.tokens    int32 token ids of every sequence, one after another (raw little-endian)
    STORE.lengths   int32 length of each sequence (raw little-endian)
    STORE.meta.json the tokenizer's identity (a hash of its token -> id map, its length), the vocabulary size, the
                    teacher, the store's kind and k (a sampled store's: the draws a position, their temperature and
                    seed), the sequence length and the counts of the last complete batch (the resume point)
A sequence of length L gives the store L - 1 rows, one for each position that has a next token (position j
predicts token j + 1), so padding and sequence ends never reach the store: the store's rows are exactly the
positions where llm-train takes a loss, in the same order.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch

from ..topk_store import TopKStoreError
from .checkpoint import write_json

META_VERSION = 1


class PipelineError(Exception):
    """A one-line reason the command cannot go on (a bad path, a mismatched store); the CLI exits with 2."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise PipelineError("this command needs Hugging Face transformers: pip install \"kdfast[hf]\" (from a "
                            "checkout: pip install \".[hf]\")") from None
    return transformers


def load_model(folder: str, option: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a causal LM in a local folder (from_pretrained, the tokenizer from the same folder)."""
    transformers = require_transformers()
    if not os.path.isdir(folder):
        raise PipelineError(f"{option} {folder}: no such folder (a model folder written by save_pretrained)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PipelineError(f"{option} {folder}: no config.json there (a model folder written by save_pretrained)")
    transformers.utils.logging.disable_progress_bar()  # the commands show their own bar
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{option} {folder}: {str(e).splitlines()[0]}") from None
    config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise PipelineError(f"{option} {folder}: its config sets {name}={getattr(config, name)}; kdfast's "
                                f"pipeline takes the logits as lm_head(last hidden state) and would get them wrong")
    return model, tokenizer


def output_weight(model) -> torch.nn.Parameter:
    """The lm_head weight (V, H) of a causal LM (tied to the input embeddings in some models)."""
    return model.get_output_embeddings().weight


def body(model):
    """The model without its lm_head: called with input_ids and attention_mask, its last_hidden_state is the
    lm_head's input (after the final norm)."""
    return model.base_model


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers the same for distillation: the token -> id map (hashed) and its size."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"sha256": digest, "tokens": len(vocab), "name": getattr(tokenizer, "name_or_path", "")}


# ---- text --------------------------------------------------------------------------------------------------------

def read_documents(files, text_field: str = "text") -> list:
    """The documents of plain text files (one document a file) or JSONL files (.jsonl/.json: one document a line,
    its text under text_field)."""
    documents = []
    for path in files:
        if not os.path.isfile(path):
            raise PipelineError(f"--data {path}: no such file")
        with open(path, encoding="utf-8") as fh:
            if not path.endswith((".jsonl", ".json")):
                documents.append(fh.read())
                continue
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PipelineError(f"--data {path}:{number}: not a JSON line ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise PipelineError(f"--data {path}:{number}: no string field {text_field!r} (--text-field)")
                documents.append(record[text_field])
    return documents


def sequences(documents, tokenizer, seq_len: int, max_tokens=None) -> list:
    """Each document tokenized (its end marked by the tokenizer's EOS token, when it has one) and cut into
    sequences of at most seq_len tokens that overlap by one token, so that every token after a document's first is
    a target exactly once. Sequences of one token (no target) are dropped. max_tokens: stop once the sequences hold
    that many tokens."""
    out, total = [], 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + eos
        for start in range(0, max(1, len(ids) - 1), seq_len - 1):
            piece = ids[start:start + seq_len]
            if len(piece) < 2:
                continue
            if max_tokens is not None and total + len(piece) > max_tokens:
                piece = piece[:max_tokens - total]
                if len(piece) >= 2:
                    out.append(piece)
                return out
            out.append(piece)
            total += len(piece)
    return out


def pad_batch(batch, pad_id: int):
    """(input_ids (B, Lmax) right-padded with pad_id, attention_mask, rows: (B, Lmax - 1) True where position j
    has a next token in its sequence, the store's rows in row-major order)."""
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    lengths = mask.sum(1)
    rows = torch.arange(width - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    return ids, mask, rows


# ---- the store's companions ---------------------------------------------------------------------------------------

def meta_path(store: str) -> str:
    return store + ".meta.json"


def read_meta(store: str, option: str = "--store") -> dict:
    path = meta_path(store)
    if not os.path.isfile(store):
        raise PipelineError(f"{option} {store}: no such file")
    if not os.path.isfile(path):
        raise PipelineError(f"{option} {store}: no {path} beside it (a store written by python -m kdfast topk-build)")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "kdfast-topk-build" or meta.get("version") != META_VERSION:
        raise PipelineError(f"{path}: not a kdfast topk-build meta file of version {META_VERSION}")
    return meta


def write_meta(store: str, meta: dict) -> None:
    write_json(meta, meta_path(store))  # atomic: the resume point moves only once a batch is on disk


class TokenStream:
    """The sequences beside a store: STORE.tokens and STORE.lengths, appended batch by batch."""

    def __init__(self, store: str):
        self.tokens_path, self.lengths_path = store + ".tokens", store + ".lengths"

    def truncate(self, sequences: int, tokens: int) -> None:
        """Keeps the first `sequences` sequences (`tokens` tokens): drops what a killed run wrote after its last
        complete batch, and creates the files when they are missing."""
        for path, count in ((self.tokens_path, tokens), (self.lengths_path, sequences)):
            with open(path, "ab"):
                pass
            if os.path.getsize(path) < 4 * count:
                raise PipelineError(f"{path}: {os.path.getsize(path)} bytes, fewer than the {count} entries its "
                                    f"meta file records")
            os.truncate(path, 4 * count)

    def append(self, batch) -> None:
        for path, values in ((self.tokens_path, [t for s in batch for t in s]),
                             (self.lengths_path, [len(s) for s in batch])):
            with open(path, "ab") as fh:
                fh.write(np.asarray(values, dtype="<i4").tobytes())
                fh.flush()
                os.fsync(fh.fileno())

    def read(self, meta: dict):
        """(lengths (S,) int64, token offsets (S,), row offsets (S,), tokens memmap) of a complete store."""
        lengths = np.fromfile(self.lengths_path, dtype="<i4").astype(np.int64)
        if len(lengths) != meta["sequences"]:
            raise PipelineError(f"{self.lengths_path}: {len(lengths)} sequences, its meta file records "
                                f"{meta['sequences']}")
        tokens = np.memmap(self.tokens_path, dtype="<i4", mode="r") if meta["tokens"] else np.zeros(0, "<i4")
        if len(tokens) != meta["tokens"] or lengths.sum() != meta["tokens"]:
            raise PipelineError(f"{self.tokens_path}: {len(tokens)} tokens, its meta file records {meta['tokens']}")
        token_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        row_offsets = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]]).astype(np.int64)
        return lengths, token_offsets, row_offsets, tokens


# ---- processes ----------------------------------------------------------------------------------------------------

def start_processes(device: str | None):
    """(rank, world size, device) of this process: under torchrun (WORLD_SIZE > 1) the process group is started
    (nccl on CUDA, gloo on CPU) and each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: this torch sees no GPU")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def progress(total: int, initial: int, unit: str, rank: int, enabled: bool):
    """A tqdm bar on rank 0 (hidden when stderr is not a terminal, or with --no-progress)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                disable=True if (rank != 0 or not enabled) else None)


def run_command(p, run, argv):
    """(args, what run(args) returned) of a command, or (args, None) after printing its one-line error (the CLI
    then exits with 2); the process group, if any, is ended either way."""
    args = p.parse_args(argv)
    try:
        return args, run(args)
    except (PipelineError, TopKStoreError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return args, None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
