"""Per-layer weight masks: random masks for loss estimation and learned (UMAP) score masks.

A mask never edits the model's class or its parameters. The masked model is evaluated with
`torch.func.functional_call`, which swaps in `weight * mask` (and, for UMAP, batch-norm
statistics re-estimated under the mask) for one call, so any `nn.Module` works unchanged.

Only the weight tensors of convolution and linear layers are masked. Biases, normalisation layers
and the fused input projection of `nn.MultiheadAttention` (a bare parameter, not a layer) are
left as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.func import functional_call

from core.errors import MaskError

logger = logging.getLogger(__name__)

MASK_FORMAT = "ood-hardening-mask/1"
WEIGHTS_FORMAT = "ood-hardening-weights/1"
_MASKED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Masks = dict[str, torch.Tensor]


def maskable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Collect the weight of every convolution and linear layer, keyed by parameter name."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, _MASKED_LAYERS):
            prefix = f"{module_name}." if module_name else ""
            found[f"{prefix}weight"] = module.weight
    return found


def top_fraction_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Return a boolean mask that keeps the `keep` fraction of `scores` with the highest values.

    The threshold is the k-th smallest score found with one `kthvalue` call (linear time), so a
    training step computes it once per layer instead of sorting or calling `torch.quantile`.
    Exact ties with the threshold are dropped, which float scores make vanishingly rare.
    """
    if not 0.0 < keep <= 1.0:
        raise MaskError(f"Kept fraction {keep} is invalid: it must be in (0, 1].")
    flat = scores.detach().reshape(-1)
    num_dropped = _num_dropped(flat.numel(), keep)
    if num_dropped <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(num_dropped).values
    return scores.detach() > threshold


def _num_dropped(count: int, keep: float) -> int:
    """Return how many of `count` entries a mask keeping the fraction `keep` drops (one is always kept)."""
    return count - max(1, round(keep * count))


def kth_smallest(flat: torch.Tensor, k: int, hint: float | None, width: float) -> tuple[torch.Tensor, bool]:
    """Return the k-th smallest value of a 1-D tensor, searching near `hint` first.

    Scores move little between two optimiser steps, so the new threshold usually lies within
    `width` of the previous one. Counting the values below that band and selecting inside it
    costs two vectorised comparisons and a `kthvalue` over a small slice, instead of a
    `kthvalue` over the whole layer. The result is exact either way.

    Returns:
        The value, and whether the band around `hint` contained it.
    """
    if hint is not None:
        low, high = hint - width, hint + width
        below = int((flat < low).sum())
        band = flat[(flat >= low) & (flat <= high)]
        if below < k <= below + band.numel():
            return band.kthvalue(k - below).values, True
    return flat.kthvalue(k).values, False


def random_masks(model: nn.Module, keep: float, generator: torch.Generator) -> Masks:
    """Draw a uniform random score per weight and keep the top `keep` fraction of each layer."""
    masks = {}
    for name, weight in maskable_parameters(model).items():
        scores = torch.rand(weight.shape, generator=generator)
        masks[name] = top_fraction_mask(scores, keep).to(weight.device)
    return masks


def batch_norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return copies of the running statistics of every batch-norm layer, keyed by buffer name."""
    buffers = {}
    for module_name, module in model.named_modules():
        if isinstance(module, _BATCH_NORMS) and module.track_running_stats:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                buffers[f"{module_name}.{buffer}"] = getattr(module, buffer).detach().clone()
    return buffers


def masked_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `weight * mask` for every masked weight, ready for `functional_call`."""
    parameters = dict(model.named_parameters())
    return {name: parameters[name] * mask.to(parameters[name].dtype) for name, mask in masks.items()}


