"""Loss-constraint estimation, UM fine-tuning, UMAP mask learning and baseline training.

Unleashing Mask (Zhu et al., "Unleashing Mask: Explore the Intrinsic Out-of-Distribution Detection
Capability", ICML 2023) starts from a trained classifier and trains with the loss

    L = |CE - c| + c

where CE is the mean cross-entropy of a training batch and c the loss constraint. Above c this is
plain cross-entropy. Below c its gradient is reversed, so the model stops fitting the atypical
training samples it had memorised. The paper reports that this improves OOD detection.

c is the mean cross-entropy, in eval mode, of the model with a random `1 - mask_ratio` share of
every conv and linear weight zeroed (`estimate_loss_constraint`). During UM and UMAP the batch
cross-entropy is computed in training mode (batch-norm layers normalise with batch statistics,
dropout is active), which is how the loss is compared with c.

UM fine-tunes the weights. UMAP freezes them and learns a binary mask that keeps `prune_rate` of
each layer (see `core.masks.ScoreMasks`); the mask is then used only for OOD scoring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from core.datasets import ImageSet, Normalization, iterate_batches
from core.errors import ConfigError
from core.masks import (
    Masks,
    ScoreMasks,
    flipped_fraction,
    masked_forward,
    random_masks,
    recalibrate_batch_norm,
)

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
# Returns the validation metrics of a forward function: at least "fpr95" and "auroc".
Validator = Callable[[Forward], dict[str, float]]


def constrained_loss(cross_entropy: torch.Tensor, loss_constraint: float) -> torch.Tensor:
    """Return `|CE - c| + c`: cross-entropy above c, reversed (gradient ascent) below it."""
    return (cross_entropy - loss_constraint).abs() + loss_constraint


# --------------------------------------------------------------------------------------------
# Loss estimation


@dataclass
class ConstraintEstimate:
    """The cross-entropy and accuracy of randomly masked copies of a model at one kept fraction."""

    mask_ratio: float
    losses: list[float]
    accuracies: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def std(self) -> float:
        return float(np.std(self.losses))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.accuracies))

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std, "accuracy": self.accuracy}


@torch.no_grad()
def estimate_loss_constraint(
    model: nn.Module,
    data: ImageSet,
    normalization: Normalization,
    mask_ratios: list[float],
    *,
    draws: int = 3,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    on_draw: Callable[[int, int], None] | None = None,
) -> list[ConstraintEstimate]:
    """Estimate the loss constraint c for each kept fraction `mask_ratio`.

    For each ratio, `draws` random masks are drawn, because one draw can be off by a factor of
    two on a small model. Each masked model is evaluated in eval mode over all of `data`.

    Args:
        on_draw: called with (draws done, draws in all) after each masked evaluation.
    """
    if draws < 1:
        raise ConfigError(f"draws={draws} is invalid: at least one random mask is needed.")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    estimates = []
    total = draws * len(mask_ratios)
    try:
        for ratio in mask_ratios:
            estimate = ConstraintEstimate(mask_ratio=ratio, losses=[], accuracies=[])
            for _ in range(draws):
                forward = masked_forward(model, random_masks(model, ratio, generator))
                loss_sum = 0.0
                correct = 0
                for inputs, labels in iterate_batches(data, normalization, batch_size, device=device):
                    logits = forward(inputs)
                    loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == labels).sum())
                estimate.losses.append(loss_sum / len(data.labels))
                estimate.accuracies.append(correct / len(data.labels))
                if on_draw:
                    on_draw(len(estimates) * draws + len(estimate.losses), total)
            logger.info(
                "mask_ratio %.4f: c = %.4f +- %.4f, masked accuracy %.4f",
                ratio, estimate.mean, estimate.std, estimate.accuracy,
            )
            estimates.append(estimate)
    finally:
        model.train(was_training)
    return estimates


# --------------------------------------------------------------------------------------------
# Training loop shared by baseline training, UM and UMAP


@dataclass
class StepReport:
    """Progress of one optimiser step, passed to the caller's callback."""

    method: str
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps_per_epoch: int
    loss: float
    cross_entropy: float
    loss_constraint: float | None
    ascent_share: float  # share of this epoch's steps so far with CE below c
    flipped: float | None = None  # UMAP: share of mask entries flipped since the start


