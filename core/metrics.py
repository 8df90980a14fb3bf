"""Threshold-free OOD detection metrics and the threshold at a target true positive rate.

The in-distribution (ID) set is the positive class, and a higher score means "more ID". The
definitions follow scikit-learn's ``roc_curve``, ``roc_auc_score`` and
``average_precision_score``, which the tests compare against (scikit-learn 1.9). The thresholds
are the distinct score values, so tied scores move the ROC curve diagonally and a constant score
has an AUROC of 0.5. Average precision is the step-wise sum without interpolation.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from core.errors import ConfigError

logger = logging.getLogger(__name__)

ScoreArray = np.ndarray | torch.Tensor | Sequence[float]

_MAX_LISTED_INDICES = 10


def ood_metrics(id_scores: ScoreArray, ood_scores: ScoreArray) -> dict[str, float]:
    """Compute AUROC, AUPR-In, AUPR-Out and FPR at 95 % TPR, all as fractions in [0, 1].

    Args:
        id_scores: 1-D scores of the in-distribution test set.
        ood_scores: 1-D scores of the out-of-distribution test set.

    Returns:
        ``auroc``: area under the ROC curve with ID as the positive class. ``aupr_in``:
        average precision with ID positive. ``aupr_out``: average precision with OOD positive
        and negated scores. ``fpr95``: fraction of OOD scores at or above
        ``threshold_at_tpr(id_scores, 0.95)``.

    Raises:
        ConfigError: a set is empty, not 1-D, or contains NaN or infinite scores.
    """
    id_array = _as_scores(id_scores, "id_scores")
    ood_array = _as_scores(ood_scores, "ood_scores")

    auroc = _auroc(id_array, ood_array)
    aupr_in = _average_precision(id_array, ood_array)
    aupr_out = _average_precision(-ood_array, -id_array)
    threshold = _threshold_at_tpr(id_array, 0.95)
    fpr95 = float(np.mean(ood_array >= threshold))

    return {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr95}


def threshold_at_tpr(id_scores: ScoreArray, tpr: float = 0.95) -> float:
    """Return the highest threshold that accepts at least a ``tpr`` fraction of the ID scores.

    A score equal to the threshold counts as accepted (ID), so the threshold is always one of
    the ID scores: the k-th largest, where k = ceil(tpr * N) is computed with exact decimal
    arithmetic (0.95 * 20 gives 19, not 20).

    Args:
        id_scores: 1-D scores of in-distribution samples, usually a held-out ID set.
        tpr: target true positive rate in (0, 1].

    Raises:
        ConfigError: ``tpr`` is outside (0, 1], or the scores are empty, not 1-D or not finite.
    """
    if isinstance(tpr, bool) or not isinstance(tpr, numbers.Real) or not 0 < tpr <= 1:
        raise ConfigError(f"tpr={tpr!r} is invalid: pass a true positive rate in (0, 1], e.g. 0.95")
    return _threshold_at_tpr(_as_scores(id_scores, "id_scores"), tpr)


def _threshold_at_tpr(id_array: np.ndarray, tpr: float) -> float:
    # Fraction(repr(0.95)) is exactly 19/20, whereas the float product 0.95 * n can land
    # just above an integer and make ceil() pick one sample too many.
    accepted = math.ceil(Fraction(repr(float(tpr))) * id_array.size)
    accepted = max(accepted, 1)
    descending = np.sort(id_array)[::-1]
    return float(descending[accepted - 1])


def _as_scores(scores: ScoreArray, set_name: str) -> np.ndarray:
    """Convert scores to a finite 1-D float64 array, raising ConfigError that names the set."""
    if isinstance(scores, torch.Tensor):
        array = scores.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            array = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"{set_name} cannot be converted to a float array ({error}): "
                "pass a 1-D numpy array, list of numbers or torch tensor"
            ) from error

    if array.ndim != 1:
        raise ConfigError(
            f"{set_name} has shape {tuple(array.shape)}, expected a 1-D array of scores: "
            "pass one score per sample"
        )
    if array.size == 0:
        raise ConfigError(f"{set_name} is empty: pass at least one score per set")

    non_finite = np.flatnonzero(~np.isfinite(array))
    if non_finite.size:
        nan_count = int(np.isnan(array).sum())
        inf_count = int(non_finite.size - nan_count)
        listed = ", ".join(str(i) for i in non_finite[:_MAX_LISTED_INDICES])
        if non_finite.size > _MAX_LISTED_INDICES:
            listed += ", ..."
        raise ConfigError(
            f"{set_name} contains {non_finite.size} non-finite of {array.size} scores "
            f"({nan_count} NaN, {inf_count} infinite) at indices [{listed}]: "
            "check the model and checkpoint for overflow or diverged weights, "
            "or lower the score temperature"
        )
    return array


def _cumulative_counts(
    positive: np.ndarray, negative: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Count the positives and negatives at or above each distinct score, highest first.

    Returns:
        True positives and false positives per threshold, where the thresholds are the
        distinct values of both sets in descending order.
    """
    scores = np.concatenate([positive, negative])
    labels = np.concatenate([np.ones(positive.size), np.zeros(negative.size)])

    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    labels = labels[order]

    # Index of the last sample of each group of tied scores.
    group_ends = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
    true_positives = np.cumsum(labels)[group_ends]
    false_positives = group_ends + 1 - true_positives
    return true_positives, false_positives


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    true_positives, false_positives = _cumulative_counts(positive, negative)
    tpr = np.concatenate([[0.0], true_positives / positive.size])
    fpr = np.concatenate([[0.0], false_positives / negative.size])
    return float(np.trapezoid(tpr, fpr))


def _average_precision(positive: np.ndarray, negative: np.ndarray) -> float:
    """Average precision: sum over thresholds of (R_k - R_{k-1}) * P_k, with R_0 = 0."""
    true_positives, false_positives = _cumulative_counts(positive, negative)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positive.size
    recall_steps = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_steps * precision))
