"""ID accuracy and the OOD metric table of one model (or masked model) over several OOD sets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from core.datasets import ImageSet, Normalization, iterate_batches
from core.metrics import ood_metrics
from core.scores import make_scorer

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]

# Synthetic sets that a detector usually separates completely or not at all. Averages are also
# reported without them, so that they do not hide a change on the real sets.
NOISE_SETS = ("builtin:gaussian-noise", "builtin:uniform-noise")
METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr95")


def is_noise_set(reference: str) -> bool:
    """Return whether a dataset reference names one of the synthetic noise sets."""
    return reference.split("?", 1)[0] in NOISE_SETS


@torch.no_grad()
def accuracy(forward: Forward, data: ImageSet, normalization: Normalization, batch_size: int, device: str) -> float:
    """Return the top-1 accuracy of `forward` on a labelled set."""
    correct = 0
    for inputs, labels in iterate_batches(data, normalization, batch_size, device=device):
        correct += int((forward(inputs).argmax(dim=1) == labels).sum())
    return correct / len(data.labels)


def compute_scores(
    scorer, data: ImageSet, normalization: Normalization, batch_size: int, device: str
) -> np.ndarray:
    """Score every image of `data`; higher means more in-distribution."""
    chunks = []
    for inputs, _ in iterate_batches(data, normalization, batch_size, device=device):
        chunks.append(scorer.score(inputs).detach().cpu().numpy())
    return np.concatenate(chunks)


def average_metrics(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Return the mean of each metric over the sets in `per_set` (empty when there are none)."""
    if not per_set:
        return {}
    return {name: float(np.mean([metrics[name] for metrics in per_set.values()])) for name in METRIC_NAMES}


def score_table(
    model: nn.Module,
    forward: Forward,
    id_data: ImageSet,
    ood_sets: Mapping[str, ImageSet],
    score_names: Sequence[str],
    normalization: Normalization,
    *,
    fit_data: ImageSet | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, dict]:
    """Compute the OOD metrics of every score on every OOD set, plus the averages.

    Args:
        model: the network whose layers `forward` runs; scores that read features hook into it.
        forward: maps normalised inputs to logits (the masked model for UMAP).
        id_data: in-distribution images, the positive class.
        ood_sets: OOD images by reference.
        score_names: names from `core.scores.SCORES`.
        normalization: the mean and std that the model was trained with.
        fit_data: labelled ID training images for scores that need fitting (Mahalanobis).

    Returns:
        `{score: {"sets": {reference: metrics}, "average": metrics, "average_real": metrics}}`,
        where `average_real` leaves out the synthetic noise sets.
    """
    table = {}
    for name in score_names:
        fit_batches = None
        if fit_data is not None:
            fit_batches = iterate_batches(fit_data, normalization, batch_size, device=device)
        scorer = make_scorer(name, model, forward=forward, normalization=normalization, fit_data=fit_batches)
        id_scores = compute_scores(scorer, id_data, normalization, batch_size, device)

        per_set = {}
        for reference, ood_data in ood_sets.items():
            ood_scores = compute_scores(scorer, ood_data, normalization, batch_size, device)
            per_set[reference] = ood_metrics(id_scores, ood_scores)
        real = {reference: metrics for reference, metrics in per_set.items() if not is_noise_set(reference)}
        table[name] = {"sets": per_set, "average": average_metrics(per_set), "average_real": average_metrics(real)}
    return table


def validation_metrics(
    model: nn.Module,
    forward: Forward,
    id_holdout: ImageSet,
    val_ood_sets: Mapping[str, ImageSet],
    score_name: str,
    normalization: Normalization,
    *,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, float]:
    """Return the metrics of one score averaged over the validation OOD sets."""
    table = score_table(
        model, forward, id_holdout, val_ood_sets, [score_name], normalization, batch_size=batch_size, device=device
    )
    return table[score_name]["average"]