@dataclass
class EpochRecord:
    """Summary of one finished epoch."""

    epoch: int
    loss: float
    cross_entropy: float
    ascent_share: float
    flipped: float | None = None
    validation_fpr95: float | None = None
    validation_auroc: float | None = None

    def selection_key(self) -> tuple[float, float]:
        """Order epochs by validation FPR95, then by higher AUROC where FPR95 ties."""
        return (self.validation_fpr95, -self.validation_auroc)


@dataclass
class HardeningResult:
    """Outcome of UM, UMAP or the fine-tuning control.

    UM and the control set `state_dict`, the weights of the selected epoch. UMAP sets `masks`
    and `buffers`, the mask and batch-norm statistics of the selected epoch.
    """

    method: str
    loss_constraint: float | None
    selected_epoch: int
    history: list[EpochRecord]
    original_validation_fpr95: float | None
    original_validation_auroc: float | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    masks: Masks | None = None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped_early: bool = False

    @property
    def selected(self) -> EpochRecord | None:
        return next((record for record in self.history if record.epoch == self.selected_epoch), None)

    @property
    def beats_original(self) -> bool | None:
        """Whether the selected epoch has a lower validation FPR95 than the original model."""
        selected = self.selected
        if self.original_validation_fpr95 is None or selected is None or selected.validation_fpr95 is None:
            return None
        original = (self.original_validation_fpr95, -self.original_validation_auroc)
        return selected.selection_key() < original

    def summary(self) -> str:
        """Describe the selection outcome in one sentence, plainly when hardening did not help."""
        selected = self.selected
        if self.beats_original is None:
            return (
                f"No validation OOD set was given, so epoch {self.selected_epoch} (the last) was kept "
                "without checking that it detects OOD inputs better than the original model."
            )
        if self.beats_original:
            return (
                f"Epoch {self.selected_epoch} was selected: validation FPR95 {selected.validation_fpr95:.4f} "
                f"(AUROC {selected.validation_auroc:.4f}) against {self.original_validation_fpr95:.4f} "
                f"(AUROC {self.original_validation_auroc:.4f}) for the original model."
            )
        return (
            f"Hardening did not help on validation data: the best epoch ({self.selected_epoch}) has validation "
            f"FPR95 {selected.validation_fpr95:.4f} (AUROC {selected.validation_auroc:.4f}), no better than the "
            f"original model's {self.original_validation_fpr95:.4f} (AUROC {self.original_validation_auroc:.4f}). "
            "Keep using the original model for OOD detection."
        )


@dataclass
class TrainingControl:
    """Callbacks of a training run.

    Attributes:
        on_step: called after every optimiser step.
        on_epoch: called after every epoch, with the record and the forward of that epoch's model.
        should_stop: polled after every step; when it returns True the run stops and returns the
            best epoch finished so far (`HardeningResult.stopped_early`).
    """

    on_step: Callable[[StepReport], None] | None = None
    on_epoch: Callable[[EpochRecord], None] | None = None
    should_stop: Callable[[], bool] | None = None


def _batches(data: ImageSet, normalization: Normalization, batch_size: int, seed: int, epoch: int, device: str):
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return iterate_batches(data, normalization, batch_size, shuffle=True, generator=generator, device=device)


def _steps_per_epoch(data: ImageSet, batch_size: int) -> int:
    return math.ceil(len(data.labels) / batch_size)


def _cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def _validate_epochs(epochs: int) -> None:
    if epochs < 1:
        raise ConfigError(f"epochs={epochs} is invalid: train for at least one epoch.")


# --------------------------------------------------------------------------------------------
# Single optimiser steps (the benchmark times these same functions)


def _fused(device: str) -> bool:
    # PyTorch has fused (single-kernel) Adam and SGD updates for CPU and CUDA tensors.
    return torch.device(device).type in ("cpu", "cuda")


