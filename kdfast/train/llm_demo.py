"""kdfast's LLM main job, `python -m kdfast llm-demo`: token-level distillation of a small causal LM on real text.

Offline and on CPU: the corpus is the Python standard library's own source files, the tokenizer a byte-level BPE
(vocabulary 8,192) trained on them. A teacher transformer is trained first; its top-k (k = 32) log-probabilities
on the students' training tokens are written to an offline store (kdfast.TopKStore) and read back memory-mapped,
as one would distil from a teacher run last week or from an inference server's top-k logprobs. The same smaller
student is then trained from the same initial weights on the same batches with each loss:

- cross-entropy only (the logits materialised, as a plain training loop does);
- dense KD: kdfast.fused_linear_kd with a kdfast.TeacherHead (the teacher's hidden states and lm_head weight;
  neither model's logits ever exist);
- top-k KD from the store, tail "renormalize" and tail "bucket" (kdfast.fused_linear_kd with a kdfast.TopK);
- sampled KD (RS-KD): n = 12 tokens sampled from the teacher at the students' temperature per position, stored
  as (index, count, log-probability) in a sampled store at 8 bytes an entry, fewer bytes per token than the top-k
  store (kdfast.fused_linear_kd with a kdfast.Sampled).

Reports validation perplexity, peak memory and step time for each, a chart of validation loss against step, and a
markdown table, under the output folder.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

import kdfast

from .demo import table
from .lm import CausalLM, LMConfig
from .schedules import lr_schedule
from .text import MissingDependency, encode, load_corpus, require_tokenizers, train_tokenizer, windows
from .trainer import seed_everything

MiB = 2**20


@dataclass
class Settings:
    out: str = "llm-demo-out"
    seed: int = 0
    vocab: int = 8192
    context: int = 64
    batch: int = 8
    teacher: dict = field(default_factory=lambda: {"dim": 192, "layers": 4, "heads": 4})
    student: dict = field(default_factory=lambda: {"dim": 96, "layers": 2, "heads": 4})
    teacher_steps: int = 420                # about 100 s of one CPU core
    teacher_seconds: float | None = None    # a wall-clock cap on the teacher (then not bit-reproducible)
    steps: int = 240                        # each student's step budget
    lr: float = 2e-3
    warmup: int = 20
    k: int = 32
    samples: int = 12                       # tokens sampled from the teacher per position (the sampled student)
    alpha: float = 0.5                      # weight of the KD term; 1 - alpha on cross-entropy with the labels
    temperature: float = 1.0
    eval_every: int = 25
    eval_windows: int = 96                  # validation windows (of `context` tokens) scored at each evaluation
    train_chars: int = 1_500_000
    validation_chars: int = 150_000
    progress: bool = True


QUICK = {"teacher_steps": 150, "steps": 80, "eval_every": 20}

# (label, loss kind, tail, the kdfast names the loss needs)
STUDENTS = [
    ("cross-entropy only", "ce", None, ()),
    ("dense KD (fused_linear_kd, TeacherHead)", "dense", None, ("fused_linear_kd", "TeacherHead")),
    ("top-k KD, renormalize (store)", "topk", "renormalize", ("fused_linear_kd", "TopKStore", "topk_from_logits")),
    ("top-k KD, bucket (store)", "topk", "bucket", ("fused_linear_kd", "TopKStore", "topk_from_logits")),
    ("sampled KD, RS-KD (store)", "sampled", None, ("fused_linear_kd", "TopKStore", "sample_from_logits")),
]


def _bar(iterable, desc, settings):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False, disable=not settings.progress, file=sys.stderr)


def batch_order(n_windows: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """(steps, batch) window ids: seeded permutations of all windows, one after another (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch // n_windows)
    ids = torch.cat([torch.randperm(n_windows, generator=gen) for _ in range(epochs)])
    return ids[: steps * batch].view(steps, batch)


@torch.no_grad()
def evaluate(model: CausalLM, data: torch.Tensor, batch: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over every position of the windows `data` (n, context + 1)."""
    model.eval()
    total = 0.0
    for start in range(0, len(data), batch):
        w = data[start:start + batch]
        total += float(F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
    model.train()
    return total / data[:, 1:].numel()


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2: the profiler's C++ side logs its start and stop there on every use."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(step) -> int:
    """Bytes held by torch's CPU allocator during step() above the level before it, at the peak, from the
    profiler's allocation records (CPU torch keeps no allocator statistics of its own)."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    held = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _step(model, opt, lr, loss_fn, step, x, y) -> torch.Tensor:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, step, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def train(model, loss_fn, order, data, settings, desc, seconds=None) -> dict:
    """AdamW with warm-up and cosine decay over `order` (steps, batch); loss_fn(model, step, x, y) -> loss.
    Returns the validation curve, step times (wall and this process's CPU time: on a shared machine the CPU time
    is what the step costs) and the peak memory of one step (step 1, after the optimiser's state exists; that step
    is left out of the times, the profiler slows it)."""
    train_w, val_w = data
    steps = len(order)
    schedule = lr_schedule("cosine", steps, settings.warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.95))
    curve, times, cpu_times, peak = [(0, evaluate(model, val_w))], [], [], None
    started = time.perf_counter()
    bar = _bar(range(steps), desc, settings)
    for step in bar:
        w = train_w[order[step]]
        x, y = w[:, :-1], w[:, 1:]
        lr = settings.lr * float(schedule(step))
        t0, c0 = time.perf_counter(), time.process_time()
        if step == 1:
            peak = peak_bytes(functools.partial(_step, model, opt, lr, loss_fn, step, x, y))
        else:
            loss = _step(model, opt, lr, loss_fn, step, x, y)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        done = step + 1
        if done % settings.eval_every == 0 or done == steps:
            curve.append((done, evaluate(model, val_w)))
        if seconds is not None and time.perf_counter() - started > seconds:
            if curve[-1][0] != done:
                curve.append((done, evaluate(model, val_w)))
            break
    bar.close()
    return {"steps": curve[-1][0], "curve": curve, "val_loss": curve[-1][1], "val_ppl": math.exp(curve[-1][1]),
            "step_ms": 1000 * statistics.median(times) if times else float("nan"),
            "step_cpu_ms": 1000 * statistics.median(cpu_times) if cpu_times else float("nan"),
            "peak_mib": peak / MiB if peak is not None else float("nan"),
            "train_s": time.perf_counter() - started}


def ce_loss(model, step, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def write_store(path, teacher, order, train_w, settings, kind="topk") -> None:
    """The teacher's outputs at every position of the students' batches, in training order (the rows of step s are
    [s * batch * context, (s + 1) * batch * context)): its top-k log-probabilities (at T = 1, as a server returns
    them), or (kind "sampled") settings.samples tokens sampled at the students' temperature with their counts and
    log-probabilities, seeded."""
    teacher.eval()
    vocab = teacher.cfg.vocab_size
    if kind == "topk":
        store, desc = kdfast.TopKStore.create(path, k=settings.k, vocab_size=vocab), f"teacher top-{settings.k}"
    else:
        store = kdfast.TopKStore.create(path, k=settings.samples, vocab_size=vocab, kind="sampled",
                                        temperature=settings.temperature)
        desc, gen = f"teacher {settings.samples} samples", torch.Generator().manual_seed(settings.seed + 2)
    with store:
        for step in _bar(range(len(order)), f"{desc} -> store", settings):
            logits = teacher(train_w[order[step]][:, :-1])
            store.append(kdfast.topk_from_logits(logits, settings.k) if kind == "topk" else
                         kdfast.sample_from_logits(logits, settings.samples, settings.temperature, generator=gen))


def make_loss(kind, tail, teacher, stores, settings):
    if kind == "ce":
        return ce_loss
    rows = settings.batch * settings.context

    def kd_loss(model, step, x, y):
        hidden = model.hidden(x).flatten(0, 1)
        if kind == "dense":
            with torch.no_grad():
                t_hidden = teacher.hidden(x).flatten(0, 1)
            source, options = kdfast.TeacherHead(t_hidden, teacher.lm_head.weight), {}
        elif kind == "topk":
            source, options = stores[kind].read(step * rows, (step + 1) * rows), {"tail": tail}  # a kdfast.TopK
        else:
            source, options = stores[kind].read(step * rows, (step + 1) * rows), {}  # a kdfast.Sampled
        return kdfast.fused_linear_kd(hidden, model.lm_head.weight, source, target=y.flatten(), alpha=settings.alpha,
                                      temperature=settings.temperature, **options)
    return kd_loss


def run(settings: Settings, log=print) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    os.makedirs(settings.out, exist_ok=True)
    corpus = load_corpus(settings.seed, settings.train_chars, settings.validation_chars)
    tokenizer = train_tokenizer(corpus.train, settings.vocab)
    tokenizer.save(os.path.join(settings.out, "tokenizer.json"))
    train_tokens, val_tokens = encode(tokenizer, corpus.train), encode(tokenizer, corpus.validation)
    train_w = windows(train_tokens, settings.context)
    val_w = windows(val_tokens, settings.context)
    # Windows spread evenly over every validation file, not the first file's opening.
    data = (train_w, val_w[torch.linspace(0, len(val_w) - 1, min(settings.eval_windows, len(val_w))).long()])
    vocab = tokenizer.get_vocab_size()
    log(f"corpus: {len(corpus.train_files)} training files ({train_tokens.numel():,} tokens), "
        f"{len(corpus.validation_files)} validation files ({val_tokens.numel():,} tokens, "
        f"{data[1][:, 1:].numel():,} scored); BPE vocabulary {vocab:,} ({time.perf_counter() - started:.1f} s)")

    report = {"settings": asdict(settings), "vocab": vocab, "train_tokens": train_tokens.numel(),
              "validation_tokens": val_tokens.numel(), "models": []}
    seed_everything(settings.seed)
    teacher = CausalLM(LMConfig(vocab, settings.context, **settings.teacher))
    t_order = batch_order(len(train_w), settings.teacher_steps, settings.batch, settings.seed)
    result = train(teacher, ce_loss, t_order, data, settings, "teacher", settings.teacher_seconds)
    report["models"].append({"model": "teacher", "params": teacher.num_parameters(), **result})
    log(_row_text(report["models"][-1]))
    teacher.eval().requires_grad_(False)

    order = batch_order(len(train_w), settings.steps, settings.batch, settings.seed + 1)
    stores = {}
    for label, kind, tail, needs in STUDENTS:
        missing = [name for name in needs if not hasattr(kdfast, name)]
        if missing:
            log(f"{label}: skipped, this kdfast has no {', '.join('kdfast.' + m for m in missing)}")
            continue
        if kind in ("topk", "sampled") and kind not in stores:
            stores[kind] = open_store(kind, teacher, order, train_w, settings, report, log)
        seed_everything(settings.seed + 1)  # every student starts from the same weights
        student = CausalLM(LMConfig(vocab, settings.context, **settings.student))
        result = train(student, make_loss(kind, tail, teacher, stores, settings), order, data, settings, label)
        report["models"].append({"model": f"student: {label}", "params": student.num_parameters(), **result})
        log(_row_text(report["models"][-1]))
    report["wall_s"], report["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
    return report


STORE_KEYS = {"topk": "store", "sampled": "sampled_store"}


def open_store(kind, teacher, order, train_w, settings, report, log):
    """Writes the teacher's store of this kind, records its size under report[STORE_KEYS[kind]], and opens it for
    reading (its kind, shape and temperature checked)."""
    t0 = time.perf_counter()
    k = settings.k if kind == "topk" else settings.samples
    name = f"teacher-top{k}.kdtopk" if kind == "topk" else f"teacher-sampled{k}.kdtopk"
    path = os.path.join(settings.out, name)
    write_store(path, teacher, order, train_w, settings, kind)
    rows = order.numel() * settings.context
    info = report[STORE_KEYS[kind]] = {"path": path, "rows": rows, "k": k, "bytes": os.path.getsize(path),
                                       "bytes_per_token": (os.path.getsize(path) - 64) / rows,
                                       "write_s": time.perf_counter() - t0}
    what = f"top-{k}" if kind == "topk" else f"sampled (n = {k}, T = {settings.temperature:g})"
    log(f"{what} store: {rows:,} rows, {info['bytes_per_token']:.0f} bytes a token, {info['bytes'] / MiB:.1f} MiB "
        f"on disk, written in {info['write_s']:.1f} s")
    return kdfast.TopKStore.open(path, k=k, vocab_size=teacher.cfg.vocab_size, kind=kind,
                                 temperature=settings.temperature if kind == "sampled" else None)


COLUMNS = [("model", "model", "{}"), ("params", "parameters", "{:,}"), ("steps", "steps", "{}"),
           ("val_loss", "val loss", "{:.3f}"), ("val_ppl", "val ppl", "{:.1f}"),
           ("peak_mib", "peak memory / step", "{:.1f} MiB"), ("step_ms", "step time", "{:.0f} ms"),
           ("step_cpu_ms", "step CPU time", "{:.0f} ms")]


def _row_text(row) -> str:
    return "  ".join(f"{title}={fmt.format(row[key])}" for key, title, fmt in COLUMNS)


def markdown(report) -> str:
    s = report["settings"]
    return "\n".join([
        "# kdfast LLM main job (`python -m kdfast llm-demo`)", "",
        f"Corpus: Python {platform.python_version()} standard library sources, {report['train_tokens']:,} training "
        f"and {report['validation_tokens']:,} validation tokens (split by file); byte-level BPE, vocabulary "
        f"{report['vocab']:,}. Batches of {s['batch']} x {s['context']} tokens; AdamW, lr {s['lr']}, cosine. "
        f"KD students: alpha {s['alpha']}, temperature {s['temperature']}, k = {s['k']}"
        f"{_store_sizes(report)}. "
        f"Peak memory: torch's allocations during one training step above the level before it. "
        f"Step time: median, wall clock and this process's CPU time. CPU, {torch.get_num_threads()} thread(s), "
        f"seed {s['seed']}; whole run {report['wall_s']:.0f} s wall clock, {report['cpu_s']:.0f} s CPU time.", "",
        table(report["models"], COLUMNS), ""])


def _store_sizes(report) -> str:
    sizes = [f"{what} {report[key]['bytes_per_token']:.0f} bytes a token" for what, key in
             (("top-k store", "store"), (f"sampled store (n = {report['settings']['samples']})", "sampled_store"))
             if key in report]
    return f" ({', '.join(sizes)})" if sizes else ""


def chart(report, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for m in report["models"]:
        steps, losses = zip(*m["curve"])
        teacher = m["model"] == "teacher"
        ax.plot(steps, losses, "--" if teacher else "-", color="#888888" if teacher else None,
                label=m["model"].replace("student: ", ""))
    ax.set_xlabel(f"training step (batch of {report['settings']['batch']} x {report['settings']['context']} tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    finals = [m["val_loss"] for m in report["models"]]
    ax.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("kdfast llm-demo: students distilled from a small LM on Python source")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast llm-demo", description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--out", default=defaults.out, help=f"output folder (default: ./{defaults.out})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: teacher {QUICK['teacher_steps']} and students {QUICK['steps']} steps")
    parser.add_argument("--teacher-steps", type=int, help=f"teacher steps (default {defaults.teacher_steps})")
    parser.add_argument("--teacher-seconds", type=float,
                        help="also stop the teacher after this many seconds (the run is then not reproducible)")
    parser.add_argument("--steps", type=int, help=f"steps of each student (default {defaults.steps})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are small, more threads add overhead)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("teacher_steps", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.teacher_seconds is not None and args.teacher_seconds <= 0:
        parser.error(f"--teacher-seconds must be > 0, got {args.teacher_seconds}")
    settings = replace(defaults, out=args.out, seed=args.seed, progress=not args.no_progress,
                       teacher_seconds=args.teacher_seconds, **(QUICK if args.quick else {}))
    settings = replace(settings, **{k: getattr(args, k) for k in ("teacher_steps", "steps")
                                    if getattr(args, k) is not None})
    try:
        require_tokenizers()
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    job(settings)
    return 0


def job(settings: Settings, log=print) -> dict:
    """run(), then results.json, llm-demo.md and llm-demo.png under settings.out; prints the table."""
    report = run(settings, log)
    with open(os.path.join(settings.out, "results.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(settings.out, "llm-demo.md"), "w") as fh:
        fh.write(markdown(report))
    chart(report, os.path.join(settings.out, "llm-demo.png"))
    log("")
    log(table(report["models"], COLUMNS))
    log(f"\nwall time {report['wall_s']:.0f} s (CPU time {report['cpu_s']:.0f} s); wrote llm-demo.md, llm-demo.png "
        f"and results.json under {settings.out}")
    return report
