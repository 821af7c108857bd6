"""`python -m kdfast compare`: every method recipe against cross-entropy alone, on two small tasks.

Digits (the demo's setting): a teacher trained on every labelled training digit; the same small student, from the
same initialisation, trained on a transfer set with only a few labels per class, by each method. Shapes (kdfast's
segmentation set, for the dense methods): a SegNet teacher on every labelled image; the student with the labels of
a fraction of the images. Prints test accuracy (digits) or mIoU (shapes) per method, its difference from
cross-entropy alone, and the training time; with --seeds N > 1 the mean and spread over N student seeds, and the
difference from cross-entropy seed by seed (each seed's student starts from the same weights for every method).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..methods import registry
from .data import UNLABELLED, few_labels, labelled_fraction, load_digits, load_shapes
from .distiller import Distiller
from .metrics import mean_iou
from .models import build_model
from .recipes import DENSE, NEEDS_ENSEMBLE, SMALL_DATA, TEACHER_FREE, Setting, build_recipe, labelled_examples
from .trainer import Stage, Trainer, seed_everything

BASELINE = "ce"
# Cross-entropy on the labelled examples alone (repeated to the transfer set's size): what the methods without a
# teacher (online, self-distillation), which train so, are measured against.
LABELLED_BASELINE = "ce_labelled"


def _trainer(distiller, split, stages, options):
    return Trainer(distiller, split, stages, batch_size=options["batch_size"], augment=options["augment"],
                   seed=options["seed"], progress=False)


class Task:
    """One data set with its trained teachers, and how a student is built and scored on it."""

    def __init__(self, name, train, test, student, teacher, metric, augment, args):
        self.name, self.train, self.test, self.metric = name, train, test, metric
        self.student_factory, self.args = student, args
        self.options = {"batch_size": args.batch_size, "augment": augment, "seed": args.seed}
        self.teacher_factory, self.teachers = teacher, []

    def stage(self, epochs, name):
        return Stage(epochs, name, lr=self.args.lr)

    def fit(self, distiller, stages, split):
        trainer = _trainer(distiller, split, stages, self.options)
        trainer.fit()
        return trainer

    def ensure_teachers(self, count):
        labelled = self.full_labels
        while len(self.teachers) < count:
            seed_everything(self.args.seed + 100 * len(self.teachers))
            teacher = self.teacher_factory()
            self.fit(Distiller(teacher), [self.stage(self.args.teacher_epochs, "teacher")], labelled)
            self.teachers.append(teacher)
        return self.teachers[:count]

    def score(self, trainer) -> float:
        logits = trainer.predict(self.test)
        if self.metric == "mIoU":
            return mean_iou(logits, self.test.targets, logits.shape[1])
        return float((logits.argmax(1) == self.test.targets).float().mean())

    def run(self, method, seed):
        """(score, training seconds) of the student trained by `method` (BASELINE: cross-entropy alone)."""
        started = time.perf_counter()
        seed_everything(seed)
        if method in (BASELINE, LABELLED_BASELINE):
            split = self.train if method == BASELINE else labelled_examples(self.train)
            distiller, stages = Distiller(self.student_factory()), [self.stage(self.args.epochs, method)]
        else:
            teachers = self.ensure_teachers(self.args.ensemble if method in NEEDS_ENSEMBLE else 1)
            seed_everything(seed)  # every student starts from the same weights
            setting = Setting(self.student_factory, self.train, teachers, epochs=self.args.epochs, lr=self.args.lr,
                              assistant=lambda: build_model("cnn_small", 10, 1), fit=self.fit)
            recipe = build_recipe(method, setting, **SMALL_DATA.get(method, {}))
            distiller, stages, split = recipe.distiller, recipe.stages, recipe.train
        trainer = self.fit(distiller, stages, split)
        return self.score(trainer), time.perf_counter() - started


def digits_task(args) -> Task:
    data = load_digits()
    transfer = few_labels(data.train, args.labels_per_class, args.seed + 1)
    task = Task("digits", transfer, data.test, lambda: build_model(args.student, 10, 1),
                lambda: build_model(args.teacher, 10, 1), "accuracy", "shift", args)
    task.full_labels = data.train
    return task


def shapes_task(args) -> Task:
    data = load_shapes(args.shapes_train, args.shapes_test, args.shapes_size, seed=args.seed)
    transfer = labelled_fraction(data.train, args.shapes_labelled)
    task = Task("shapes", transfer, data.test, lambda: build_model("segnet_small", data.num_classes, data.in_channels),
                lambda: build_model("segnet", data.num_classes, data.in_channels), "mIoU", "none", args)
    task.full_labels = data.train
    return task


def compare(args, log=print) -> list:
    methods = args.methods
    rows = []
    for task_name, make, names in (("digits", digits_task, [m for m in methods if m not in DENSE]),
                                   ("shapes", shapes_task, [m for m in methods if m in DENSE])):
        if not names:
            continue
        task = make(args)
        started = time.perf_counter()
        teacher = task.ensure_teachers(1)[0]
        t_score = task.score(_EvalOnly(teacher, task))
        labelled = int((task.train.targets != UNLABELLED).reshape(len(task.train), -1).any(1).sum())
        log(f"{task_name}: teacher {t_score:.3f} {task.metric} ({time.perf_counter() - started:.1f} s); "
            f"{labelled} labelled of {len(task.train)} training examples")
        bases = {}
        extra = [LABELLED_BASELINE] if any(m in TEACHER_FREE for m in names) else []
        for method in [BASELINE] + extra + names:
            scores, seconds = [], 0.0
            for k in range(args.seeds):
                score, took = task.run(method, args.seed + 1 + k)
                scores.append(score)
                seconds += took
            row = {"task": task_name, "method": method, "metric": task.metric, "mean": statistics.mean(scores),
                   "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "scores": scores,
                   "train_s": seconds / len(scores),
                   "family": registry.METHODS[method].family if method in registry.METHODS else "baseline"}
            if method in (BASELINE, LABELLED_BASELINE):
                bases[method] = row
            row["baseline"] = LABELLED_BASELINE if method in TEACHER_FREE else BASELINE
            # Every method and its baseline start from the same weights per seed: compare them seed by seed.
            paired = [a - b for a, b in zip(scores, bases[row["baseline"]]["scores"])]
            row["delta"] = statistics.mean(paired)
            row["delta_std"] = statistics.stdev(paired) if len(paired) > 1 else 0.0
            rows.append(row)
            log(f"  {method}: {row['mean']:.3f} ({row['delta']:+.3f} vs {row['baseline']}) in {row['train_s']:.1f} s")
    return rows


class _EvalOnly:
    """Lets Task.score evaluate a plain network (the teacher)."""

    def __init__(self, model, task):
        self.trainer = _trainer(Distiller(model), task.test, [Stage(1)], task.options)

    def predict(self, split):
        return self.trainer.predict(split)


def table(rows) -> str:
    head = ["task", "method", "family", "metric", "score", "vs ce", "train time"]
    cells = [head] + [[r["task"], r["method"], r["family"], r["metric"],
                       f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if len(r["scores"]) > 1 else ""),
                       "" if r["method"] in (BASELINE, LABELLED_BASELINE) else
                       f"{r['delta']:+.3f}" + (f" ± {r['delta_std']:.3f}" if len(r["scores"]) > 1 else "")
                       + ("*" if r["baseline"] == LABELLED_BASELINE else ""),
                       f"{r['train_s']:.1f} s"]
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    def line(c):
        return "| " + " | ".join(x.ljust(w) if i < 4 else x.rjust(w)
                                 for i, (x, w) in enumerate(zip(c, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < 4 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdfast compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="all",
                   help=f"comma-separated method names, or all (default): {', '.join(registry.METHODS)}")
    p.add_argument("--epochs", type=int, default=20, help="student epochs (default 20)")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--labels-per-class", type=int, default=5, help="labelled digits per class for the students")
    p.add_argument("--teacher", default="cnn_small", help="digits teacher model (default cnn_small)")
    p.add_argument("--student", default="cnn_tiny", help="digits student model (default cnn_tiny)")
    p.add_argument("--ensemble", type=int, default=3, help="teachers of the ensemble methods (default 3)")
    p.add_argument("--shapes-train", type=int, default=512)
    p.add_argument("--shapes-test", type=int, default=128)
    p.add_argument("--shapes-size", type=int, default=24, help="shapes image side (default 24)")
    p.add_argument("--shapes-labelled", type=float, default=0.25,
                   help="fraction of the shapes training images whose labels the students see (default 0.25)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="student seeds per method (mean ± std when > 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the models are tiny)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("epochs", "teacher_epochs", "labels_per_class", "ensemble", "shapes_train", "shapes_test",
                 "shapes_size", "batch_size", "seeds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.shapes_labelled <= 1:
        p.error(f"--shapes-labelled must be in (0, 1], got {args.shapes_labelled}")
    names = list(registry.METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")
                                                                   if m.strip()]
    unknown = [m for m in names if m not in registry.METHODS]
    if unknown or not names:
        p.error(f"--methods: unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"available: {', '.join(registry.METHODS)}")
    args.methods = names
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = compare(args)
    print()
    print(table(rows))
    if any(r["baseline"] == LABELLED_BASELINE for r in rows):
        print(f"\n* against {LABELLED_BASELINE}: cross-entropy on the labelled examples alone, as these methods "
              f"(no teacher) train")
    if args.seeds > 1:
        print(f"\nscore: mean ± std over {args.seeds} student seeds; vs ce: mean ± std of the per-seed differences "
              f"(a method and its baseline start from the same weights for each seed)")
    print(f"\nwall time {time.perf_counter() - started:.1f} s")
    return 0