def masked_forward(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return `forward(x)` that runs `model` with the masks (and optional buffers) swapped in.

    The model's own parameters and buffers are not modified, so the same model object keeps
    serving unmasked predictions.
    """

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        replaced = masked_parameters(model, masks)
        if buffers:
            replaced.update(buffers)
        return functional_call(model, replaced, (inputs,))

    return forward


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    batches: Iterable[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Re-estimate batch-norm running statistics for the masked model.

    The statistics are a plain average over `batches` (momentum `None`), computed in training
    mode for the batch-norm layers only, into fresh buffers: the model's own statistics stay as
    they were. A masked model evaluated with the unmasked statistics loses much of its accuracy
    at low kept fractions, because every masked layer shifts the activations that follow it.

    Returns:
        The new buffers keyed by name; empty when the model has no batch-norm layer.
    """
    norms = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BATCH_NORMS) and module.track_running_stats
    }
    if not norms:
        return {}

    buffers = batch_norm_buffers(model)
    for name in norms:
        buffers[f"{name}.running_mean"].zero_()
        buffers[f"{name}.running_var"].fill_(1.0)
        buffers[f"{name}.num_batches_tracked"].zero_()

    saved = {name: (module.momentum, module.training) for name, module in norms.items()}
    was_training = model.training
    model.eval()
    try:
        for name, module in norms.items():
            module.momentum = None
            module.train()
        forward = masked_forward(model, masks, buffers)
        for inputs in batches:
            forward(inputs)
    finally:
        for name, module in norms.items():
            module.momentum, training = saved[name]
            module.train(training)
        model.train(was_training)
    return buffers


class ScoreMasks(nn.Module):
    """Learnable real scores, one per masked weight, that define a UMAP mask.

    Each step keeps the top `prune_rate` fraction of every layer by score. The straight-through
    estimator (as in edge-popup, Ramanujan et al., 2020) passes the gradient of the masked weight
    to the score unchanged. The mask is `hard + scores - scores.detach()`, which equals the hard
    0/1 mask in the forward pass and has gradient 1 with respect to the scores.

    Scores start at `|weight|`, so the first mask is magnitude pruning and the masked model
    starts close to the original. With this start Adam moves the mask (its steps do not shrink
    with the small weight magnitudes, unlike SGD's).
    """

    def __init__(self, model: nn.Module, prune_rate: float):
        super().__init__()
        if not 0.0 < prune_rate <= 1.0:
            raise MaskError(
                f"prune_rate {prune_rate} is invalid: it is the kept fraction of each layer "
                "and must be in (0, 1]."
            )
        self.prune_rate = prune_rate
        self.names = list(maskable_parameters(model))
        self.scores = nn.ParameterList(
            nn.Parameter(weight.detach().abs().clone()) for weight in maskable_parameters(model).values()
        )
        # Last threshold and search band of each layer (see `kth_smallest`); not saved.
        self._thresholds: list[float | None] = [None] * len(self.names)
        self._widths = [max(float(score.detach().std()), 1e-12) * 0.01 for score in self.scores]

    def _hard_mask(self, index: int) -> torch.Tensor:
        """Return layer `index`'s boolean mask, reusing its last threshold to find the new one."""
        score = self.scores[index].detach()
        flat = score.reshape(-1)
        num_dropped = _num_dropped(flat.numel(), self.prune_rate)
        if num_dropped <= 0:
            return torch.ones_like(score, dtype=torch.bool)
        threshold, found = kth_smallest(flat, num_dropped, self._thresholds[index], self._widths[index])
        # Widen the band after a miss; narrow it while it finds the threshold, to keep it small.
        self._widths[index] *= 0.8 if found else 4.0
        self._thresholds[index] = float(threshold)
        return score > threshold

    def hard_masks(self) -> Masks:
        """Return the current boolean masks, without gradient."""
        return {name: self._hard_mask(index) for index, name in enumerate(self.names)}

    def masked_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return `weight * mask` for every masked layer, with the straight-through gradient.

        Equivalent to `masked_parameters(model, self.straight_through_masks())` but with one
        fused autograd node per layer instead of four elementwise operations, which keeps a
        UMAP step close to the cost of a plain fine-tuning step.
        """
        parameters = dict(model.named_parameters())
        return {
            name: _StraightThroughMask.apply(parameters[name], self.scores[index], self._hard_mask(index))
            for index, name in enumerate(self.names)
        }

    def straight_through_masks(self) -> Masks:
        """Return 0/1 float masks whose gradient flows to the scores (one threshold per layer)."""
        masks = {}
        for index, (name, score) in enumerate(zip(self.names, self.scores)):
            hard = self._hard_mask(index).to(score.dtype)
            masks[name] = hard + score - score.detach()
        return masks


class _StraightThroughMask(torch.autograd.Function):
    """`weight * hard_mask` whose gradient with respect to the scores is `grad * weight`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        hard = hard.to(weight.dtype)
        ctx.save_for_backward(weight, hard)
        return weight * hard

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, hard = ctx.saved_tensors
        grad_weight = grad_output * hard if ctx.needs_input_grad[0] else None
        grad_scores = grad_output * weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None


