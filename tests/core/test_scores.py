"""Tests of core.scores on tiny hand-built models whose logits and gradients are known."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from core.errors import ConfigError
from core.metrics import ood_metrics
from core.scores import SCORES, MahalanobisScorer, OdinScorer, make_scorer

LOGITS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 2.0]])

# Stand-in with the fields of core.datasets.Normalization that the scorers read.
NORMALIZATION = SimpleNamespace(mean=(0.4, 0.5, 0.6), std=(0.5, 0.25, 0.1))


def identity_logits_model() -> nn.Module:
    """A linear layer with identity weights, so the logits equal the inputs."""
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
        layer.bias.zero_()
    return nn.Sequential(layer)


def image_linear_model(seed: int = 0) -> nn.Sequential:
    """Flatten a [N, 3, 2, 2] image and apply a random linear layer with 3 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def test_msp_hand_values():
    scorer = make_scorer("msp", identity_logits_model())

    scores = scorer.score(LOGITS)

    expected = [
        math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)),
        1 / 3,
        math.exp(5) / (math.exp(-1) + math.exp(5) + math.exp(2)),
    ]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_maxlogit_hand_values():
    scorer = make_scorer("maxlogit", identity_logits_model())

    assert scorer.score(LOGITS).tolist() == [3.0, 0.0, 5.0]


def test_energy_hand_values():
    scorer = make_scorer("energy", identity_logits_model())

    scores = scorer.score(LOGITS)

    expected = [
        math.log(math.exp(1) + math.exp(2) + math.exp(3)),
        math.log(3),
        math.log(math.exp(-1) + math.exp(5) + math.exp(2)),
    ]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_energy_temperature():
    scorer = make_scorer("energy", identity_logits_model(), temperature=2.0)

    scores = scorer.score(LOGITS[:1])

    expected = 2.0 * math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert scores.item() == pytest.approx(expected, rel=1e-6)


def test_scores_custom_forward():
    model = identity_logits_model()
    scorer = make_scorer("maxlogit", model, forward=lambda x: 2 * model(x))

    assert scorer.score(LOGITS).tolist() == [6.0, 0.0, 10.0]


def expected_odin(model: nn.Sequential, x: torch.Tensor, temperature: float, epsilon: float):
    """Hand-compute ODIN for a linear model: logits = W x + b."""
    weight = model[1].weight.detach().double().numpy()
    bias = model[1].bias.detach().double().numpy()
    flat = x.double().reshape(len(x), -1).numpy()

    probabilities = softmax_rows((flat @ weight.T + bias) / temperature)
    predicted = probabilities.argmax(axis=1)
    # d/dx log softmax_k(Wx / T) = (W_k - sum_j p_j W_j) / T
    gradient = (weight[predicted] - probabilities @ weight) / temperature

    step = epsilon / np.repeat(np.array(NORMALIZATION.std), 4)
    perturbed = flat + step * np.sign(gradient)
    scores = softmax_rows((perturbed @ weight.T + bias) / temperature).max(axis=1)
    return perturbed.reshape(x.shape), scores


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_odin_perturbation_hand_values(temperature):
    model = image_linear_model()
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    scorer = make_scorer("odin", model, normalization=NORMALIZATION, temperature=temperature)
    expected_inputs, expected_scores = expected_odin(model, x, temperature, 0.0014)

    perturbed = scorer.perturb(x)
    scores = scorer.score(x)

    assert torch.allclose(perturbed.double(), torch.from_numpy(expected_inputs), atol=1e-6)
    assert scores.tolist() == pytest.approx(expected_scores.tolist(), rel=1e-6)


def test_odin_step_per_channel():
    model = image_linear_model()
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    scorer = make_scorer("odin", model, normalization=NORMALIZATION, epsilon=0.01)

    step = (scorer.perturb(x) - x).abs()

    for channel, std in enumerate(NORMALIZATION.std):
        expected = torch.full_like(step[:, channel], 0.01 / std)
        assert torch.allclose(step[:, channel], expected, atol=1e-6), channel


