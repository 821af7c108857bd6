"""kdfast's main job, `python -m kdfast demo`: distillation on scikit-learn's digits, end to end.

Model compression with few labels: a teacher is trained on every labelled training digit; the same small student
is then trained from the same initialisation on a transfer set (all training images, but only a few labelled per
class), with cross-entropy alone and with each distillation method this kdfast provides. The teacher's soft labels
on the unlabelled images are what distillation adds. Prints a table (test accuracy, calibration, training time)
and writes results.json and demo.png under the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import kdfast

from .data import UNLABELLED, few_labels, load_digits, stratified_split
from .distiller import Distiller
from .models import build_model
from .terms import KD, STAGES, CrossEntropy, FeatureTerm
from .trainer import Stage, Trainer, seed_everything


def _methods():
    """(label, terms). Feature methods add to KD, as in their papers; each loss is kdfast's own module."""
    kd = {"ce": CrossEntropy(), "kd": KD(4.0)}
    return [
        ("CE (labels only)", {"ce": CrossEntropy()}),
        ("KD", dict(kd)),
        # The paper's weight 1000 is for CIFAR maps of 32x32 .. 8x8 positions; the loss is a mean over positions,
        # about 16 times larger on these 8x8 .. 2x2 maps, so 100 plays its part here (1000 swamps KD).
        ("KD + attention transfer", {**kd, "at": (FeatureTerm(kdfast.AttentionTransfer(), STAGES), 100.0)}),
        ("KD + pairwise affinity", {**kd, "pa": (FeatureTerm(kdfast.PairwiseAffinity(), ("stage2", "stage3"),
                                                             per_pair=True), 10.0)}),
        ("KD + manifold", {**kd, "md": (FeatureTerm(kdfast.ManifoldDistillation(4, weights=[4.0, 2.0, 1.0]),
                                                    STAGES), 1.0)}),
    ]


def run(out_dir="demo-out", seed=0, epochs=30, teacher_epochs=20, per_class=5, teacher="cnn_large",
        student="cnn_tiny", progress=False, log=print) -> list:
    data = load_digits()
    holdout, train = stratified_split(data.train, 10, seed)          # for temperature scaling only
    transfer = few_labels(train, per_class, seed + 1)
    common = dict(batch_size=64, augment="shift", seed=seed, progress=progress, holdout=holdout)
    labelled = int((transfer.targets != UNLABELLED).sum())
    log(f"digits: {len(train)} training images ({labelled} labelled for the students), "
        f"{len(holdout)} held out for calibration, {len(data.test)} test")

    rows = []
    seed_everything(seed)
    t_model = build_model(teacher, data.num_classes, data.in_channels)
    started = time.perf_counter()
    t_trainer = Trainer(Distiller(t_model), train, [Stage(teacher_epochs, "teacher", lr=0.05)], **common,
                        out_dir=os.path.join(out_dir, "runs", "teacher"))
    t_trainer.fit()
    rows.append({"method": f"teacher {teacher} (all {len(train)} labels)",
                 **t_trainer.evaluate(data.test), "train_s": time.perf_counter() - started})
    log(_row_text(rows[-1]))

    for label, terms in _methods():
        seed_everything(seed + 1)  # every student starts from the same weights
        s_model = build_model(student, data.num_classes, data.in_channels)
        slug = label.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
        trainer = Trainer(Distiller(s_model, t_model, terms), transfer, [Stage(epochs, label, lr=0.05)], **common,
                          out_dir=os.path.join(out_dir, "runs", slug))
        started = time.perf_counter()
        trainer.fit()
        rows.append({"method": f"student {student}: {label}", **trainer.evaluate(data.test),
                     "train_s": time.perf_counter() - started})
        log(_row_text(rows[-1]))
    return rows


COLUMNS = [("method", "method", "{}"), ("accuracy", "test acc", "{:.1%}"), ("ece", "ECE", "{:.3f}"),
           ("ece_calibrated", "ECE (T-scaled)", "{:.3f}"), ("coverage", "coverage@0.9", "{:.1%}"),
           ("selective_accuracy", "selective acc", "{:.1%}"), ("train_s", "train time", "{:.1f} s")]


def _row_text(row) -> str:
    return "  ".join(f"{title}={fmt.format(row[key])}" for key, title, fmt in COLUMNS if key in row)


def table(rows, columns=COLUMNS) -> str:
    """A markdown table of rows (dicts) with columns [(key, title, format)]; a missing key leaves its cell empty."""
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(r[key]) if key in r else "" for key, _, fmt in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]

    def line(c):
        return "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w)
                                 for i, (x, w) in enumerate(zip(c, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


def chart(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["method"].split(": ")[-1] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 1.6))
    for ax, key, title in ((axes[0], "accuracy", "test accuracy"), (axes[1], "ece", "expected calibration error")):
        values = [r[key] for r in rows]
        bars = ax.barh(names, values, color=["#888888"] + ["#4477aa"] * (len(rows) - 1))
        ax.invert_yaxis()
        ax.set_title(title)
        for bar, v in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.3f}", va="center", fontsize=8)
        if key == "accuracy":
            ax.set_xlim(min(values) - 0.1, 1.04)
    axes[1].set_yticklabels([])
    fig.suptitle("kdfast demo: digits, few labels + teacher soft labels on a transfer set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="student epochs (default 30)")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--labels-per-class", type=int, default=5, help="labelled digits per class for students")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are tiny, more threads add overhead)")
    parser.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "teacher_epochs", "labels_per_class", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(args.out, args.seed, args.epochs, args.teacher_epochs, args.labels_per_class,
               progress=args.progress)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    chart(rows, os.path.join(args.out, "demo.png"))
    print()
    print(table(rows))
    base = next(r for r in rows if r["method"].endswith("CE (labels only)"))
    gains = [f"{r['method'].split(': ')[-1]} {100 * (r['accuracy'] - base['accuracy']):+.1f}" for r in rows
             if r["method"].startswith("student") and r is not base]
    print(f"\ntest accuracy over cross-entropy alone (points): {', '.join(gains)}")
    print(f"\nwall time {time.perf_counter() - started:.1f} s; wrote {os.path.join(args.out, 'demo.png')} and "
          f"results.json")
    return 0
