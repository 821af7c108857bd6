"""`python -m kdfast train`: train a student on digits or CIFAR, or a segmentation student on kdfast's shapes, alone
or distilled from a teacher.

Without --teacher-checkpoint a --teacher is trained first (cross-entropy, --teacher-epochs). The run's folder
(--out) gets checkpoint.pt (every epoch; --resume continues from it), log.jsonl (one line per epoch),
student.pt (the final weights, loadable as a --teacher-checkpoint) and metrics.json. Under torchrun
(`torchrun --nproc_per_node=N -m kdfast train ...`) it trains with DDP; --batch-size is the global batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from ..methods.registry import METHODS as REGISTRY
from .checkpoint import CheckpointError, load_state_dict_file, save_checkpoint, state_dict_mismatch, write_json
from .data import DATASETS, DENSE_DATASETS, LOCAL_DATASETS, few_labels, labelled_fraction, load_dataset
from .distiller import Distiller
from .models import MODELS, SEGMENTATION_MODELS, build_model
from .recipes import (
    ALONE,
    DENSE,
    NEEDS_ENSEMBLE,
    RECIPES,
    SMALL_DATA,
    TEACHER_FREE,
    Setting,
    compose_recipe,
    deployed,
)
from .safe_pickle import PickleFileError
from .schedules import Constant
from .terms import CrossEntropy
from .trainer import AMP_DTYPES, OPTIMIZERS, Stage, Trainer, seed_everything


class CliError(Exception):
    pass


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def _fraction(text):
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _weight(text):
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight of {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"weight of {name!r} must be finite and >= 0, got {value}")
    return name, number


def _option(text):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"option {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"option {name!r} must be finite, got {value}")
    return name, int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdfast train", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--teacher", help="teacher model name (needed by every method but ce)")
    p.add_argument("--teacher-checkpoint", help="teacher weights: a student.pt or checkpoint.pt of an earlier run")
    p.add_argument("--data", default="digits", choices=DATASETS)
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py / cifar-100-python (python pickles)")
    p.add_argument("--method", default=None,
                   help=f"a method of kdfast.methods (its recipe, kdfast.train.recipes), or a comma list of them "
                        f"composed on one student (their terms in one stage; {', '.join(ALONE)} run alone): for "
                        f"classification {', '.join(sorted(set(RECIPES) - set(DENSE)))}; for segmentation (--data "
                        f"shapes) {', '.join(DENSE)}; or ce, cross-entropy alone (default: kd with a teacher, "
                        f"pixelwise on shapes; ce without)")
    p.add_argument("--paper-defaults", action="store_true",
                   help="method recipes: the losses' paper defaults everywhere (without it, on digits and shapes "
                        "a few are adapted to short runs on small data: kdfast.train.recipes.SMALL_DATA)")
    p.add_argument("--ensemble", type=_positive(int), default=3,
                   help="teachers trained for the ensemble methods (ensemble_*, feed, end2; default 3)")
    p.add_argument("--assistant", default="cnn_small", help="TAKD's teacher-assistant model (default cnn_small)")
    p.add_argument("--weight", type=_weight, action="append", default=[], metavar="NAME=VALUE",
                   help="a term's weight, e.g. --weight at=1000 (a recipe's terms are named after its methods, plus "
                        "ce and kd where the recipe adds them)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="NAME=VALUE",
                   help="a loss option of the methods that have it (their registry entry's options; "
                        "--list-options shows them with defaults and help), e.g. --option temperature=2")
    p.add_argument("--list-options", action="store_true",
                   help="print the options of the --method methods (all methods without --method) and exit")
    p.add_argument("--temperature", type=_positive(float), help="same as --option temperature=T")
    p.add_argument("--labels-per-class", type=_positive(int),
                   help="keep labels of only this many training images per class (the rest become an "
                        "unlabelled transfer set for distillation)")
    p.add_argument("--labelled-fraction", type=_fraction, metavar="F",
                   help="segmentation (--data shapes): keep the labels of only the first fraction F of the training "
                        "images, in (0, 1] (the rest become an unlabelled transfer set for distillation)")
    p.add_argument("--shapes-train", type=_positive(int), metavar="N", help="shapes training images (default 512)")
    p.add_argument("--shapes-test", type=_positive(int), metavar="N", help="shapes test images (default 128)")
    p.add_argument("--shapes-size", type=_positive(int), metavar="PX", help="shapes image side (default 24)")
    p.add_argument("--epochs", type=_positive(int), default=30)
    p.add_argument("--teacher-epochs", type=_positive(int), default=30)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=0.05)
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "step", "constant"))
    p.add_argument("--warmup", type=_non_negative, default=0.0, help="linear learning-rate warm-up, in epochs")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=_non_negative, default=5e-4)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--grad-clip", type=_positive(float))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=_positive(int), help="torch CPU threads")
    p.add_argument("--out", default="runs/train", help="run folder (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    return p


def _recipe(args):
    """The registry methods of --method (None: cross-entropy alone), after checking they fit the data and the
    teacher."""
    dense = args.data in DENSE_DATASETS
    default = ("pixelwise" if dense else "kd") if args.teacher else "ce"
    names = [m.strip() for m in (args.method or default).split(",") if m.strip()]
    unknown = [m for m in names if m not in RECIPES and m != "ce"]
    if unknown or not names:
        raise CliError(f"--method: unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                       f"available: ce, {', '.join(RECIPES)}")
    names = [m for m in names if m != "ce"]  # every recipe has its cross-entropy where the method wants it
    if not names:
        return None
    for name in names:
        if name in DENSE and not dense:
            raise CliError(f"--method {name} is a dense (segmentation) method: run it on --data "
                           f"{' or '.join(DENSE_DATASETS)} with segmentation models (e.g. --student segnet_small "
                           f"--teacher segnet)")
        if dense and name not in DENSE:
            raise CliError(f"--method {name} is a classification method; on --data {args.data} use a dense method "
                           f"({', '.join(DENSE)}) or ce")
    needing = [m for m in names if m not in TEACHER_FREE]
    if needing and not args.teacher:
        raise CliError(f"--method {','.join(needing)} needs a --teacher")
    alone = [m for m in names if m in ALONE]
    if len(names) > 1 and alone:
        raise CliError(f"--method {','.join(names)}: {', '.join(alone)} run alone (their own stages, teachers or "
                       f"students), not in a comma list")
    if args.assistant not in MODELS:
        raise CliError(f"--assistant: unknown model {args.assistant!r}; available: {', '.join(MODELS)}")
    return names


def _cross_entropy_alone_options(args) -> None:
    bad = [name for name, _ in args.weight if name != "ce"]
    if bad:
        raise CliError(f"--weight: no term named {', '.join(map(repr, bad))} in this run (terms: ce)")
    if args.option or args.temperature is not None:
        raise CliError("--option/--temperature: cross-entropy alone has no method options")


def _overrides(names, args) -> dict:
    """{method: loss options}: SMALL_DATA's on kdfast's small data sets (unless --paper-defaults), then --option's
    (and --temperature) for every method whose registry entry has that option."""
    small = args.data in LOCAL_DATASETS and not args.paper_defaults
    overrides = {n: dict(SMALL_DATA.get(n, {})) if small else {} for n in names}
    given = dict(args.option)
    if args.temperature is not None:
        given["temperature"] = args.temperature
    for key, value in given.items():
        takers = [n for n in names if key in REGISTRY[n].options]
        if not takers:
            raise CliError(f"--option {key}: no method of this run has it (options: "
                           f"{'; '.join(f'{n}: ' + (', '.join(REGISTRY[n].options) or 'none') for n in names)})")
        for n in takers:
            overrides[n][key] = value
    return overrides


def _train_teacher(teacher, name, args, data, stage, common, say):
    say(f"training the {name} {args.teacher} first ({args.teacher_epochs} epochs, all labels)")
    t_trainer = Trainer(Distiller(teacher), data.train, [stage(args.teacher_epochs, name)], data.test,
                        out_dir=os.path.join(args.out, name.replace(" ", "_")), resume=args.resume, **common)
    for note in t_trainer.notes:
        say(note)
    t_trainer.fit()
    say(f"{name}: {json.dumps(t_trainer.evaluate(data.test, calibrate=False))}")


def _recipe_run(names, overrides, student, teacher, train, args, data, stage, common, say):
    """(distiller, stages, training split) of the recipe of registry methods `names`; ensembles train
    --ensemble - 1 more teachers, TAKD its assistant, first."""
    teachers = [teacher] if teacher is not None else []
    if any(name in NEEDS_ENSEMBLE for name in names):
        for k in range(1, args.ensemble):
            seed_everything(args.seed + 100 + k)
            teachers.append(build_model(args.teacher, data.num_classes, data.in_channels))
            _train_teacher(teachers[-1], f"teacher {k + 1}", args, data, stage, common, say)
    assistant = MODELS[args.assistant]
    built = [student]  # the first student is the one built (and seeded) by the caller; peers are fresh

    def fresh_student():
        return built.pop() if built else build_model(args.student, data.num_classes, data.in_channels)

    setting = Setting(student=fresh_student,
                      train=train, teachers=teachers, epochs=args.epochs, lr=args.lr,
                      assistant=lambda: assistant(data.num_classes, data.in_channels),
                      fit=lambda d, stages, split: Trainer(d, split, stages, **common).fit(),
                      stage_options=dict(lr_schedule=args.lr_schedule, warmup=args.warmup, optimizer=args.optimizer,
                                         weight_decay=args.weight_decay))
    recipe = compose_recipe(names, setting, overrides)
    for term, weight in args.weight:
        if term not in recipe.distiller.weights:
            raise CliError(f"--weight: no term named {term!r} in recipe {','.join(names)} (terms: "
                           f"{', '.join(recipe.distiller.term_names)})")
        recipe.distiller.weights[term] = Constant(weight)
    return recipe.distiller, recipe.stages, recipe.train


def _data_options(args) -> dict:
    """load_dataset's size options, after checking that the models and options fit the data: segmentation models
    and --labelled-fraction on shapes, classifiers and --labels-per-class elsewhere."""
    dense = args.data in DENSE_DATASETS
    fitting = [m for m in MODELS if (m in SEGMENTATION_MODELS) == dense]
    for name in ("student", "teacher"):
        value = getattr(args, name)
        if value is not None and value not in fitting:
            raise CliError(f"--{name} {value} is a {'classifier' if dense else 'segmentation model'}; --data "
                           f"{args.data} needs a {'segmentation model' if dense else 'classifier'}: one of "
                           f"{', '.join(fitting)}")
    if dense and args.labels_per_class:
        raise CliError(f"--labels-per-class is for classification data; on --data {args.data} use "
                       f"--labelled-fraction F")
    if not dense and args.labelled_fraction:
        raise CliError(f"--labelled-fraction is for segmentation data (--data {' or '.join(DENSE_DATASETS)}); on "
                       f"--data {args.data} use --labels-per-class N")
    sizes = {k: getattr(args, f"shapes_{k}") for k in ("train", "test", "size")
             if getattr(args, f"shapes_{k}") is not None}
    if sizes and args.data != "shapes":
        raise CliError(f"{', '.join('--shapes-' + k for k in sizes)}: only for --data shapes, not --data {args.data}")
    return sizes


def run(args) -> dict:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out} is a file; the run needs a folder there")
    if args.data not in LOCAL_DATASETS and not args.data_root:
        raise CliError(f"--data {args.data} needs --data-root DIR (a folder with the python-pickle version of "
                       f"{args.data}; kdfast does not download data)")
    for name in ("student", "teacher"):
        value = getattr(args, name)
        if value is not None and value not in MODELS:
            raise CliError(f"--{name}: unknown model {value!r}; available: {', '.join(MODELS)}")
    if args.amp != "none" and args.amp not in AMP_DTYPES:
        raise CliError(f"--amp must be none, bf16 or fp16, got {args.amp!r}")
    if args.teacher_checkpoint and not args.teacher:
        raise CliError("--teacher-checkpoint needs --teacher (the model the weights belong to)")
    sizes = _data_options(args)
    names = _recipe(args)
    if names is None:
        _cross_entropy_alone_options(args)
    overrides = _overrides(names, args) if names else {}  # checked before any teacher is trained
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a: None)  # one voice under torchrun
    try:
        data = load_dataset(args.data, args.data_root, **sizes)
    except (FileNotFoundError, PickleFileError) as e:
        raise CliError(f"--data-root: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    train = data.train
    if args.labels_per_class:
        train = few_labels(train, args.labels_per_class, args.seed)
    if args.labelled_fraction:
        train = labelled_fraction(train, args.labelled_fraction)
    common = dict(batch_size=args.batch_size, augment=data.augment, seed=args.seed,
                  amp=None if args.amp == "none" else args.amp, grad_clip=args.grad_clip, device=args.device,
                  progress=not args.no_progress)
    def stage(epochs, name):
        return Stage(epochs, name, lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup,
                     optimizer=args.optimizer, weight_decay=args.weight_decay)

    teacher = None
    if args.teacher:
        seed_everything(args.seed)
        teacher = build_model(args.teacher, data.num_classes, data.in_channels)
        if args.teacher_checkpoint:
            try:
                teacher.load_state_dict(load_state_dict_file(args.teacher_checkpoint))
            except CheckpointError as e:
                raise CliError(f"--teacher-checkpoint {e}") from None
            except RuntimeError as e:
                raise CliError(f"--teacher-checkpoint {args.teacher_checkpoint} does not fit --teacher "
                               f"{args.teacher}: {state_dict_mismatch(e)}") from None
        elif names and not all(name in TEACHER_FREE for name in names):
            _train_teacher(teacher, "teacher", args, data, stage, common, say)
    seed_everything(args.seed + 1)
    student = build_model(args.student, data.num_classes, data.in_channels)
    if names:
        distiller, stages, train = _recipe_run(names, overrides, student, teacher, train, args, data, stage, common,
                                               say)
    else:
        distiller = Distiller(student, None, {"ce": (CrossEntropy(), dict(args.weight).get("ce", 1.0))})
        stages = [stage(args.epochs, "student")]
    trainer = Trainer(distiller, train, stages, data.test, out_dir=args.out, resume=args.resume, **common)
    for note in trainer.notes:
        say(note)
    history = trainer.fit()
    metrics = {"test": trainer.evaluate(data.test), "epochs": len(history),
               "train_s": sum(h["time_s"] for h in history)}
    if trainer.rank == 0:  # under torchrun every process holds the same weights; one writes them
        save_checkpoint(deployed(distiller.student).state_dict(), os.path.join(args.out, "student.pt"))
        write_json(metrics, os.path.join(args.out, "metrics.json"))
    return metrics


def list_options(method) -> str:
    names = [m.strip() for m in method.split(",") if m.strip() in REGISTRY] if method else list(REGISTRY)
    lines = []
    for name in names:
        entry = REGISTRY[name]
        lines.append(f"{name} ({entry.source}):")
        lines += [f"  {k} = {v!r}: {entry.options[k]}" for k, v in entry.defaults().items()] or ["  (no options)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list_options:
        print(list_options(args.method))
        return 0
    try:
        metrics = run(args)
    except CliError as e:
        print(f"{p.prog}: error: {e}\n(see {p.prog} --help)", file=sys.stderr)
        return 2
    except CheckpointError as e:  # --resume of a file that is not this run's checkpoint
        print(f"{p.prog}: error: --resume: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a full disk: the system's own one-line reason
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics["test"], indent=1))
    return 0
