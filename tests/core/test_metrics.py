"""Tests of core.metrics against scikit-learn and hand-worked examples."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from core.errors import ConfigError
from core.metrics import ood_metrics, threshold_at_tpr


def sklearn_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    labels = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    scores = np.concatenate([id_scores, ood_scores])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(labels, scores),
        "aupr_in": average_precision_score(labels, scores),
        "aupr_out": average_precision_score(1 - labels, -scores),
        # FPR at the first ROC point, from the highest threshold down, that reaches 95 % TPR.
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
    }


def random_scores(seed: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(1.0, 1.0, size=int(rng.integers(50, 300)))
    ood_scores = rng.normal(0.0, 1.5, size=int(rng.integers(50, 300)))
    if decimals is not None:
        id_scores = id_scores.round(decimals)
        ood_scores = ood_scores.round(decimals)
    return id_scores, ood_scores


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_metrics_match_sklearn(seed, decimals):
    id_scores, ood_scores = random_scores(seed, decimals)
    expected = sklearn_metrics(id_scores, ood_scores)

    metrics = ood_metrics(id_scores, ood_scores)

    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_metrics_heavy_ties_present():
    id_scores, ood_scores = random_scores(0, 0)
    distinct = np.unique(np.concatenate([id_scores, ood_scores])).size

    assert distinct < 15


def test_metrics_constant_scores():
    metrics = ood_metrics(np.full(30, 0.7), np.full(10, 0.7))

    assert metrics["auroc"] == 0.5
    assert metrics["aupr_in"] == pytest.approx(30 / 40)
    assert metrics["aupr_out"] == pytest.approx(10 / 40)
    assert metrics["fpr95"] == 1.0


def test_metrics_perfect_separation():
    metrics = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0, 2.0, 2.5])

    assert metrics == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_metrics_reversed_separation():
    id_scores = np.array([0.0, 1.0, 2.0])
    ood_scores = np.array([3.0, 4.0, 5.0, 6.0])

    metrics = ood_metrics(id_scores, ood_scores)

    # Every ID score lies below every OOD score: the k-th ID sample is accepted together with
    # all 4 OOD samples, so precision at recall k/3 is k / (k + 4). Likewise, the k-th OOD
    # sample (by negated score) comes after all 3 ID samples.
    assert metrics["auroc"] == 0.0
    assert metrics["aupr_in"] == pytest.approx((1 / 5 + 2 / 6 + 3 / 7) / 3)
    assert metrics["aupr_out"] == pytest.approx((1 / 4 + 2 / 5 + 3 / 6 + 4 / 7) / 4)
    assert metrics["fpr95"] == 1.0


def test_fpr95_hand_example():
    # 20 ID scores: 95 % of 20 is 19, so the threshold is the 19th largest score, 2.0. Three ID
    # scores tie at 2.0 and all count as accepted.
    id_scores = [0.5, 2.0, 2.0, 2.0] + [float(value) for value in range(3, 19)]
    # OOD scores at or above 2.0: the two ties at 2.0, 3.0 and 7.5, so 4 of 10.
    ood_scores = [2.0, 2.0, 1.999, 3.0, 7.5, 0.5, 1.0, -4.0, 0.0, 1.5]

    metrics = ood_metrics(id_scores, ood_scores)

    assert metrics["fpr95"] == pytest.approx(0.4)


def test_threshold_hand_example():
    id_scores = [0.5, 2.0, 2.0, 2.0] + [float(value) for value in range(3, 19)]

    assert threshold_at_tpr(id_scores) == 2.0
    assert threshold_at_tpr(id_scores, tpr=0.8) == 3.0
    assert threshold_at_tpr(id_scores, tpr=1.0) == 0.5
    assert threshold_at_tpr(id_scores, tpr=0.01) == 18.0


def test_threshold_exact_decimal_rank():
    # 0.95 * 20 must give rank 19 (score 2.0), and 0.95 * 40 rank 38 (score 3.0).
    twenty = np.arange(1.0, 21.0)
    forty = np.arange(1.0, 41.0)

    assert threshold_at_tpr(twenty, 0.95) == 2.0
    assert threshold_at_tpr(forty, 0.95) == 3.0


def test_threshold_accepts_target_fraction():
    id_scores, _ = random_scores(3, 1)

    threshold = threshold_at_tpr(id_scores, 0.95)
    higher = id_scores[id_scores > threshold]

    assert np.mean(id_scores >= threshold) >= 0.95
    assert np.mean(id_scores >= higher.min()) < 0.95


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, float("nan"), True, "0.95"])
def test_threshold_invalid_tpr(tpr):
    with pytest.raises(ConfigError, match=r"tpr=.* is invalid: pass a true positive rate in \(0, 1\]"):
        threshold_at_tpr([1.0, 2.0], tpr)


def test_metrics_input_types_agree():
    id_scores, ood_scores = random_scores(1, 1)
    expected = ood_metrics(id_scores, ood_scores)

    from_lists = ood_metrics(id_scores.tolist(), ood_scores.tolist())
    from_tensors = ood_metrics(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))

    assert from_lists == expected
    assert from_tensors == expected


def test_metrics_float32_tensor_input():
    metrics = ood_metrics(torch.tensor([0.9, 0.8], dtype=torch.float32), torch.tensor([0.1]))

    assert metrics["auroc"] == 1.0


def test_metrics_nan_in_id_scores():
    id_scores = [0.1, 0.2, float("nan"), 0.4, 0.5, float("inf")]

    with pytest.raises(
        ConfigError,
        match=r"id_scores contains 2 non-finite of 6 scores \(1 NaN, 1 infinite\) at indices \[2, 5\]",
    ):
        ood_metrics(id_scores, [0.0, 1.0])


def test_metrics_inf_in_ood_scores():
    ood_scores = torch.tensor([float("-inf"), 0.0, float("-inf")])

    with pytest.raises(
        ConfigError,
        match=r"ood_scores contains 2 non-finite of 3 scores \(0 NaN, 2 infinite\) at indices \[0, 2\]",
    ):
        ood_metrics([1.0, 2.0], ood_scores)


def test_metrics_many_nan_indices_truncated():
    with pytest.raises(ConfigError, match=r"at indices \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\]"):
        ood_metrics(np.full(12, np.nan), [1.0])


def test_threshold_nan_scores():
    with pytest.raises(ConfigError, match=r"id_scores contains 1 non-finite of 2 scores"):
        threshold_at_tpr([float("nan"), 1.0])


@pytest.mark.parametrize("set_name", ["id_scores", "ood_scores"])
def test_metrics_empty_set(set_name):
    scores = {"id_scores": [1.0, 2.0], "ood_scores": [0.0]}
    scores[set_name] = []

    with pytest.raises(ConfigError, match=f"{set_name} is empty: pass at least one score per set"):
        ood_metrics(**scores)


def test_metrics_two_dimensional_scores():
    with pytest.raises(ConfigError, match=r"id_scores has shape \(2, 2\), expected a 1-D array"):
        ood_metrics(np.ones((2, 2)), [0.0])


def test_metrics_non_numeric_scores():
    with pytest.raises(ConfigError, match="ood_scores cannot be converted to a float array"):
        ood_metrics([1.0], ["high"])