def fine_tune_optimizer(model: nn.Module, lr: float, device: str = "cpu") -> torch.optim.Optimizer:
    """Return the optimiser of UM and the control: SGD, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=_fused(device))


def mask_optimizer(scores: ScoreMasks, lr: float, device: str = "cpu") -> torch.optim.Optimizer:
    """Return the optimiser of the UMAP scores: Adam (see `ScoreMasks` for why)."""
    return torch.optim.Adam(scores.parameters(), lr=lr, fused=_fused(device))


def fine_tune_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_constraint: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one UM step (or a plain cross-entropy step when `loss_constraint` is None).

    Returns:
        The loss and the batch cross-entropy, both detached.
    """
    cross_entropy = F.cross_entropy(model(inputs), labels)
    loss = cross_entropy if loss_constraint is None else constrained_loss(cross_entropy, loss_constraint)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), cross_entropy.detach()


def umap_step(
    model: nn.Module,
    scores: ScoreMasks,
    buffers: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_constraint: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one UMAP step on the mask scores; each layer's threshold is found once, here.

    Args:
        buffers: batch-norm buffers that the forward pass may update (a scratch copy).
    """
    replaced = scores.masked_weights(model)
    replaced.update(buffers)
    cross_entropy = F.cross_entropy(functional_call(model, replaced, (inputs,)), labels)
    loss = constrained_loss(cross_entropy, loss_constraint)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), cross_entropy.detach()


# --------------------------------------------------------------------------------------------
# UM and the plain fine-tuning control


def fine_tune(
    model: nn.Module,
    data: ImageSet,
    normalization: Normalization,
    *,
    loss_constraint: float | None,
    epochs: int,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    validate: Validator | None = None,
    control: TrainingControl | None = None,
    state_path: Path | None = None,
) -> HardeningResult:
    """Run UM (with `loss_constraint`) or plain cross-entropy fine-tuning (with None).

    SGD with momentum 0.9, weight decay 5e-4 and a cosine schedule over all steps. When
    `validate` is given, each epoch is scored on validation data and the epoch with the lowest
    validation FPR95 is kept. Without it, the last epoch is kept. `model` ends with the selected
    weights loaded.

    Args:
        state_path: where the training state is saved after every epoch; a run started with an
            existing file resumes after the last epoch it recorded.
    """
    _validate_epochs(epochs)
    control = control or TrainingControl()
    method = "um" if loss_constraint is not None else "finetune"

    optimizer = fine_tune_optimizer(model, lr, device)
    steps_per_epoch = _steps_per_epoch(data, batch_size)
    scheduler = _cosine(optimizer, epochs * steps_per_epoch)

    history: list[EpochRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_key = (math.inf, math.inf)
    start_epoch = 1
    resumed = load_training_state(state_path)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        history = [EpochRecord(**row) for row in resumed["history"]]
        best_state, best_key, original = resumed["best_state"], tuple(resumed["best_key"]), resumed["original"]
        start_epoch = resumed["epoch"] + 1
    else:
        original = _evaluate(model, validate, lambda inputs: model(inputs))

    stopped = False
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        totals = _EpochTotals()
        for step, (inputs, labels) in enumerate(_batches(data, normalization, batch_size, seed, epoch, device), 1):
            loss, cross_entropy = fine_tune_step(model, optimizer, inputs, labels, loss_constraint)
            scheduler.step()

            totals.add(loss, cross_entropy, loss_constraint)
            if control.on_step:
                control.on_step(totals.report(method, epoch, epochs, step, steps_per_epoch, loss_constraint))
            if control.should_stop and control.should_stop():
                stopped = True
                break
        if stopped and history:
            break

        record = totals.record(epoch)
        _store_validation(record, _evaluate(model, validate, lambda inputs: model(inputs)))
        history.append(record)
        if control.on_epoch:
            control.on_epoch(record)
        if validate is None or record.selection_key() < best_key:
            best_key = record.selection_key() if validate else best_key
            best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        save_training_state(state_path, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": [asdict(row) for row in history],
            "best_state": best_state, "best_key": list(best_key), "original": original,
        })
        if stopped:
            break

    model.load_state_dict(best_state)
    model.eval()
    selected = _selected_epoch(history, validate)
    return HardeningResult(
        method=method,
        loss_constraint=loss_constraint,
        selected_epoch=selected,
        history=history,
        original_validation_fpr95=original["fpr95"] if original else None,
        original_validation_auroc=original["auroc"] if original else None,
        state_dict=best_state,
        stopped_early=stopped,
    )


# --------------------------------------------------------------------------------------------
# UMAP


def learn_mask(
    model: nn.Module,
    data: ImageSet,
    normalization: Normalization,
    *,
    loss_constraint: float,
    prune_rate: float,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    recalibration_batches: int = 50,
    validate: Validator | None = None,
    control: TrainingControl | None = None,
    state_path: Path | None = None,
) -> HardeningResult:
    """Learn a UMAP mask over the frozen weights of `model` with the loss `|CE - c| + c`.

    The scores are trained with Adam (see `ScoreMasks` for why) and a cosine schedule. Batch
    statistics drive the batch-norm layers during training. After every epoch the running
    statistics are re-estimated under that epoch's mask from `recalibration_batches` training
    batches, and the selected mask ships with those statistics.

    The weights and buffers of `model` are not changed. `state_path` works as in `fine_tune`.
    """
    _validate_epochs(epochs)
    control = control or TrainingControl()
    # Frozen weights need no gradient; the flags are restored when the run ends.
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()

    scores = ScoreMasks(model, prune_rate).to(device)
    initial_masks = scores.hard_masks()
    optimizer = mask_optimizer(scores, lr, device)
    steps_per_epoch = _steps_per_epoch(data, batch_size)
    scheduler = _cosine(optimizer, epochs * steps_per_epoch)

    history: list[EpochRecord] = []
    best: tuple[Masks, dict[str, torch.Tensor]] | None = None
    best_key = (math.inf, math.inf)
    start_epoch = 1
    resumed = load_training_state(state_path)
    if resumed is not None:
        scores.load_state_dict(resumed["scores"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        history = [EpochRecord(**row) for row in resumed["history"]]
        best = (resumed["best_masks"], resumed["best_buffers"])
        best_key, original = tuple(resumed["best_key"]), resumed["original"]
        start_epoch = resumed["epoch"] + 1
    else:
        original = _evaluate(model, validate, lambda inputs: model(inputs))

    stopped = False
    try:
        for epoch in range(start_epoch, epochs + 1):
            # Batch-norm layers see batch statistics; their running averages go into a scratch
            # copy so that the original model's statistics stay untouched.
            model.train()
            scratch = _scratch_buffers(model)
            totals = _EpochTotals()
            batches = _batches(data, normalization, batch_size, seed, epoch, device)
            for step, (inputs, labels) in enumerate(batches, 1):
                loss, cross_entropy = umap_step(model, scores, scratch, optimizer, inputs, labels, loss_constraint)
                scheduler.step()

                totals.add(loss, cross_entropy, loss_constraint)
                if control.on_step:
                    report = totals.report("umap", epoch, epochs, step, steps_per_epoch, loss_constraint)
                    if step == steps_per_epoch or step % 20 == 0:
                        report.flipped = flipped_fraction(initial_masks, scores.hard_masks())
                    control.on_step(report)
                if control.should_stop and control.should_stop():
                    stopped = True
                    break
            if stopped and history:
                break

            model.eval()
            masks = scores.hard_masks()
            buffers = recalibrate_batch_norm(
                model, masks, _first_inputs(data, normalization, batch_size, seed, device, recalibration_batches)
            )
            record = totals.record(epoch)
            record.flipped = flipped_fraction(initial_masks, masks)
            _store_validation(record, _evaluate(model, validate, masked_forward(model, masks, buffers)))
            history.append(record)
            logger.info("UMAP epoch %d: %.2f %% of the mask flipped since the start", epoch, 100 * record.flipped)
            if control.on_epoch:
                control.on_epoch(record)
            if validate is None or record.selection_key() < best_key:
                best_key = record.selection_key() if validate else best_key
                best = (masks, buffers)
            save_training_state(state_path, {
                "epoch": epoch, "scores": scores.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": [asdict(row) for row in history],
                "best_masks": best[0], "best_buffers": best[1], "best_key": list(best_key), "original": original,
            })
            if stopped:
                break
    finally:
        model.eval()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])

    masks, buffers = best
    return HardeningResult(
        method="umap",
        loss_constraint=loss_constraint,
        selected_epoch=_selected_epoch(history, validate),
        history=history,
        original_validation_fpr95=original["fpr95"] if original else None,
        original_validation_auroc=original["auroc"] if original else None,
        masks=masks,
        buffers=buffers,
        stopped_early=stopped,
    )


# --------------------------------------------------------------------------------------------
# Baseline training


def train_classifier(
    model: nn.Module,
    data: ImageSet,
    normalization: Normalization,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    control: TrainingControl | None = None,
) -> list[EpochRecord]:
    """Train a classifier from scratch with SGD (momentum 0.9, weight decay 5e-4, cosine schedule).

    Returns:
        One record per epoch. `control.on_epoch` receives each record as its epoch finishes,
        for example to evaluate OOD detection per epoch.
    """
    _validate_epochs(epochs)
    control = control or TrainingControl()
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = _steps_per_epoch(data, batch_size)
    scheduler = _cosine(optimizer, epochs * steps_per_epoch)

    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        totals = _EpochTotals()
        for step, (inputs, labels) in enumerate(_batches(data, normalization, batch_size, seed, epoch, device), 1):
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals.add(loss.detach(), loss.detach(), None)
            if control.on_step:
                control.on_step(totals.report("train", epoch, epochs, step, steps_per_epoch, None))
        model.eval()
        record = totals.record(epoch)
        history.append(record)
        if control.on_epoch:
            control.on_epoch(record)
        if control.should_stop and control.should_stop():
            break
    model.eval()
    return history


# --------------------------------------------------------------------------------------------
# Helpers


def save_training_state(path: Path | None, state: dict) -> None:
    """Write a resumable training state atomically (nothing happens when `path` is None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_training_state(path: Path | None) -> dict | None:
    """Read a state written by `save_training_state`, or return None when there is none."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file
        logger.warning("Ignoring unreadable training state %s (%s); starting from the first epoch", path, error)
        return None
    logger.info("Resuming from %s after epoch %d", path, state["epoch"])
    return state


class _EpochTotals:
    """Running sums of one epoch's losses and ascent steps."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.cross_entropy = 0.0
        self.ascent_steps = 0
        self.last_loss = 0.0
        self.last_cross_entropy = 0.0

    def add(self, loss: torch.Tensor, cross_entropy: torch.Tensor, loss_constraint: float | None) -> None:
        self.steps += 1
        self.last_loss = float(loss)
        self.last_cross_entropy = float(cross_entropy)
        self.loss += self.last_loss
        self.cross_entropy += self.last_cross_entropy
        if loss_constraint is not None and self.last_cross_entropy < loss_constraint:
            self.ascent_steps += 1

    def report(self, method: str, epoch: int, epochs: int, step: int, steps_per_epoch: int, constraint) -> StepReport:
        return StepReport(
            method=method,
            epoch=epoch,
            epochs=epochs,
            step=step,
            steps_per_epoch=steps_per_epoch,
            loss=self.last_loss,
            cross_entropy=self.last_cross_entropy,
            loss_constraint=constraint,
            ascent_share=self.ascent_steps / self.steps,
        )

    def record(self, epoch: int) -> EpochRecord:
        steps = max(1, self.steps)
        return EpochRecord(
            epoch=epoch,
            loss=self.loss / steps,
            cross_entropy=self.cross_entropy / steps,
            ascent_share=self.ascent_steps / steps,
        )


def _store_validation(record: EpochRecord, metrics: dict[str, float] | None) -> None:
    if metrics is not None:
        record.validation_fpr95 = metrics["fpr95"]
        record.validation_auroc = metrics["auroc"]


def _evaluate(model: nn.Module, validate: Validator | None, forward: Forward) -> dict[str, float] | None:
    if validate is None:
        return None
    was_training = model.training
    model.eval()
    try:
        # No torch.no_grad() here: scores such as ODIN need input gradients and manage it themselves.
        return validate(forward)
    finally:
        model.train(was_training)


def _selected_epoch(history: list[EpochRecord], validate: Validator | None) -> int:
    if validate is None:
        return history[-1].epoch
    return min(history, key=EpochRecord.selection_key).epoch


def _scratch_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def _first_inputs(
    data: ImageSet, normalization: Normalization, batch_size: int, seed: int, device: str, count: int
) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 7)
    batches = iterate_batches(data, normalization, batch_size, shuffle=True, generator=generator, device=device)
    for index, (inputs, _) in enumerate(batches):
        if index >= count:
            return
        yield inputs
