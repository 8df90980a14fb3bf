"""Time one UMAP step against one plain fine-tuning step and a torch.quantile mask step.

All three run on the same model object and the same batch. They are interleaved round by round
so that a slow spell of the machine hits each of them alike, and the reported figure is the
median.

The quantile variant is what the Unleashing Mask reference code does: it recomputes every
layer's threshold with `torch.quantile` over the scores in each forward pass. Ours finds it with
one `kthvalue` per layer per step (`core.masks.top_fraction_mask`).

    python -m bench.step_time
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from core.architectures import build_model
from core.hardening import constrained_loss, fine_tune_optimizer, fine_tune_step, mask_optimizer, umap_step
from core.masks import ScoreMasks, masked_parameters

CASES = (
    # (architecture, input channels, side, batch size, timed rounds)
    ("lenet", 1, 28, 128, 30),
    ("resnet18_32x32", 3, 32, 32, 10),
)


def quantile_step(model, scores: ScoreMasks, buffers, optimizer, inputs, labels, loss_constraint) -> None:
    """Take one UMAP step whose thresholds come from `torch.quantile` over each layer's scores."""
    masks = {}
    for name, score in zip(scores.names, scores.scores):
        threshold = torch.quantile(score.detach().flatten(), 1.0 - scores.prune_rate)
        hard = (score.detach() >= threshold).to(score.dtype)
        masks[name] = hard + score - score.detach()
    replaced = masked_parameters(model, masks)
    replaced.update(buffers)
    loss = constrained_loss(F.cross_entropy(functional_call(model, replaced, (inputs,)), labels), loss_constraint)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_case(arch: str, channels: int, side: int, batch_size: int, rounds: int, warmup: int = 3) -> dict:
    """Return the median seconds per step of the three step kinds for one model and batch."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=channels).train()
    inputs = torch.randn(batch_size, channels, side, side)
    labels = torch.randint(0, 10, (batch_size,))
    scores = ScoreMasks(model, prune_rate=0.9)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    score_optimizer = mask_optimizer(scores, 1e-3)
    weight_optimizer = fine_tune_optimizer(model, 1e-6)

    steps = {
        "finetune": lambda: fine_tune_step(model, weight_optimizer, inputs, labels, 0.1),
        "umap": lambda: umap_step(model, scores, buffers, score_optimizer, inputs, labels, 0.1),
        "umap_quantile": lambda: quantile_step(model, scores, buffers, score_optimizer, inputs, labels, 0.1),
    }
    samples = {name: [] for name in steps}
    for round_index in range(warmup + rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            elapsed = time.perf_counter() - started
            if round_index >= warmup:
                samples[name].append(elapsed)

    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "arch": arch,
        "batch_size": batch_size,
        "rounds": rounds,
        "input": [channels, side, side],
        "seconds": median,
        "umap_over_finetune": median["umap"] / median["finetune"],
        "quantile_over_umap": median["umap_quantile"] / median["umap"],
    }


def measure_step_times() -> list[dict]:
    """Time every case in `CASES`."""
    return [time_case(*case) for case in CASES]


if __name__ == "__main__":
    print(json.dumps(measure_step_times(), indent=2))
