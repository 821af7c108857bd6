"""`python -m kdfast llm-train`: distil a Hugging Face causal LM from a top-k (or sampled) store written by
`python -m kdfast topk-build`.

Each step reads --batch-size sequences of the store's token stream and their store rows, runs the student's body
(never its logits) and fused_linear_kd on its lm_head weight: alpha * KD + (1 - alpha) * cross-entropy, mean over
the positions that have a next token (padding and sequence ends take no part, on both sides). The store's header
says its kind: a top-k store gives a kdfast.TopK teacher (every divergence fused_linear_kd takes for it, --tail),
a sampled store a kdfast.Sampled one, distilled at the temperature its samples were drawn at. The run's folder
(--out) gets the student (save_pretrained, with its tokenizer) at the end and in checkpoint-STEP/ every
--save-every steps (--resume continues from the latest), log.jsonl (one line a step) and metrics.json.

Under torchrun the student is sharded with FSDP2 (fully_shard on each decoder layer and on the whole) and
--batch-size is the global batch. The loss runs inside the root module's forward, where FSDP2 holds the root's
parameters (embeddings, final norm, lm_head) unsharded; the decoder layers are gathered one at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from ..fused_linear import fused_linear_kd
from ..logits import DIVERGENCES
from ..topk import Sampled, TopK
from ..topk_store import TopKStore
from . import hf_data
from .checkpoint import save_checkpoint, write_json, write_json_lines
from .hf_data import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
STATE_FILE = "kdfast_train_state.pt"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdfast llm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, metavar="DIR", help="the student's folder (save_pretrained: config, "
                   "weights and tokenizer)")
    p.add_argument("--store", required=True, metavar="STORE", help="a store written by python -m kdfast topk-build")
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha on cross-entropy")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature of the KD term (None: 1 "
                   "for a top-k store, the temperature a sampled store's samples were drawn at)")
    p.add_argument("--tail", choices=["renormalize", "bucket"], default="renormalize",
                   help="the teacher's mass outside its top k: renormalized away, or one bucket (topk_kd_div)")
    p.add_argument("--divergence", default="kl", help=f"the KD divergence: {', '.join(DIVERGENCES)} (a top-k store "
                   f"takes each, a sampled store kl)")
    p.add_argument("--beta", type=float, default=0.5, help="jsd's weight: beta KL(q || m) + (1 - beta) KL(p || m)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences a step (all processes together)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the store")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (before --epochs end)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: with momentum 0.9")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (peak)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up, then cosine decay to 0")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the sequence order")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the student's weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args) -> None:
    if not 0 <= args.alpha <= 1:
        raise PipelineError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise PipelineError(f"--temperature must be > 0 and finite, got {args.temperature}")
    if args.divergence not in DIVERGENCES:
        raise PipelineError(f"--divergence {args.divergence}: choose one of {', '.join(DIVERGENCES)}")
    for name in ("batch_size", "epochs", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise PipelineError(f"--out {args.out} is a file; the run needs a folder there")


def check_store(meta: dict, store: str, student, tokenizer, student_dir: str) -> None:
    """Refuses a store whose tokenizer or vocabulary is not the student's, naming both."""
    mine = hf_data.tokenizer_identity(tokenizer)
    theirs = meta["tokenizer"]
    if mine["sha256"] != theirs["sha256"]:
        raise PipelineError(f"--store {store} was built with the tokenizer of {meta['teacher']} ({theirs['tokens']} "
                            f"tokens, sha256 {theirs['sha256'][:12]}); --student {student_dir} has another tokenizer "
                            f"({mine['tokens']} tokens, sha256 {mine['sha256'][:12]})")
    vocab = hf_data.output_weight(student).shape[0]
    if vocab != meta["vocab_size"]:
        raise PipelineError(f"--store {store} holds a vocabulary of {meta['vocab_size']} (lm_head of "
                            f"{meta['teacher']}); --student {student_dir} has {vocab}")
    if not meta.get("complete"):
        raise PipelineError(f"--store {store}: topk-build has not finished it (run topk-build again to complete it)")


