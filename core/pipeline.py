"""One hardening job end to end, and the predictor that serves its artifact.

The CLI and the Celery worker call `run_job`. It loads the checkpoint and the datasets and
estimates the loss constraint when none is given. Then it evaluates the original model, runs UM
or UMAP with epoch selection on validation data and evaluates the hardened model on the test OOD
sets. Last, it calibrates the OOD threshold on held-out ID data and packs the artifact (the mask
for UMAP, the weights for UM). Test OOD sets only measure and never steer a choice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core.architectures import ARCHITECTURES
from core.checkpoints import LoadedModel, load_model
from core.datasets import (
    ImageSet,
    Normalization,
    convert_images,
    default_normalization,
    load_dataset,
    split_holdout,
    subset,
)
from core.errors import Cancelled, ConfigError, DatasetError, MaskError
from core.evaluate import accuracy, compute_scores, score_table, validation_metrics
from core.hardening import (
    HardeningResult,
    StepReport,
    TrainingControl,
    estimate_loss_constraint,
    fine_tune,
    learn_mask,
)
from core.masks import MASK_FORMAT, WEIGHTS_FORMAT, MaskArtifact, check_masks_fit, masked_forward, pack_masks, read_metadata, unpack_masks
from core.metrics import threshold_at_tpr
from core.scores import SCORES, make_scorer

logger = logging.getLogger(__name__)

# "finetune" is the plain cross-entropy control with UM's schedule; the REST API offers um and umap.
METHODS = ("um", "umap", "finetune")
# Scores that need no fitted statistics, so that an artifact alone can serve them.
SERVING_SCORES = ("energy", "msp", "maxlogit", "odin")
DEFAULT_LR = {"um": 0.01, "finetune": 0.01, "umap": 1e-3}

# Inclusive (min, max) of every numeric parameter; the REST API validates against the same table.
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "mask_ratio": (0.5, 0.9999),
    "loss_constraint": (0.0, 20.0),
    "prune_rate": (0.05, 1.0),
    "epochs": (1, 200),
    "lr": (1e-6, 1.0),
    "batch_size": (1, 4096),
    "seed": (0, 2**31 - 1),
    "max_train_samples": (100, 10_000_000),
    "holdout_fraction": (0.01, 0.5),
    "estimate_draws": (1, 20),
}


@dataclass
class ModelSpec:
    """The user's checkpoint and how its inputs are prepared."""

    arch: str
    checkpoint_path: Path
    num_classes: int | None = None
    in_channels: int | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass
