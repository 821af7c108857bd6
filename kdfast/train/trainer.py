"""The training loop: stages, optimiser and learning-rate schedule, mixed precision, gradient clipping, seeding,
a tqdm progress bar, per-epoch JSON logs, checkpoint/resume, and DDP (torchrun: gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .calibration import calibration_report
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_dict_mismatch, write_json_lines
from .data import AUGMENTATIONS, UNLABELLED, Loader, Split
from .distiller import Distiller
from .metrics import mean_iou
from .schedules import Schedule, lr_schedule

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
OPTIMIZERS = ("sgd", "adam", "adamw")


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices): model initialisation after this is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed():
    """(rank, world size). Under torchrun (WORLD_SIZE > 1 in the environment) initialises the default process
    group once: nccl when CUDA is available, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Stage:
    """One phase of training (e.g. FitNets' hint stage, then KD). weights: {term name: weight or schedule} of the
    terms active in this stage (None: every term with its default weight); schedules see the epoch since the stage
    began. trainable: prefixes of parameter names of the Distiller ("student.stages.0", "terms.hint") trained in
    this stage (None: all that are not frozen). Each stage gets a fresh optimiser."""
    epochs: int
    name: str = "train"
    weights: dict | None = None
    trainable: tuple | None = None
    lr: float = 0.05
    lr_schedule: str | Schedule = "cosine"
    warmup: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"stage {self.name!r}: epochs must be an int >= 1, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"stage {self.name!r}: lr must be > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"stage {self.name!r}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        self.lr_multiplier = (lr_schedule(self.lr_schedule, self.epochs, self.warmup)
                              if isinstance(self.lr_schedule, str) else self.lr_schedule)


@dataclass
class TrainerConfig:
    batch_size: int = 64
    eval_batch_size: int = 512
    augment: str = "none"
    seed: int = 0
    amp: str | None = None            # None, "bf16" or "fp16" (fp16 uses gradient scaling)
    grad_clip: float | None = None    # max global gradient norm
    out_dir: str | None = None        # checkpoint.pt and log.jsonl go here
    resume: bool = False
    progress: bool = True
    device: str = "cpu"
    holdout: Split | None = None      # for temperature scaling in the final report
    confidence: float = 0.9           # confident-prediction threshold of the final report