def test_odin_increases_max_softmax():
    model = image_linear_model()
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    scorer = make_scorer("odin", model, normalization=NORMALIZATION, temperature=1.0, epsilon=0.05)

    unperturbed = torch.softmax(model(x), dim=1).max(dim=1).values.detach()
    scores = scorer.score(x)

    assert bool((scores > unperturbed).all())


def test_odin_zero_epsilon_is_temperature_scaling():
    model = image_linear_model()
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    scorer = make_scorer("odin", model, normalization=NORMALIZATION, epsilon=0.0)

    expected = torch.softmax(model(x) / 1000.0, dim=1).max(dim=1).values.detach()

    assert torch.allclose(scorer.score(x), expected)


def test_odin_inside_inference_mode():
    model = image_linear_model()
    scorer = make_scorer("odin", model, normalization=NORMALIZATION)
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    expected = scorer.score(x)

    with torch.inference_mode():
        scores = scorer.score(x.clone())

    assert torch.equal(scores, expected)


def test_odin_defaults():
    scorer = make_scorer("odin", image_linear_model(), normalization=NORMALIZATION)

    assert scorer.temperature == 1000.0
    assert scorer.epsilon == 0.0014


def test_odin_missing_normalization():
    with pytest.raises(ConfigError, match=r"score 'odin' needs normalization=Normalization\(mean, std\)"):
        make_scorer("odin", image_linear_model())


def test_odin_invalid_std():
    normalization = SimpleNamespace(mean=(0.5,), std=(0.0,))

    with pytest.raises(ConfigError, match=r"normalization std \(0.0,\) is invalid"):
        make_scorer("odin", image_linear_model(), normalization=normalization)


def test_odin_channel_mismatch():
    scorer = make_scorer("odin", image_linear_model(), normalization=NORMALIZATION)

    with pytest.raises(ConfigError, match=r"input of shape \(2, 4, 2, 2\) does not match the 3 channel"):
        scorer.score(torch.zeros(2, 4, 2, 2))


def test_odin_forward_without_graph():
    model = image_linear_model()

    def detached_forward(x):
        return model(x).detach()

    scorer = make_scorer("odin", model, forward=detached_forward, normalization=NORMALIZATION)

    with pytest.raises(ConfigError, match="forward\\(x\\) returned logits without a graph"):
        scorer.score(torch.zeros(1, 3, 2, 2))