def flipped_fraction(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """Return the share of mask entries that differ between two masks over all layers."""
    changed = sum(int((before[name] != after[name]).sum()) for name in before)
    total = sum(before[name].numel() for name in before)
    return changed / total if total else 0.0


def kept_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    """Return the share of weights kept over all masked layers."""
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return kept / total if total else 1.0


@dataclass
class MaskArtifact:
    """A learned mask with everything needed to rebuild the masked model from the checkpoint."""

    masks: Masks
    buffers: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def pack_masks(artifact: MaskArtifact) -> bytes:
    """Serialise a mask as safetensors bytes, one bit per weight.

    Tensors are `mask.<parameter>` (uint8, `numpy.packbits` of the flattened mask) and
    `bn.<buffer>` (batch-norm statistics under the mask). The metadata carries the shapes and the
    caller's provenance fields (architecture, checkpoint sha256, prune rate, ...).
    """
    tensors = {}
    shapes = {}
    for name, mask in artifact.masks.items():
        bits = np.packbits(mask.detach().cpu().reshape(-1).numpy().astype(bool))
        tensors[f"mask.{name}"] = torch.from_numpy(bits)
        shapes[name] = list(mask.shape)
    for name, buffer in artifact.buffers.items():
        tensors[f"bn.{name}"] = buffer.detach().cpu().contiguous()

    metadata = dict(artifact.metadata)
    metadata["format"] = MASK_FORMAT
    metadata["mask_shapes"] = json.dumps(shapes)
    return save_safetensors(tensors, metadata=metadata)


def unpack_masks(data: bytes) -> MaskArtifact:
    """Read a mask written by `pack_masks`."""
    try:
        tensors = load_safetensors(data)
        metadata = _safetensors_metadata(data)
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise MaskError(
            f"The mask file is not a valid safetensors file ({error}). Download it again from the "
            "job that produced it."
        ) from error
    if metadata.get("format") != MASK_FORMAT:
        raise MaskError(
            f"The file has format {metadata.get('format')!r}, not a mask ({MASK_FORMAT!r}). "
            "Pass a file downloaded from a UMAP job's mask."
        )

    shapes = json.loads(metadata["mask_shapes"])
    masks = {}
    buffers = {}
    for key, tensor in tensors.items():
        kind, name = key.split(".", 1)
        if kind == "mask":
            shape = shapes[name]
            count = int(np.prod(shape))
            bits = np.unpackbits(tensor.numpy())[:count].astype(bool)
            masks[name] = torch.from_numpy(bits).reshape(shape)
        elif kind == "bn":
            buffers[name] = tensor
    return MaskArtifact(masks=masks, buffers=buffers, metadata=metadata)


def read_metadata(data: bytes) -> dict[str, str]:
    """Return the metadata of a safetensors artifact without decoding its tensors."""
    try:
        return _safetensors_metadata(data)
    except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MaskError(f"The artifact is not a valid safetensors file ({error}).") from error


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError(f"file is {len(data)} bytes long, shorter than a safetensors header")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise ValueError(f"header size {header_size} exceeds the file size")
    header = json.loads(data[8 : 8 + header_size].decode("utf-8"))
    return dict(header.get("__metadata__", {}))


def check_masks_fit(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise MaskError unless `masks` covers exactly the model's masked weights with their shapes."""
    expected = {name: tuple(weight.shape) for name, weight in maskable_parameters(model).items()}
    actual = {name: tuple(mask.shape) for name, mask in masks.items()}
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = sorted(name for name in set(expected) & set(actual) if expected[name] != actual[name])
    if missing or unexpected or wrong:
        raise MaskError(
            "The mask does not fit the model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}. "
            "Use the checkpoint and architecture that the mask was learned on."
        )