class Trainer:
    """Trains a Distiller's student through `stages` on `train` (a data.Split), evaluating on `test` each epoch.

    With out_dir, every epoch ends with a checkpoint (out_dir/checkpoint.pt, written atomically) and a line in
    out_dir/log.jsonl; resume=True continues from the checkpoint, ending with the same weights and metrics as a
    run that was never interrupted (the batch order, augmentation and learning rate are functions of
    (seed, stage, epoch), and the RNG and optimiser states are restored).
    """

    def __init__(self, distiller: Distiller, train: Split, stages, test: Split | None = None, **config):
        self.distiller, self.train_split, self.test_split = distiller, train, test
        self.stages = list(stages) if not isinstance(stages, Stage) else [stages]
        if not self.stages:
            raise ValueError("at least one Stage is needed")
        self.cfg = TrainerConfig(**config)
        if self.cfg.amp is not None and self.cfg.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {sorted(AMP_DTYPES)}, got {self.cfg.amp!r}")
        if self.cfg.grad_clip is not None and not self.cfg.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.cfg.grad_clip!r}")
        if self.cfg.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.cfg.augment!r}")
        names = [n for n, _ in distiller.named_parameters()]
        for stage in self.stages:
            distiller.weights_at(0.0, stage.weights)  # unknown term names fail here, not mid-run
            for prefix in stage.trainable or ():
                if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                    raise ValueError(f"stage {stage.name!r}: trainable prefix {prefix!r} matches no parameter of "
                                     f"the distiller (e.g. {', '.join(names[:3])})")
        self.device = torch.device(self.cfg.device)
        self.rank, self.world = init_distributed()
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))  # one GPU per process
            torch.cuda.set_device(self.device)
        self.distiller.to(self.device)
        self._base_trainable = {n: p.requires_grad for n, p in distiller.named_parameters()}
        self.history: list = []
        self.position = (0, 0)  # (stage index, epochs done in it)
        self.notes: list = []  # what resuming found worth telling the user
        self._optimizer_state = self._scaler_state = self._adversary_state = None
        if self.cfg.resume and self.cfg.out_dir and os.path.exists(self.checkpoint_path):
            self._load(load_checkpoint(self.checkpoint_path))

    # --- checkpoints ---

    @property
    def checkpoint_path(self):
        return os.path.join(self.cfg.out_dir, "checkpoint.pt") if self.cfg.out_dir else None

    def _save(self, optimizer, scaler, adversary):
        if not self.cfg.out_dir or self.rank != 0:
            return
        state = {"distiller": self.distiller.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "adversary": adversary.state_dict() if adversary is not None else None, "position": self.position,
                 "history": self.history, "rng": torch.get_rng_state(), "seed": self.cfg.seed}
        save_checkpoint(state, self.checkpoint_path)
        write_json_lines(self.history, os.path.join(self.cfg.out_dir, "log.jsonl"))

    def _load(self, state):
        path = self.checkpoint_path
        if state["seed"] != self.cfg.seed:
            raise CheckpointError(f"{path} was made with seed {state['seed']}, this run has seed {self.cfg.seed}: a "
                                  f"resumed run must use the same seed")
        try:
            self.distiller.load_state_dict(state["distiller"])
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not fit this run (another model, method or data set?): "
                                  f"{state_dict_mismatch(e)}") from None
        index, done = state["position"]
        if index > len(self.stages):
            raise CheckpointError(f"{path} is at stage {index + 1}, this run has {len(self.stages)}")
        if index < len(self.stages) and done >= self.stages[index].epochs:
            # A run stopped after epoch `done` and resumed asking for fewer epochs: that stage is over.
            stage = self.stages[index]
            self.notes.append(f"{path} already holds {done} epochs of stage {stage.name!r}, which this run trains "
                              f"for {stage.epochs}: nothing more to train in it")
            index, done = index + 1, 0
        self.position, self.history = (index, done), list(state["history"])
        if done > 0:  # mid-stage: continue its optimiser; a stage that starts afresh gets a fresh one, as unresumed
            self._optimizer_state, self._scaler_state = state["optimizer"], state["scaler"]
            self._adversary_state = state.get("adversary")
        torch.set_rng_state(state["rng"])

    # --- one stage ---

    def _active(self, stage: Stage) -> set:
        return set(stage.weights) if stage.weights is not None else set(self.distiller.term_names)

    def _trainable(self, stage: Stage):
        active = self._active(stage)
        # Adversaries (discriminators) are trained by their own optimiser (see _adversary_optimizer), never by the
        # networks' loss.
        adversarial = {id(p) for t in self.distiller.adversaries().values() for p in t.adversary.parameters()}
        params = []
        for name, p in self.distiller.named_parameters():
            keep = self._base_trainable[name]
            if name.startswith("terms."):
                keep = keep and name.split(".")[1] in active
            if stage.trainable is not None:
                keep = keep and any(name == t or name.startswith(t + ".") for t in stage.trainable)
            p.requires_grad_(keep)
            if keep and id(p) not in adversarial:
                params.append(p)
        if not params:
            raise ValueError(f"stage {stage.name!r} has no trainable parameters (trainable={stage.trainable})")
        return params

    @staticmethod
    def _optimizer(stage: Stage, params):
        decay = [p for p in params if p.ndim > 1]
        # Biases and norm scales get no weight decay: shrinking them does not regularise, it only shifts the
        # activations (common practice since Goyal et al. 2017).
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if stage.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, nesterov=stage.nesterov)
        cls = torch.optim.Adam if stage.optimizer == "adam" else torch.optim.AdamW
        return cls(groups, lr=stage.lr)

    def _adversary_optimizer(self, stage: Stage):
        terms = self.distiller.adversaries(self._active(stage)).values()
        groups = [{"params": list(t.adversary.parameters()), **t.adversary_optimizer} for t in terms]
        return torch.optim.Adam(groups) if groups else None

    def fit(self, stop_after: int | None = None) -> list:
        """Trains to the end of the last stage (or for at most `stop_after` epochs in this call, as if
        interrupted there) and returns the history: one dict of metrics per epoch."""
        done = 0
        while self.position[0] < len(self.stages):
            index, start = self.position
            stage = self.stages[index]
            params = self._trainable(stage)
            model = self.distiller
            if self.world > 1:
                model = DistributedDataParallel(self.distiller, device_ids=None if self.device.type == "cpu"
                                                else [self.device])
            optimizer = self._optimizer(stage, params)
            adversary = self._adversary_optimizer(stage)
            scaler = torch.amp.GradScaler(self.device.type) if self.cfg.amp in ("fp16", "float16") else None
            if self._optimizer_state is not None:
                optimizer.load_state_dict(self._optimizer_state)
                if scaler is not None and self._scaler_state is not None:
                    scaler.load_state_dict(self._scaler_state)
                if adversary is not None and self._adversary_state is not None:
                    adversary.load_state_dict(self._adversary_state)
                self._optimizer_state = self._scaler_state = self._adversary_state = None
            loader = Loader(self.train_split, self.cfg.batch_size, shuffle=True, augment=self.cfg.augment,
                            seed=self.cfg.seed * 1009 + index, rank=self.rank, world_size=self.world)
            for epoch in range(start, stage.epochs):
                if stop_after is not None and done >= stop_after:
                    return self.history
                record = self._epoch(model, stage, index, epoch, loader, optimizer, scaler, adversary)
                if self.world > 1:
                    # DDP sends rank 0's buffers at each forward, but the last step's BatchNorm statistics
                    # update is local: share rank 0's so that every rank evaluates and resumes the same model.
                    for buffer in self.distiller.buffers():
                        torch.distributed.broadcast(buffer, 0)
                if self.test_split is not None:
                    record["test"] = self.evaluate(self.test_split, calibrate=False)
                self.history.append(record)
                self.position = (index, epoch + 1) if epoch + 1 < stage.epochs else (index + 1, 0)
                self._save(optimizer, scaler, adversary)
                done += 1
        return self.history

    def _epoch(self, model, stage, index, epoch, loader, optimizer, scaler, adversary) -> dict:
        from tqdm import tqdm
        loader.set_epoch(epoch)
        self.distiller.train()
        amp_dtype = AMP_DTYPES.get(self.cfg.amp)
        sums, seen, correct, labelled, steps = {}, 0, 0, 0, len(loader)
        started = time.perf_counter()
        bar = tqdm(loader, total=steps, leave=False, disable=not self.cfg.progress or self.rank != 0,
                   desc=f"{stage.name} {epoch + 1}/{stage.epochs}")
        lr = stage.lr
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            progress = epoch + step / steps
            lr = stage.lr * float(stage.lr_multiplier(progress))
            for group in optimizer.param_groups:
                group["lr"] = lr
            weights = self.distiller.weights_at(progress, stage.weights)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x, y, weights, progress)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.loss).backward()
                scaler.unscale_(optimizer)
            else:
                out.loss.backward()
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               self.cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if adversary is not None:
                adversary.zero_grad(set_to_none=True)
                adv_loss = sum(t.adversary_loss() for t in self.distiller.adversaries(weights).values())
                adv_loss.backward()
                adversary.step()
                sums["adversary"] = sums.get("adversary", 0.0) + float(adv_loss.detach()) * len(y)
            n = len(y)
            seen += n
            sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) * n
            for name, value in out.parts.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            mask = y != UNLABELLED
            labelled += int(mask.sum())
            correct += int((out.student_logits.argmax(1)[mask] == y[mask]).sum())  # classes: dim 1 (dense too)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
        record = {"stage": stage.name, "stage_index": index, "epoch": epoch + 1,
                  "global_epoch": len(self.history) + 1, "lr": lr,
                  "train": {k: v / max(seen, 1) for k, v in sums.items()},
                  "train_accuracy": correct / labelled if labelled else None,
                  "time_s": time.perf_counter() - started}
        return record

    # --- evaluation ---

    @torch.no_grad()
    def predict(self, split: Split, model: nn.Module | None = None) -> torch.Tensor:
        """The student's (or `model`'s) float32 logits on a split, in eval mode, batch by batch."""
        model = self.distiller.student if model is None else model
        was_training = model.training
        model.eval()
        amp_dtype = AMP_DTYPES.get(self.cfg.amp)
        logits = []
        for x, _ in Loader(split, self.cfg.eval_batch_size):
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits.append(model(x.to(self.device)).float().cpu())
        model.train(was_training)
        return torch.cat(logits) if logits else torch.empty(0)

    def evaluate(self, split: Split, calibrate: bool = True) -> dict:
        """Accuracy and ECE on a split; with calibrate and a holdout split, also temperature scaling and the
        confident-prediction coverage and selective accuracy (see calibration.calibration_report). On dense
        (segmentation) targets the same report over the labelled pixels, its accuracy named pixel_accuracy, and
        the mean IoU over classes ("miou", metrics.mean_iou)."""
        logits = self.predict(split)
        holdout = self.cfg.holdout if calibrate else None
        held = (self.predict(holdout), holdout.targets) if holdout is not None else (None, None)
        if split.targets.dim() == 1:
            return calibration_report(logits, split.targets, *held, threshold=self.cfg.confidence)
        report = calibration_report(*_pixels(logits, split.targets),
                                    *(_pixels(*held) if holdout is not None else held), threshold=self.cfg.confidence)
        miou = mean_iou(logits, split.targets, logits.shape[1], UNLABELLED)
        return {"pixel_accuracy": report.pop("accuracy"), "miou": miou, **report}


def _pixels(logits: torch.Tensor, targets: torch.Tensor):
    """(logits (P, classes), targets (P,)) of the labelled pixels of (B, classes, H, W) logits and (B, H, W)
    targets: each pixel as one classification."""
    logits, targets = logits.movedim(1, -1).flatten(0, -2), targets.flatten()
    keep = targets != UNLABELLED
    return logits[keep], targets[keep]
