"""Post-hoc OOD scores computed from a classifier's logits or penultimate-layer features.

Every score is oriented so that a higher value means "more in-distribution". ``SCORES`` is the
only registry of score names. Build a scorer with ``make_scorer`` and call ``Scorer.score`` on
batches of normalized inputs.

Scorers never change the model's train/eval mode, so put the model in eval mode first:
BatchNorm in train mode makes every score depend on the rest of the batch. Scorers never call
``backward`` and leave the ``.grad`` of model parameters untouched. ODIN computes the gradient
of its loss with respect to the input only, and every other score runs under ``torch.no_grad``.

The optional ``forward`` argument replaces ``model(x)``, for example to run the model with
masked weights through ``torch.func.functional_call(model, params, (x,))``. Mahalanobis reads
its features from a forward hook on the input of ``model``'s last ``nn.Linear``. The hook also
fires inside ``functional_call``, so a masked forward yields the masked network's features.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core.architectures import last_linear
from core.errors import ConfigError

if TYPE_CHECKING:
    from core.datasets import Normalization

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
FitData = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Scorer(ABC):
    """Base class of the OOD scorers: maps a batch of normalized inputs to one score per sample."""

    name: ClassVar[str]

    def __init__(self, forward: Forward) -> None:
        self.forward = forward

    @abstractmethod
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Score a batch of normalized inputs.

        Args:
            x: inputs of shape [N, ...], normalized as the model expects and placed on the
                model's device.

        Returns:
            float32 CPU tensor of shape [N]. Higher means more in-distribution.
        """

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward(x)
        is_tensor = isinstance(logits, torch.Tensor)
        if not is_tensor or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if is_tensor else type(logits).__name__
            raise ConfigError(
                f"score {self.name!r}: forward(x) returned {shape} for {x.shape[0]} inputs, "
                "expected logits of shape [N, num_classes]: pass a forward that returns logits"
            )
        return logits.float()


class MaxSoftmaxScorer(Scorer):
    """Maximum softmax probability (MSP; Hendrycks and Gimpel, ICLR 2017)."""

    name = "msp"

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probabilities = torch.softmax(self._logits(x), dim=1)
            return probabilities.max(dim=1).values.cpu()


class MaxLogitScorer(Scorer):
    """Maximum logit (Hendrycks et al., ICML 2022)."""

    name = "maxlogit"

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._logits(x).max(dim=1).values.cpu()


class EnergyScorer(Scorer):
    """Negative free energy T * logsumexp(logits / T) (Liu et al., NeurIPS 2020)."""

    name = "energy"

    def __init__(self, forward: Forward, *, temperature: float) -> None:
        super().__init__(forward)
        self.temperature = _positive_option(self.name, "temperature", temperature)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self._logits(x)
            energy = self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
            return energy.cpu()