def head_input_model(in_features: int, num_classes: int) -> nn.Sequential:
    """A model whose last linear layer receives the input unchanged as its features."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def test_mahalanobis_hand_example():
    # Class 0 deviations (+-1, +-1) and class 1 deviations (+-1, 0), (0, +-1) give scatter
    # matrices 4 I and 2 I, so the shared covariance is 6 I / 8 and its inverse 4/3 I.
    class0 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    class1 = torch.tensor([[11.0, 10.0], [9.0, 10.0], [10.0, 11.0], [10.0, 9.0]])
    fit_data = [
        (torch.cat([class0[:2], class1[:1]]), torch.tensor([0, 0, 1])),
        (torch.cat([class0[2:], class1[1:]]), torch.tensor([0, 0, 1, 1, 1])),
    ]
    scorer = make_scorer("mahalanobis", head_input_model(2, 2), fit_data=fit_data)

    scores = scorer.score(torch.tensor([[1.0, 3.0], [7.0, 7.0]]))

    expected_means = torch.tensor([[1.0, 1.0], [10.0, 10.0]], dtype=torch.float64)
    assert torch.allclose(scorer.class_means, expected_means)
    assert torch.allclose(scorer.precision, torch.eye(2, dtype=torch.float64) * 4 / 3)
    # (1, 3): distance^2 to class 0 is (0^2 + 2^2) * 4/3. (7, 7): to class 1 is (3^2 + 3^2) * 4/3.
    assert scores.tolist() == pytest.approx([-16 / 3, -24.0])


def test_mahalanobis_matches_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4)) + 5.0
    labels = rng.integers(0, 3, size=60)  # class 3 of 4 never occurs
    batches = [
        (torch.from_numpy(features[start : start + 25]).float(), torch.from_numpy(labels[start : start + 25]))
        for start in range(0, 60, 25)
    ]
    features = np.concatenate([batch[0].double().numpy() for batch in batches])
    test_points = rng.normal(size=(7, 4)) * 3

    scorer = make_scorer("mahalanobis", head_input_model(4, 4), fit_data=batches)
    scores = scorer.score(torch.from_numpy(test_points).float())

    means = np.stack([features[labels == label].mean(axis=0) for label in range(3)])
    centered = features - means[labels]
    precision = np.linalg.inv(centered.T @ centered / len(features))
    test_points = test_points.astype(np.float32).astype(np.float64)
    differences = test_points[:, None, :] - means[None]
    distances = np.einsum("ncd,de,nce->nc", differences, precision, differences)
    assert scorer.classes.tolist() == [0, 1, 2]
    assert np.allclose(scorer.class_means.numpy(), means)
    assert np.allclose(scores.numpy(), -distances.min(axis=1), rtol=1e-5)


def test_mahalanobis_separates_far_cluster():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=generator) * 3
    labels = torch.arange(3).repeat_interleave(100)
    train = centers[labels] + torch.randn(300, 8, generator=generator)
    id_test = centers[labels] + torch.randn(300, 8, generator=generator)
    ood_test = 20.0 + torch.randn(200, 8, generator=generator)

    scorer = make_scorer("mahalanobis", head_input_model(8, 3), fit_data=[(train, labels)])
    metrics = ood_metrics(scorer.score(id_test), scorer.score(ood_test))

    assert metrics["auroc"] == 1.0
    assert metrics["fpr95"] == 0.0


def test_mahalanobis_singular_covariance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 16, generator=generator)
    fit_data = [(features, torch.tensor([0, 1, 0, 1, 0]))]

    scorer = make_scorer("mahalanobis", head_input_model(16, 2), fit_data=fit_data)
    scores = scorer.score(torch.randn(4, 16, generator=generator))

    assert bool(torch.isfinite(scores).all())
    assert torch.linalg.matrix_rank(scorer.precision).item() == 3


def test_mahalanobis_functional_call_fires_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    params = dict(model.named_parameters())
    params["0.weight"] = 2 * torch.eye(2)
    params["0.bias"] = torch.zeros(2)

    def masked_forward(x):
        return functional_call(model, params, (x,))

    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [2.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])

    scorer = make_scorer("mahalanobis", model, forward=masked_forward, fit_data=[(x, labels)])
    plain = make_scorer("mahalanobis", model, fit_data=[(x, labels)])

    # The features under functional_call are 2 x, so the class means double.
    expected_means = torch.tensor([[4.0, 2.0], [2.0, 6.0]], dtype=torch.float64)
    assert torch.allclose(scorer.class_means, expected_means)
    assert torch.allclose(scorer.features(x), 2 * x.double())
    assert not torch.allclose(plain.class_means, scorer.class_means)
    assert len(model[1]._forward_hooks) == 0


def test_mahalanobis_missing_fit_data():
    with pytest.raises(ConfigError, match="score 'mahalanobis' needs labelled ID training data.*pass fit_data"):
        make_scorer("mahalanobis", head_input_model(2, 2))


def test_mahalanobis_empty_fit_data():
    with pytest.raises(ConfigError, match="fit_data contained no samples"):
        make_scorer("mahalanobis", head_input_model(2, 2), fit_data=[])


def test_mahalanobis_unlabelled_fit_data():
    fit_data = [(torch.zeros(3, 2), torch.tensor([0, -1, -1]))]

    with pytest.raises(ConfigError, match=r"fit_data contains 2 labels outside \[0, 2\), e.g. \[-1\]"):
        make_scorer("mahalanobis", head_input_model(2, 2), fit_data=fit_data)


def test_mahalanobis_label_count_mismatch():
    fit_data = [(torch.zeros(3, 2), torch.tensor([0, 1]))]

    with pytest.raises(ConfigError, match="fit batch has 3 inputs but 2 labels"):
        make_scorer("mahalanobis", head_input_model(2, 2), fit_data=fit_data)


def test_mahalanobis_forward_skips_model():
    model = head_input_model(2, 2)
    other = head_input_model(2, 2)

    with pytest.raises(ConfigError, match="called the last linear layer '1' 0 times, expected exactly once"):
        make_scorer("mahalanobis", model, forward=other, fit_data=[(torch.zeros(2, 2), torch.tensor([0, 1]))])


def test_unknown_score_name():
    with pytest.raises(
        ConfigError, match="unknown score 'gram': choose one of msp, maxlogit, energy, odin, mahalanobis"
    ):
        make_scorer("gram", identity_logits_model())


def test_unknown_score_option():
    with pytest.raises(ConfigError, match="score 'msp' has no option 'temperature': accepted options are none"):
        make_scorer("msp", identity_logits_model(), temperature=2.0)


def test_odin_unknown_option():
    with pytest.raises(ConfigError, match="has no option 'eps': accepted options are temperature, epsilon"):
        make_scorer("odin", identity_logits_model(), normalization=NORMALIZATION, eps=0.1)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), "1"])
def test_energy_invalid_temperature(temperature):
    with pytest.raises(ConfigError, match="score 'energy': temperature=.* is invalid: pass a positive finite"):
        make_scorer("energy", identity_logits_model(), temperature=temperature)


def test_odin_negative_epsilon():
    with pytest.raises(ConfigError, match=r"score 'odin': epsilon=-0.1 is invalid: pass a finite number >= 0"):
        make_scorer("odin", image_linear_model(), normalization=NORMALIZATION, epsilon=-0.1)


def test_scores_reject_non_logit_output():
    scorer = make_scorer("msp", identity_logits_model(), forward=lambda x: x.sum(dim=1))

    with pytest.raises(ConfigError, match=r"forward\(x\) returned \(3,\) for 3 inputs, expected logits"):
        scorer.score(LOGITS)


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("name", list(SCORES))
def test_registry_scores_shape_finite(name):
    model = conv_model().eval()
    generator = torch.Generator().manual_seed(0)
    fit_data = [(torch.randn(16, 3, 8, 8, generator=generator), torch.arange(16) % 3) for _ in range(2)]
    x = torch.randn(5, 3, 8, 8, generator=generator)

    scorer = make_scorer(name, model, normalization=NORMALIZATION, fit_data=fit_data)
    scores = scorer.score(x)

    assert scores.shape == (5,)
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    assert bool(torch.isfinite(scores).all())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not model.training


@pytest.mark.parametrize("name", list(SCORES))
def test_registry_keeps_train_mode(name):
    model = conv_model().train()
    fit_data = [(torch.randn(6, 3, 8, 8), torch.arange(6) % 3)]

    scorer = make_scorer(name, model, normalization=NORMALIZATION, fit_data=fit_data)
    scorer.score(torch.randn(2, 3, 8, 8))

    assert model.training


def test_registry_specs_flags():
    assert [name for name, spec in SCORES.items() if spec.needs_fit_data] == ["mahalanobis"]
    assert [name for name, spec in SCORES.items() if spec.needs_normalization] == ["odin"]


def test_mahalanobis_is_registered_class():
    model = head_input_model(2, 2)
    fit_data = [(torch.eye(2), torch.tensor([0, 1]))]

    assert isinstance(make_scorer("mahalanobis", model, fit_data=fit_data), MahalanobisScorer)
    assert isinstance(make_scorer("odin", model, normalization=NORMALIZATION), OdinScorer)
