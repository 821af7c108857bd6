"""Text for the LLM main job: a corpus every machine has (the Python standard library's own .py sources, no
download) and a byte-level BPE tokenizer trained on it with the `tokenizers` library (the `llm` extra)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

END_OF_FILE = "<|endoftext|>"
# Folders of the standard library that are not its own code (installed packages), that hold deliberately odd
# files (test data with bad encodings and syntax errors) or generated tables (encodings: a codec's 256-entry
# character map per file); skipping them keeps the corpus ordinary, hand-written Python.
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3", "encodings"}


class MissingDependency(RuntimeError):
    """An optional package is not installed; the message names the extra that installs it."""


def require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingDependency("the LLM demo needs the `tokenizers` package: pip install 'kdfast[llm]' "
                                "(or pip install tokenizers)") from None
    return tokenizers


def stdlib_dir() -> str:
    """The folder of the running Python's standard library (where os.py lives)."""
    return os.path.dirname(os.path.abspath(os.__file__))


def stdlib_sources(root=None) -> list:
    """Relative paths of the standard library's .py files, sorted (a fixed order on a given Python)."""
    root = root or stdlib_dir()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    return sorted(found)


@dataclass
class Corpus:
    train: list          # texts of the training files
    validation: list     # texts of the validation files (no file is in both)
    train_files: list
    validation_files: list

    @property
    def chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.validation))


def load_corpus(seed=0, train_chars=1_500_000, validation_chars=150_000, root=None) -> Corpus:
    """A seeded selection of whole standard-library files: shuffled by `seed` from the sorted list, the first
    files up to `validation_chars` for validation and the next up to `train_chars` for training (split by file, so
    that validation text is unseen). Files that are not UTF-8 are skipped."""
    root = root or stdlib_dir()
    paths = stdlib_sources(root)
    random.Random(seed).shuffle(paths)
    picked = {"validation": ([], [], validation_chars), "train": ([], [], train_chars)}
    split = "validation"
    for path in paths:
        try:
            with open(os.path.join(root, path), encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        texts, names, budget = picked[split]
        if not text.strip() or sum(map(len, texts)) + len(text) > budget:
            if split == "validation" and texts:
                split = "train"
            continue
        texts.append(text)
        names.append(path)
    (train, train_files, _), (val, val_files, _) = picked["train"], picked["validation"]
    if not train or not val:
        raise RuntimeError(f"too little Python source under {root} for a corpus "
                           f"({len(train_files)} training and {len(val_files)} validation files)")
    return Corpus(train, val, train_files, val_files)


def train_tokenizer(texts, vocab_size=8192):
    """A byte-level BPE (as GPT-2's) trained on `texts`: any text encodes, no unknown token; END_OF_FILE is id 0."""
    tk = require_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_FILE],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer, texts) -> torch.Tensor:
    """One int64 token stream: the files' tokens, each file followed by END_OF_FILE."""
    eof = tokenizer.token_to_id(END_OF_FILE)
    ids = []
    for enc in tokenizer.encode_batch(texts):
        ids += enc.ids
        ids.append(eof)
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(n, length + 1) non-overlapping windows of the stream: inputs [:, :-1], next-token targets [:, 1:]."""
    n = (tokens.numel() - 1) // length
    if n < 1:
        raise ValueError(f"a stream of {tokens.numel()} tokens holds no window of {length} + 1 tokens")
    return tokens[: n * length + 1].unfold(0, length + 1, length)