class OdinScorer(Scorer):
    """ODIN: temperature scaling plus input perturbation (Liang et al., ICLR 2018).

    The input moves by ``epsilon`` against the sign of the gradient of the cross-entropy loss
    with respect to the predicted class, so its maximum softmax score at temperature T rises:
    ``x' = x + epsilon * sign(grad_x log max softmax(logits(x) / T))``. The score is the maximum
    softmax of ``logits(x') / T``.

    ``epsilon`` is in [0, 1] pixel units. The scorer receives inputs normalized as
    ``(pixel - mean) / std``, where one pixel unit is ``1 / std[c]``, so channel c moves by
    ``epsilon / std[c]``. OpenOOD's ODIN postprocessor also divides the gradient sign by the
    per-channel std. A zero gradient leaves that input element unchanged (``torch.sign(0)``
    is 0), and the perturbed input is not clipped to the valid pixel range.
    """

    name = "odin"

    def __init__(
        self,
        forward: Forward,
        *,
        normalization: Normalization | None,
        temperature: float,
        epsilon: float,
    ) -> None:
        super().__init__(forward)
        self.temperature = _positive_option(self.name, "temperature", temperature)
        self.epsilon = _non_negative_option(self.name, "epsilon", epsilon)
        if normalization is None:
            raise ConfigError(
                "score 'odin' needs normalization=Normalization(mean, std) of the model input, "
                "because its epsilon is in [0, 1] pixel units and is divided by each channel's "
                "std: pass the normalization that produced the inputs"
            )
        std = tuple(float(value) for value in normalization.std)
        if not std or not all(math.isfinite(value) and value > 0 for value in std):
            raise ConfigError(
                f"score 'odin': normalization std {std} is invalid: "
                "pass one positive, finite std per input channel"
            )
        self.std = std

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ODIN-perturbed copy of the normalized inputs ``x`` (shape [N, C, ...])."""
        if x.ndim < 2 or len(self.std) not in (1, x.shape[1]):
            raise ConfigError(
                f"score 'odin': input of shape {tuple(x.shape)} does not match the "
                f"{len(self.std)} channel std values {self.std}: pass inputs of shape "
                "[N, C, ...] with one std per channel C"
            )

        # Leave any caller's inference_mode so that autograd can record the forward pass.
        with torch.inference_mode(False), torch.enable_grad():
            inputs = x.detach().clone().requires_grad_(True)
            logits = self._logits(inputs)
            if not logits.requires_grad:
                raise ConfigError(
                    "score 'odin' needs the gradient of the logits with respect to the input, "
                    "but forward(x) returned logits without a graph: do not run forward "
                    "under torch.no_grad or detach its output"
                )
            max_log_softmax = F.log_softmax(logits / self.temperature, dim=1).max(dim=1).values
            (gradient,) = torch.autograd.grad(max_log_softmax.sum(), inputs)

        step_shape = (1, len(self.std)) + (1,) * (x.ndim - 2)
        step = self.epsilon / torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return x.detach() + step.reshape(step_shape) * torch.sign(gradient)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        perturbed = self.perturb(x)
        with torch.no_grad():
            logits = self._logits(perturbed)
            probabilities = torch.softmax(logits / self.temperature, dim=1)
            return probabilities.max(dim=1).values.cpu()


class MahalanobisScorer(Scorer):
    """Negative squared Mahalanobis distance of penultimate features to the nearest class mean.

    From Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018. The features are the input of the model's last
    ``nn.Linear``. Class means and one shared (tied) covariance are fitted on labelled ID
    training data, with the covariance normalized by the sample count N. The score is
    ``-min_c (f - mu_c)^T P (f - mu_c)``, where P is the Moore-Penrose pseudo-inverse of the
    covariance, so a singular covariance (for example more feature dimensions than samples)
    still gives finite scores. Classes without fit samples are left out of the minimum. This is
    the single-layer variant, without input preprocessing or feature ensembles.

    Attributes:
        classes: class indices seen in the fit data, shape [K].
        class_means: float64 class means, shape [K, D].
        precision: float64 pseudo-inverse of the shared covariance, shape [D, D].
        num_fit_samples: number of samples the statistics were fitted on.
    """

    name = "mahalanobis"

    def __init__(self, forward: Forward, *, model: nn.Module, fit_data: FitData | None) -> None:
        super().__init__(forward)
        if fit_data is None:
            raise ConfigError(
                "score 'mahalanobis' needs labelled ID training data to fit its class means and "
                "covariance: pass fit_data, an iterable of (x_normalized, labels) batches"
            )
        self.head_name, self.head = last_linear(model)
        self.classes, self.class_means, self.precision, self.num_fit_samples = self._fit(fit_data)
        # Scores are computed relative to the first class mean, which keeps the numbers small.
        self._origin = self.class_means[0].clone()
        centered_means = self.class_means - self._origin
        self._centered_means = centered_means
        self._mean_norms = ((centered_means @ self.precision) * centered_means).sum(dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last linear layer's input for the batch ``x``: float64, CPU, [N, D]."""
        with torch.no_grad(), _capture_inputs(self.head) as captured:
            self.forward(x)
        if len(captured) != 1:
            raise ConfigError(
                f"score 'mahalanobis': forward(x) called the last linear layer "
                f"{self.head_name!r} {len(captured)} times, expected exactly once: pass a "
                "forward that runs the model whose features should be scored"
            )
        features = captured[0]
        if features.ndim != 2 or features.shape[0] != x.shape[0]:
            raise ConfigError(
                f"score 'mahalanobis': the input of layer {self.head_name!r} has shape "
                f"{tuple(features.shape)}, expected [N, features] for {x.shape[0]} inputs: "
                "use a model whose classifier head receives flat feature vectors"
            )
        return features.detach().to("cpu", torch.float64)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        centered = self.features(x) - self._origin
        projected = centered @ self.precision
        squared_distances = (
            (projected * centered).sum(dim=1, keepdim=True)
            - 2.0 * projected @ self._centered_means.T
            + self._mean_norms
        )
        return (-squared_distances.min(dim=1).values).float()

    def _fit(
        self, fit_data: FitData
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Accumulate per-class sums and the scatter matrix in one pass over ``fit_data``."""
        num_classes = self.head.out_features
        device = self.head.weight.device
        shift: torch.Tensor | None = None
        class_sums = torch.zeros(0)
        class_counts = torch.zeros(num_classes, dtype=torch.float64)
        scatter = torch.zeros(0)

        for x, labels in fit_data:
            labels = _check_labels(labels, x, num_classes)
            features = self.features(x.to(device))
            if shift is None:
                # Features are shifted by the first batch mean before the sums, which keeps
                # the cancellation in scatter - n * mean mean^T small.
                shift = features.mean(dim=0)
                class_sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
                scatter = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
            shifted = features - shift
            class_sums.index_add_(0, labels, shifted)
            class_counts += torch.bincount(labels, minlength=num_classes).to(torch.float64)
            scatter += shifted.T @ shifted

        total = int(class_counts.sum().item())
        if shift is None or total == 0:
            raise ConfigError(
                "score 'mahalanobis': fit_data contained no samples: pass a non-empty iterable "
                "of (x_normalized, labels) batches of ID training data"
            )

        classes = torch.nonzero(class_counts).flatten()
        missing = num_classes - classes.numel()
        if missing:
            logger.warning(
                "mahalanobis: %d of %d classes have no fit samples and are left out of the score",
                missing,
                num_classes,
            )
        counts = class_counts[classes]
        shifted_means = class_sums[classes] / counts[:, None]
        within_class = scatter - (shifted_means * counts[:, None]).T @ shifted_means
        covariance = within_class / total
        covariance = (covariance + covariance.T) / 2
        precision = torch.linalg.pinv(covariance, hermitian=True)

        logger.info(
            "mahalanobis: fitted %d class means of %d features on %d samples",
            classes.numel(),
            covariance.shape[0],
            total,
        )
        return classes, shifted_means + shift, precision, total


@dataclass(frozen=True)
class ScoreSpec:
    """Registry entry of one score.

    Attributes:
        builder: creates the scorer from ``(model, forward, normalization, fit_data, **options)``.
        description: one-line summary for help texts.
        options: keyword options that the score accepts, with their default values.
        needs_fit_data: whether ``make_scorer`` needs labelled ID training batches.
        needs_normalization: whether ``make_scorer`` needs the input normalization.
    """

    builder: Callable[..., Scorer]
    description: str
    options: Mapping[str, float] = field(default_factory=dict)
    needs_fit_data: bool = False
    needs_normalization: bool = False


def _build_msp(model, forward, normalization, fit_data, **options: Any) -> Scorer:
    return MaxSoftmaxScorer(forward)


def _build_maxlogit(model, forward, normalization, fit_data, **options: Any) -> Scorer:
    return MaxLogitScorer(forward)


def _build_energy(model, forward, normalization, fit_data, **options: Any) -> Scorer:
    return EnergyScorer(forward, **options)


def _build_odin(model, forward, normalization, fit_data, **options: Any) -> Scorer:
    return OdinScorer(forward, normalization=normalization, **options)


def _build_mahalanobis(model, forward, normalization, fit_data, **options: Any) -> Scorer:
    return MahalanobisScorer(forward, model=model, fit_data=fit_data)


SCORES: dict[str, ScoreSpec] = {
    "msp": ScoreSpec(_build_msp, "maximum softmax probability"),
    "maxlogit": ScoreSpec(_build_maxlogit, "maximum logit"),
    "energy": ScoreSpec(
        _build_energy, "negative energy T * logsumexp(logits / T)", {"temperature": 1.0}
    ),
    "odin": ScoreSpec(
        _build_odin,
        "max softmax at temperature T after an input perturbation of epsilon pixel units",
        {"temperature": 1000.0, "epsilon": 0.0014},
        needs_normalization=True,
    ),
    "mahalanobis": ScoreSpec(
        _build_mahalanobis,
        "negative Mahalanobis distance to the nearest class mean of penultimate features",
        needs_fit_data=True,
    ),
}


def make_scorer(
    name: str,
    model: nn.Module,
    *,
    forward: Forward | None = None,
    normalization: Normalization | None = None,
    fit_data: FitData | None = None,
    **options: float,
) -> Scorer:
    """Build the scorer registered as ``name`` in ``SCORES``, fitting it first if it needs fit data.

    Args:
        name: score name, a key of ``SCORES``.
        model: the classifier. Its train/eval mode is left as it is.
        forward: maps normalized inputs to logits. Defaults to ``model``.
        normalization: mean and std that produced the normalized inputs. Required by ``odin``
            and ignored by the other scores.
        fit_data: iterable of ``(x_normalized, labels)`` batches of labelled ID training data.
            Required by ``mahalanobis``, ignored by the other scores, and iterated once.
            Batches are moved to the device of the model's last linear layer.
        **options: score options, e.g. ``temperature`` and ``epsilon`` for ``odin``. The
            defaults are in ``SCORES[name].options``.

    Raises:
        ConfigError: the name or an option is unknown or invalid, or required data is missing.
    """
    spec = SCORES.get(name)
    if spec is None:
        raise ConfigError(f"unknown score {name!r}: choose one of {', '.join(SCORES)}")

    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) if spec.options else "none"
        raise ConfigError(
            f"score {name!r} has no option {', '.join(map(repr, unknown))}: "
            f"accepted options are {accepted}"
        )

    values = {**spec.options, **options}
    logger.debug("building score %s with options %s", name, values)
    if forward is None:
        forward = model
    return spec.builder(model, forward, normalization, fit_data, **values)


@contextlib.contextmanager
def _capture_inputs(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first positional input of every call of ``module`` while the context is open."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        captured.append(args[0].detach())

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _check_labels(labels: torch.Tensor, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the labels as a CPU int64 tensor, raising ConfigError unless all are in range."""
    labels = torch.as_tensor(labels).to("cpu", torch.int64).flatten()
    if labels.numel() != x.shape[0]:
        raise ConfigError(
            f"score 'mahalanobis': fit batch has {x.shape[0]} inputs but {labels.numel()} "
            "labels: pass (x_normalized, labels) batches with one label per input"
        )
    invalid = (labels < 0) | (labels >= num_classes)
    if invalid.any():
        examples = sorted(set(labels[invalid].tolist()))[:5]
        raise ConfigError(
            f"score 'mahalanobis': fit_data contains {int(invalid.sum())} labels outside "
            f"[0, {num_classes}), e.g. {examples}: pass labelled ID training data whose labels "
            "match the classifier's classes (-1 marks an unlabelled sample)"
        )
    return labels


def _is_finite_number(value: object) -> bool:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return is_number and math.isfinite(value)


def _positive_option(score: str, option: str, value: float) -> float:
    if not _is_finite_number(value) or value <= 0:
        raise ConfigError(
            f"score {score!r}: {option}={value!r} is invalid: pass a positive finite number"
        )
    return float(value)


def _non_negative_option(score: str, option: str, value: float) -> float:
    if not _is_finite_number(value) or value < 0:
        raise ConfigError(
            f"score {score!r}: {option}={value!r} is invalid: pass a finite number >= 0"
        )
    return float(value)