def teacher_options(args, store: TopKStore, path: str) -> dict:
    """fused_linear_kd's teacher options for this store: temperature (a sampled store's own unless --temperature
    names the same), divergence, beta, tail. Checked by fused_linear_kd itself on a one-row teacher of the store's
    form, so what it refuses (a divergence a Sampled teacher does not take) is named here in one line."""
    what = "a top-k store (kdfast.TopK teacher)" if store.kind == "topk" else \
        f"a sampled store (kdfast.Sampled teacher, drawn at T = {store.temperature:g})"
    temperature = args.temperature if args.temperature is not None else store.temperature
    if store.kind == "sampled" and temperature != store.temperature:
        raise PipelineError(f"--temperature {temperature:g}: --store {path} is {what}; kdfast's sampled loss is the "
                            f"KL at the temperature the samples were drawn at (topk-build --sample-temperature)")
    options = dict(temperature=temperature, divergence=args.divergence, beta=args.beta, tail=args.tail)
    one = torch.zeros(1, 1, dtype=torch.int32)
    probe = TopK(one, one.float()) if store.kind == "topk" else Sampled(one, one + 1, one.float())
    try:
        with torch.no_grad():
            fused_linear_kd(torch.zeros(1, 1), torch.zeros(1, 1), probe, **options)
    except ValueError as e:
        raise PipelineError(f"--divergence {args.divergence} --tail {args.tail} --beta {args.beta:g} --temperature "
                            f"{temperature:g}: --store {path} is {what}, and fused_linear_kd refuses it: {e}") from None
    return options