class HardeningParams:
    """Settings of one job; `PARAM_BOUNDS` gives the valid range of each numeric field.

    Attributes:
        mask_ratio: kept fraction of each layer for the random masks that estimate c.
        loss_constraint: c; estimated from `mask_ratio` when None.
        prune_rate: kept fraction of each layer in the UMAP mask.
        epochs: training epochs; the best one on validation data is kept.
        lr: learning rate; 0.01 (SGD) for UM and 1e-3 (Adam on the mask scores) for UMAP when None.
        batch_size: training and evaluation batch size.
        scores: OOD scores to report (names in `core.scores.SCORES`).
        selection_score: the score that selects the epoch and drives the serving threshold.
        seed: seeds the masks, the shuffling and the hold-out split.
        max_train_samples: train on a random subset of this size (None: all).
        holdout_fraction: share of the ID training set held out for selection and calibration.
        estimate_draws: random masks drawn to estimate c.
    """

    mask_ratio: float = 0.975
    loss_constraint: float | None = None
    prune_rate: float = 0.9
    epochs: int = 5
    lr: float | None = None
    batch_size: int = 128
    scores: tuple[str, ...] = ("msp", "maxlogit", "energy", "odin", "mahalanobis")
    selection_score: str = "energy"
    seed: int = 0
    max_train_samples: int | None = None
    holdout_fraction: float = 0.1
    estimate_draws: int = 3

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter outside its bounds or not known."""
        for name, (low, high) in PARAM_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"Parameter {name}={value} is out of range: use a value in [{low}, {high}].")
        unknown = [name for name in self.scores if name not in SCORES]
        if unknown or not self.scores:
            raise ConfigError(f"Unknown scores {unknown or '(none given)'}: choose from {sorted(SCORES)}.")
        if self.selection_score not in SERVING_SCORES:
            raise ConfigError(
                f"selection_score {self.selection_score!r} is not supported: choose one of {list(SERVING_SCORES)}."
            )


@dataclass
class JobSpec:
    """A hardening job: the method, the model, the datasets and the parameters."""

    method: str
    model: ModelSpec
    id_dataset: str
    ood_datasets: list[str]
    val_ood_datasets: list[str] = field(default_factory=list)
    params: HardeningParams = field(default_factory=HardeningParams)
    data_roots: list[Path] | None = None
    # Where the training state is saved after each epoch, so that a rerun of the same job (for
    # example after its worker was killed) resumes instead of starting over. None: not saved.
    state_dir: Path | None = None


@dataclass
class Progress:
    """Progress of a job; `fraction` runs from 0 to 1 over the whole job."""

    stage: str
    fraction: float
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    loss_constraint: float | None = None


@dataclass
class JobResult:
    """Metrics and the artifact of a finished job."""

    metrics: dict
    artifact: bytes
    artifact_kind: str
    artifact_sha256: str
    threshold: float
    score_name: str


# Share of the whole job at which each stage starts; training fills the gap up to evaluation.
_STAGE_START = {"loading": 0.0, "estimating": 0.05, "evaluating": 0.15, "training": 0.25, "final": 0.85, "calibrating": 0.97}


@dataclass
class _JobData:
    loaded: LoadedModel
    normalization: Normalization
    train: ImageSet
    holdout: ImageSet
    test: ImageSet
    ood_sets: dict[str, ImageSet]
    val_ood_sets: dict[str, ImageSet]
    test_is_training_data: bool = False


def run_job(
    spec: JobSpec,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str = "cpu",
) -> JobResult:
    """Run one UM or UMAP job and return its metrics and artifact.

    Raises:
        HardeningError: a subclass naming the bad input (checkpoint, dataset, parameter).
        Cancelled: `should_stop()` returned True.
    """
    if spec.method not in METHODS:
        raise ConfigError(f"Method {spec.method!r} is unknown: use one of {list(METHODS)}.")
    params = spec.params
    params.validate()

    def report(stage: str, within: float = 0.0, **fields) -> None:
        if should_stop and should_stop():
            raise Cancelled(f"cancelled during {stage}")
        if on_progress:
            stages = list(_STAGE_START.values()) + [1.0]
            start = _STAGE_START[stage]
            end = stages[stages.index(start) + 1]
            on_progress(Progress(stage=stage, fraction=start + within * (end - start), **fields))

    report("loading")
    data = _load_job_data(spec, device)
    model = data.loaded.model
    normalization = data.normalization
    batch_size = params.batch_size

    report("estimating")
    estimate = None
    constraint = params.loss_constraint
    if constraint is None and spec.method != "finetune":
        estimate = estimate_loss_constraint(
            model, data.train, normalization, [params.mask_ratio], draws=params.estimate_draws, seed=params.seed,
            batch_size=batch_size, device=device,
            on_draw=lambda done, total: report("estimating", done / total),
        )[0]
        constraint = estimate.mean

    report("evaluating", loss_constraint=constraint)
    original_forward = model
    original = _evaluate_model(model, original_forward, data, params, device)

    def validate(forward) -> dict[str, float]:
        return validation_metrics(
            model, forward, data.holdout, data.val_ood_sets, params.selection_score, normalization,
            batch_size=batch_size, device=device,
        )

    def on_step(step: StepReport) -> None:
        done = ((step.epoch - 1) * step.steps_per_epoch + step.step) / (step.epochs * step.steps_per_epoch)
        report("training", done, epoch=step.epoch, epochs=step.epochs, loss=step.loss, loss_constraint=constraint)

    control = TrainingControl(on_step=on_step)
    lr = params.lr if params.lr is not None else DEFAULT_LR[spec.method]
    common = dict(
        loss_constraint=constraint, epochs=params.epochs, lr=lr, batch_size=batch_size, seed=params.seed,
        device=device, validate=validate if data.val_ood_sets else None, control=control,
        state_path=Path(spec.state_dir) / f"{spec.method}-state.pt" if spec.state_dir else None,
    )
    if spec.method in ("um", "finetune"):
        if spec.method == "finetune":
            common["loss_constraint"] = None
        result = fine_tune(model, data.train, normalization, **common)
        hardened_forward = model
        prediction_forward = model
    else:
        result = learn_mask(model, data.train, normalization, prune_rate=params.prune_rate, **common)
        hardened_forward = masked_forward(model, result.masks, result.buffers)
        prediction_forward = model

    report("final", epoch=params.epochs, epochs=params.epochs, loss_constraint=constraint)
    model.eval()
    hardened = _evaluate_model(model, hardened_forward, data, params, device)
    hardened["id_accuracy"] = accuracy(prediction_forward, data.test, normalization, batch_size, device)
    if spec.method == "umap":
        hardened["masked_id_accuracy"] = accuracy(hardened_forward, data.test, normalization, batch_size, device)

    report("calibrating")
    scorer = make_scorer(params.selection_score, model, forward=hardened_forward, normalization=normalization)
    holdout_scores = compute_scores(scorer, data.holdout, normalization, batch_size, device)
    threshold = float(threshold_at_tpr(holdout_scores, 0.95))

    metadata = _artifact_metadata(spec, data, result, threshold)
    if spec.method == "umap":
        artifact = pack_masks(MaskArtifact(masks=result.masks, buffers=result.buffers, metadata=metadata))
        kind = "mask"
    else:
        artifact = save_safetensors(
            {name: tensor.contiguous() for name, tensor in result.state_dict.items()},
            metadata={**metadata, "format": WEIGHTS_FORMAT},
        )
        kind = "weights"

    metrics = {
        "method": spec.method,
        "loss_constraint": constraint,
        "loss_constraint_estimate": estimate.as_dict() if estimate else None,
        "selection": {
            "score": params.selection_score,
            "selected_epoch": result.selected_epoch,
            "original_validation_fpr95": result.original_validation_fpr95,
            "original_validation_auroc": result.original_validation_auroc,
            "beats_original": result.beats_original,
            "stopped_early": result.stopped_early,
            "summary": result.summary(),
        },
        "history": [asdict(record) for record in result.history],
        "original": original,
        "hardened": hardened,
        "threshold": threshold,
        "id_test_size": len(data.test.labels),
        "id_test_is_training_data": data.test_is_training_data,
        "train_size": len(data.train.labels),
    }
    logger.info("%s job finished: %s", spec.method, result.summary())
    report("calibrating", 1.0)
    return JobResult(
        metrics=metrics,
        artifact=artifact,
        artifact_kind=kind,
        artifact_sha256=hashlib.sha256(artifact).hexdigest(),
        threshold=threshold,
        score_name=params.selection_score,
    )


def _load_job_data(spec: JobSpec, device: str) -> _JobData:
    model_spec = spec.model
    loaded = load_model(
        model_spec.checkpoint_path, model_spec.arch, num_classes=model_spec.num_classes,
        in_channels=model_spec.in_channels,
    )
    loaded.model.to(device).eval()
    channels = loaded.in_channels
    size = model_spec.input_size or ARCHITECTURES[model_spec.arch].input_size
    normalization = resolve_normalization(model_spec, spec.id_dataset, channels)

    def load(reference: str, split: str) -> ImageSet:
        return load_dataset(reference, channels=channels, size=size, allowed_roots=spec.data_roots, split=split)

    params = spec.params
    train_all = load(spec.id_dataset, "train")
    check_classes_fit(train_all, loaded.num_classes, spec.id_dataset)
    train, holdout = split_holdout(train_all, params.holdout_fraction, params.seed)
    if params.max_train_samples is not None and len(train.labels) > params.max_train_samples:
        train = subset(train, params.max_train_samples, params.seed)
    test = load(spec.id_dataset, "test")
    if same_images(train_all, test):
        logger.warning(
            "%s has no separate test split, so ID test metrics are measured on training images; "
            "use a dataset with train and test splits (or DIR/train and DIR/test folders) for honest numbers",
            spec.id_dataset,
        )
    # Validation OOD sets default to the "train" half of a built-in set and test sets to the
    # "test" half, so that one built-in name in both lists still gives disjoint images.
    ood_sets = {reference: load(reference, "test") for reference in spec.ood_datasets}
    val_ood_sets = {reference: load(reference, "train") for reference in spec.val_ood_datasets}
    logger.info(
        "Loaded %s: %d training, %d held-out, %d test images; %d test and %d validation OOD sets",
        spec.id_dataset, len(train.labels), len(holdout.labels), len(test.labels), len(ood_sets), len(val_ood_sets),
    )
    return _JobData(
        loaded, normalization, train, holdout, test, ood_sets, val_ood_sets, same_images(train_all, test)
    )


def same_images(first: ImageSet, second: ImageSet) -> bool:
    """Return whether two sets hold the same images, as the two splits of a split-less `npz:` do."""
    return first.images.shape == second.images.shape and torch.equal(first.images, second.images)


def check_classes_fit(data: ImageSet, num_classes: int, reference: str) -> None:
    """Raise DatasetError when the dataset has more classes than the classifier has outputs."""
    if data.num_classes is not None and data.num_classes > num_classes:
        raise DatasetError(
            f"Dataset {reference!r} has {data.num_classes} classes but the checkpoint's classifier has "
            f"{num_classes} outputs. Use the dataset the model was trained on."
        )


def resolve_normalization(model_spec: ModelSpec, id_dataset: str, channels: int) -> Normalization:
    """Return the spec's mean and std, or the ID dataset's defaults where they are not set."""
    default = default_normalization(id_dataset, channels)
    mean = tuple(model_spec.mean) if model_spec.mean else default.mean
    std = tuple(model_spec.std) if model_spec.std else default.std
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"mean {mean} and std {std} must have one value per input channel ({channels}). "
            "Pass one value per channel, or none to use the dataset's defaults."
        )
    if any(value <= 0 for value in std):
        raise ConfigError(f"std {std} is invalid: every value must be positive.")
    return Normalization(mean=mean, std=std)


def _evaluate_model(model: nn.Module, forward, data: _JobData, params: HardeningParams, device: str) -> dict:
    table = score_table(
        model, forward, data.test, data.ood_sets, params.scores, data.normalization,
        fit_data=data.train, batch_size=params.batch_size, device=device,
    )
    return {"id_accuracy": accuracy(forward, data.test, data.normalization, params.batch_size, device), "scores": table}


def _artifact_metadata(spec: JobSpec, data: _JobData, result: HardeningResult, threshold: float) -> dict[str, str]:
    loaded = data.loaded
    return {
        "method": spec.method,
        "arch": loaded.arch,
        "checkpoint_sha256": loaded.sha256,
        "num_classes": str(loaded.num_classes),
        "in_channels": str(loaded.in_channels),
        "input_size": str(data.train.images.shape[-1]),
        "mean": json.dumps(list(data.normalization.mean)),
        "std": json.dumps(list(data.normalization.std)),
        "prune_rate": str(spec.params.prune_rate) if spec.method == "umap" else "",
        "loss_constraint": str(result.loss_constraint),
        "selected_epoch": str(result.selected_epoch),
        "score_name": spec.params.selection_score,
        "threshold": repr(threshold),
    }


# --------------------------------------------------------------------------------------------
# Serving


class Predictor:
    """Classify images and score them for OOD with a job's artifact.

    With a UMAP mask, classes come from the original weights and the OOD score from the masked
    model. With UM weights, both come from the hardened weights.
    """

    def __init__(self, model: nn.Module, predict_forward, score_forward, metadata: dict[str, str], device: str):
        self.model = model
        self.metadata = metadata
        self.device = device
        self.score_name = metadata["score_name"]
        self.threshold = float(metadata["threshold"])
        self.in_channels = int(metadata["in_channels"])
        self.input_size = int(metadata["input_size"])
        self.normalization = Normalization(
            mean=tuple(json.loads(metadata["mean"])), std=tuple(json.loads(metadata["std"]))
        )
        self._predict_forward = predict_forward
        self._scorer = make_scorer(self.score_name, model, forward=score_forward, normalization=self.normalization)

    @classmethod
    def from_artifact(cls, model_spec: ModelSpec, artifact: bytes, device: str = "cpu") -> Predictor:
        """Rebuild the hardened model from the original checkpoint and a job's artifact.

        Raises:
            MaskError: the artifact is corrupt or was made from another checkpoint.
        """
        metadata = read_metadata(artifact)
        check_artifact_format(metadata)
        loaded = load_model(
            model_spec.checkpoint_path, metadata.get("arch", model_spec.arch),
            num_classes=int(metadata.get("num_classes", 0)) or model_spec.num_classes,
            in_channels=int(metadata.get("in_channels", 0)) or model_spec.in_channels,
        )
        if metadata.get("checkpoint_sha256") != loaded.sha256:
            raise MaskError(
                f"The artifact was made from checkpoint sha256 {metadata.get('checkpoint_sha256')}, but "
                f"{model_spec.checkpoint_path} has sha256 {loaded.sha256}. Use the checkpoint the job ran on."
            )
        model = loaded.model.to(device).eval()
        if metadata.get("format") == WEIGHTS_FORMAT:
            state = load_safetensors(artifact)
            model.load_state_dict(state, strict=True)
            return cls(model, model, model, metadata, device)

        mask = unpack_masks(artifact)
        check_masks_fit(model, mask.masks)
        masks = {name: value.to(device) for name, value in mask.masks.items()}
        buffers = {name: value.to(device) for name, value in mask.buffers.items()}
        return cls(model, model, masked_forward(model, masks, buffers), metadata, device)

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[dict]:
        """Classify uint8 images [N, C, H, W] (any size and channel count) and score them for OOD."""
        images = conform_images(images, self.in_channels, self.input_size)
        results = []
        for start in range(0, len(images), batch_size):
            batch = self.normalization.apply(images[start : start + batch_size]).to(self.device)
            with torch.no_grad():
                probabilities = F.softmax(self._predict_forward(batch), dim=1)
            scores = self._scorer.score(batch)
            confidence, classes = probabilities.max(dim=1)
            for score, label, probability in zip(scores.tolist(), classes.tolist(), confidence.tolist()):
                results.append(
                    {
                        "ood_score": float(score),
                        "is_ood": bool(score < self.threshold),
                        "predicted_class": int(label),
                        "probability": float(probability),
                    }
                )
        return results


def check_artifact_format(metadata: dict[str, str]) -> None:
    """Raise MaskError unless the metadata is that of a UMAP mask or UM weights artifact."""
    if metadata.get("format") not in (MASK_FORMAT, WEIGHTS_FORMAT):
        raise MaskError(
            f"The file is not a UM or UMAP artifact (format {metadata.get('format')!r}). Pass the mask or "
            "weights file written by `harden um`/`harden umap` or downloaded from a job, not a checkpoint."
        )


def conform_images(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Convert uint8 images [N, C, H, W] to `channels` and a `size` x `size` side."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DatasetError(
            f"Images must be a uint8 tensor [N, C, H, W]; got {images.dtype} with shape {tuple(images.shape)}."
        )
    return convert_images(images, channels, size)


def decode_images(blobs: list[tuple[str, bytes]], channels: int, size: int) -> torch.Tensor:
    """Decode PNG/JPEG files, or `.npy` uint8 batches, into uint8 [N, channels, size, size].

    Args:
        blobs: (file name, content) pairs; a `.npy` file may hold a batch [N, H, W],
            [N, H, W, C] or [N, C, H, W].
    """
    return decode_named_images(blobs, channels, size)[0]


def decode_named_images(
    blobs: list[tuple[str, bytes]], channels: int, size: int
) -> tuple[torch.Tensor, list[str]]:
    """Decode like `decode_images` and also return a name per image (`batch.npy[3]` for arrays)."""
    if not blobs:
        raise DatasetError("No images were given: send PNG/JPEG files or .npy uint8 arrays.")
    batches = []
    names = []
    for name, content in blobs:
        if name.lower().endswith(".npy"):
            batch = conform_images(_decode_npy(name, content), channels, size)
            batches.append(batch)
            names += [f"{name}[{index}]" for index in range(len(batch))]
            continue
        try:
            with Image.open(io.BytesIO(content)) as image:
                image.load()
                mode = "L" if channels == 1 else "RGB"
                array = np.asarray(image.convert(mode))
        except (UnidentifiedImageError, OSError) as error:
            reason = str(error).split(" <_io.BytesIO", 1)[0]
            raise DatasetError(f"File {name!r} is not a readable PNG or JPEG image ({reason}).") from error
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        batches.append(conform_images(tensor.unsqueeze(0), channels, size))
        names.append(name)
    return torch.cat(batches), names


def _decode_npy(name: str, content: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(content), allow_pickle=False)
    except ValueError as error:
        raise DatasetError(f"File {name!r} is not a .npy array without pickled objects ({error}).") from error
    if array.dtype != np.uint8:
        raise DatasetError(f"File {name!r} has dtype {array.dtype}; send uint8 pixel values 0-255.")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise DatasetError(f"File {name!r} has shape {array.shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W].")
    return torch.from_numpy(np.ascontiguousarray(array))


def evaluate_checkpoint(spec: JobSpec, artifact: bytes | None = None, device: str = "cpu") -> dict:
    """Evaluate a checkpoint, optionally with a job's mask or weights, on the job's datasets.

    The datasets, the training subset that fits Mahalanobis and the hold-out split follow
    `spec.params` exactly as in `run_job`, so the numbers match the job's `hardened` metrics
    when the same spec and artifact are given.
    """
    spec.params.validate()
    data = _load_job_data(spec, device)
    model = data.loaded.model
    forward = model
    masked = False
    if artifact is not None:
        metadata = read_metadata(artifact)
        check_artifact_format(metadata)
        if metadata.get("checkpoint_sha256") != data.loaded.sha256:
            raise MaskError(
                f"The artifact was made from checkpoint sha256 {metadata.get('checkpoint_sha256')}, but "
                f"{spec.model.checkpoint_path} has sha256 {data.loaded.sha256}. Use the checkpoint the job ran on."
            )
        if metadata.get("format") == WEIGHTS_FORMAT:
            model.load_state_dict(load_safetensors(artifact), strict=True)
        else:
            mask = unpack_masks(artifact)
            check_masks_fit(model, mask.masks)
            forward = masked_forward(model, mask.masks, mask.buffers)
            masked = True
    model.eval()
    result = _evaluate_model(model, forward, data, spec.params, device)
    if masked:
        result["masked_id_accuracy"] = result["id_accuracy"]
        result["id_accuracy"] = accuracy(model, data.test, data.normalization, spec.params.batch_size, device)
    return result