class StudentWithLoss(torch.nn.Module):
    """The student and its loss in one forward: the body's last hidden states at the positions with a next token,
    then fused_linear_kd on the lm_head weight. Under FSDP2 this module is the root, so its forward sees the
    lm_head weight (tied or not) unsharded, and its backward reduce-scatters the weight's gradient."""

    def __init__(self, model, alpha: float, options: dict):
        super().__init__()
        self.model, self.alpha, self.options = model, alpha, options

    def forward(self, input_ids, attention_mask, rows, target, teacher, total_rows: int):
        hidden = hf_data.body(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        hidden = hidden[:, :-1][rows]
        head = self.model.get_output_embeddings()
        loss = fused_linear_kd(hidden, head.weight, teacher, student_bias=head.bias, target=target, alpha=self.alpha,
                               **self.options)
        return loss * (hidden.shape[0] / total_rows)  # this process's share of the global batch's mean


def shard(wrapper: StudentWithLoss, device, world: int) -> None:
    """FSDP2: each decoder layer its own unit (the classes the model names in _no_split_modules), the rest (the
    embeddings, final norm, lm_head) the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    names = set(getattr(wrapper.model, "_no_split_modules", None) or ())
    layers = [m for m in wrapper.model.modules() if type(m).__name__ in names]
    if not layers:
        raise PipelineError(f"--student: {type(wrapper.model).__name__} names no decoder layer class "
                            f"(_no_split_modules) to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_student(wrapper, tokenizer, folder: str, rank: int, extra=None) -> None:
    """save_pretrained of the whole student (gathered from the shards) and its tokenizer into folder. With extra
    (a checkpoint: the optimizer's full state and the step, into kdfast_train_state.pt) it is written into a
    temporary folder renamed at the end, so a checkpoint folder that exists is complete."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(wrapper, options=_options())  # every process takes part in the gather
    if rank != 0:
        return
    state = {k.removeprefix("model."): v for k, v in state.items()}
    target = folder if extra is None else folder + ".tmp"
    if extra is not None:
        shutil.rmtree(target, ignore_errors=True)
    wrapper.model.save_pretrained(target, state_dict=state)
    tokenizer.save_pretrained(target)
    if extra is not None:
        save_checkpoint(extra, os.path.join(target, STATE_FILE))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(target, folder)


def latest_checkpoint(out: str):
    found = [(int(m.group(1)), os.path.join(out, name)) for name in (os.listdir(out) if os.path.isdir(out) else [])
             if (m := CHECKPOINT.match(name)) and os.path.isfile(os.path.join(out, name, STATE_FILE))]
    return max(found) if found else (0, None)


def schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def order(sequences: int, epoch: int, seed: int) -> np.ndarray:
    """The sequences of an epoch, shuffled by (seed, epoch): the same on every process and after a resume."""
    return np.random.default_rng([seed, epoch]).permutation(sequences)


def run(args) -> dict:
    _check_args(args)
    rank, world, device = hf_data.start_processes(args.device)
    if args.batch_size < world:
        raise PipelineError(f"--batch-size {args.batch_size} is smaller than the {world} processes")
    meta = hf_data.read_meta(args.store)
    step, checkpoint = latest_checkpoint(args.out)
    if checkpoint and not args.resume:
        raise PipelineError(f"--out {args.out} holds {os.path.basename(checkpoint)}: pass --resume to continue it, "
                            f"or give another --out")
    source = checkpoint or args.student
    student, tokenizer = hf_data.load_model(source, "--student", DTYPES[args.dtype])
    check_store(meta, args.store, student, tokenizer, args.student)
    store = TopKStore.open(args.store, k=meta["k"], vocab_size=meta["vocab_size"], kind=meta["kind"])
    if len(store) != meta["rows"]:
        raise PipelineError(f"--store {args.store}: {len(store)} rows, its meta file records {meta['rows']}")
    options = teacher_options(args, store, args.store)
    lengths, token_offsets, row_offsets, tokens = hf_data.TokenStream(args.store).read(meta)

    wrapper = StudentWithLoss(student.to(device), args.alpha, options)
    wrapper.train()
    if world > 1:
        shard(wrapper, device, world)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(wrapper.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    per_epoch = math.ceil(len(lengths) / args.batch_size)
    total = per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, args.warmup, total))
    log_path = os.path.join(args.out, "log.jsonl")
    history = []
    if checkpoint:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=True)
        set_optimizer_state_dict(wrapper, optimizer, state["optimizer"], options=_options())
        scheduler.load_state_dict(state["scheduler"])
        if os.path.isfile(log_path):
            with open(log_path) as fh:
                history = [r for r in map(json.loads, fh) if r["step"] <= step]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_json_lines(history, log_path)  # a resumed run's log, cut back to its checkpoint

    bar = hf_data.progress(total, step, "step", rank, not args.no_progress)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    try:
        while step < total:
            epoch, position = divmod(step, per_epoch)
            chosen = order(len(lengths), epoch, args.seed)[position * args.batch_size:(position + 1) * args.batch_size]
            mine = chosen[rank::world]
            batch = [tokens[token_offsets[s]:token_offsets[s] + lengths[s]].tolist() for s in mine]
            ids, mask, rows = hf_data.pad_batch(batch, pad_id)
            parts = [store.read(int(row_offsets[s]), int(row_offsets[s] + lengths[s] - 1)) for s in mine]
            teacher = type(parts[0])(*(torch.cat(column).to(device) for column in zip(*parts)))
            target = ids[:, 1:][rows].to(device)
            total_rows = int((lengths[chosen] - 1).sum())
            share = wrapper(ids.to(device), mask.to(device), rows.to(device), target, teacher, total_rows)
            optimizer.zero_grad(set_to_none=True)
            # FSDP2 averages the processes' gradients; the global loss is the sum of their shares.
            (share * world).backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(wrapper.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            value = share.detach().float()
            if world > 1:
                dist.all_reduce(value)
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": float(value), "lr": scheduler.get_last_lr()[0],
                            "rows": total_rows, "time_s": round(time.perf_counter() - start, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{float(value):.4f}")
            if rank == 0:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(history[-1], sort_keys=True) + "\n")
            if args.save_every and step % args.save_every == 0 and step < total:
                save_student(wrapper, tokenizer, os.path.join(args.out, f"checkpoint-{step}"), rank,
                             _train_state(wrapper, optimizer, scheduler, step))
                _drop_older(args.out, step, rank)
    finally:
        bar.close()
        store.close()
    save_student(wrapper, tokenizer, args.out, rank)
    metrics = {"steps": step, "final_loss": history[-1]["loss"] if history else None,
               "train_s": round(time.perf_counter() - start, 3), "processes": world,
               "peak_rss_mib_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        metrics["peak_cuda_mib_rank0"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if rank == 0:
        write_json_lines(history, log_path)
        write_json(metrics, os.path.join(args.out, "metrics.json"))
    return metrics


def _train_state(wrapper, optimizer, scheduler, step: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"optimizer": get_optimizer_state_dict(wrapper, optimizer, options=_options()),
            "scheduler": scheduler.state_dict(), "step": step}


def _drop_older(out: str, step: int, rank: int) -> None:
    """Keeps the latest checkpoint only (a whole model each)."""
    if rank != 0:
        return
    for name in os.listdir(out):
        m = CHECKPOINT.match(name)
        if m and int(m.group(1)) < step:
            shutil.rmtree(os.path.join(out, name))


def main(argv=None) -> int:
    args, metrics = hf_data.run_command(parser(), run, argv)
    if metrics is None:
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1))
    return 0
