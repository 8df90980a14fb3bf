"""Local commands that run `core` on this machine: train, estimate, um, umap, evaluate, score."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from core.architectures import ARCHITECTURES, build_model
from core.checkpoints import load_model, save_checkpoint
from core.datasets import load_dataset
from core.errors import DatasetError
from core.evaluate import accuracy
from core.hardening import TrainingControl, estimate_loss_constraint, train_classifier
from core.pipeline import (
    SERVING_SCORES,
    HardeningParams,
    JobSpec,
    ModelSpec,
    Predictor,
    Progress,
    check_classes_fit,
    decode_named_images,
    evaluate_checkpoint,
    resolve_normalization,
    run_job,
    same_images,
)
from core.scores import SCORES

logger = logging.getLogger(__name__)
DEFAULT_SCORES = ",".join(HardeningParams().scores)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the local commands on the `harden` parser."""
    train = subparsers.add_parser("train", help="train a baseline classifier from scratch")
    _add_model_options(train, checkpoint=False)
    train.add_argument("--dataset", required=True, help="ID dataset reference, e.g. fashion-mnist:DIR")
    train.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    train.add_argument("--lr", type=float, default=0.05, help="initial SGD learning rate (default 0.05)")
    train.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    train.add_argument("--num-classes", type=int, default=None, help="output classes (default: from the dataset)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--output", type=Path, required=True, help="checkpoint to write (.safetensors or .pt)")
    train.set_defaults(func=_train)

    estimate = subparsers.add_parser("estimate", help="estimate the loss constraint c with random masks")
    _add_model_options(estimate)
    estimate.add_argument("--dataset", required=True, help="ID training set reference")
    estimate.add_argument(
        "--mask-ratio", type=float, nargs="+", default=[0.95, 0.975, 0.99],
        help="kept fractions to try (default 0.95 0.975 0.99)",
    )
    estimate.add_argument("--draws", type=int, default=3, help="random masks per ratio (default 3)")
    estimate.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    estimate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    estimate.set_defaults(func=_estimate)

    for method, help_text in (
        ("um", "fine-tune the weights with the UM loss |CE - c| + c"),
        ("umap", "learn a UMAP mask over the frozen weights with the UM loss"),
    ):
        command = subparsers.add_parser(method, help=help_text)
        _add_model_options(command)
        _add_job_options(command)
        command.add_argument("--output", type=Path, required=True, help="artifact to write (.safetensors)")
        command.add_argument("--metrics-output", type=Path, help="also write the metrics as JSON here")
        command.set_defaults(func=_run_method, method=method)

    evaluate = subparsers.add_parser("evaluate", help="ID accuracy and OOD metrics of a model, mask or weights")
    _add_model_options(evaluate)
    _add_job_options(evaluate)
    artifact = evaluate.add_mutually_exclusive_group()
    artifact.add_argument("--mask", type=Path, help="UMAP mask file to evaluate")
    artifact.add_argument("--weights", type=Path, help="UM weights file to evaluate")
    evaluate.set_defaults(func=_evaluate)

    score = subparsers.add_parser("score", help="classify images and score them for OOD")
    _add_model_options(score)
    score.add_argument("--artifact", type=Path, required=True, help="mask or weights file from a UMAP or UM run")
    score.add_argument("inputs", type=Path, nargs="+", help="PNG/JPEG files or one .npy uint8 batch")
    score.set_defaults(func=_score)


def _add_model_options(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        parser.add_argument("--checkpoint", type=Path, required=True, help="state_dict file (.pt/.pth or .safetensors)")
        parser.add_argument("--num-classes", type=int, help="classifier outputs (default: read from the checkpoint)")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES), metavar="ARCH",
                        help=f"architecture: {', '.join(sorted(ARCHITECTURES))}")
    parser.add_argument("--in-channels", type=int, help="input channels (default: the architecture's)")
    parser.add_argument("--input-size", type=int, help="input side in pixels (default: the architecture's)")
    parser.add_argument("--mean", type=_floats, help="per-channel mean, comma-separated (default: the dataset's)")
    parser.add_argument("--std", type=_floats, help="per-channel std, comma-separated (default: the dataset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    defaults = HardeningParams()
    parser.add_argument("--dataset", required=True, help="ID dataset reference; its train and test splits are used")
    parser.add_argument("--ood", nargs="*", default=[], help="test OOD set references (measure only)")
    parser.add_argument("--val-ood", nargs="*", default=[], help="validation OOD set references (select the epoch)")
    parser.add_argument("--mask-ratio", type=float, default=defaults.mask_ratio,
                        help=f"kept fraction for estimating c (default {defaults.mask_ratio})")
    parser.add_argument("--loss-constraint", type=float, help="c; estimated from --mask-ratio when not given")
    parser.add_argument("--prune-rate", type=float, default=defaults.prune_rate,
                        help=f"UMAP: kept fraction of each layer (default {defaults.prune_rate})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"epochs (default {defaults.epochs})")
    parser.add_argument("--lr", type=float, help="learning rate (default 0.01 for UM, 1e-3 for UMAP)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    parser.add_argument("--scores", type=_names, default=defaults.scores,
                        help=f"comma-separated scores from {sorted(SCORES)} (default {DEFAULT_SCORES})")
    parser.add_argument("--selection-score", default=defaults.selection_score, choices=SERVING_SCORES,
                        help=f"score that selects the epoch and sets the threshold (default {defaults.selection_score})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default 0)")
    parser.add_argument("--max-train-samples", type=int, help="train on a random subset of this size")
    parser.add_argument("--estimate-draws", type=int, default=defaults.estimate_draws,
                        help=f"random masks drawn to estimate c (default {defaults.estimate_draws})")
    parser.add_argument("--holdout-fraction", type=float, default=defaults.holdout_fraction,
                        help=f"ID training share held out for selection and calibration (default {defaults.holdout_fraction})")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from error


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        arch=args.arch, checkpoint_path=args.checkpoint, num_classes=args.num_classes, in_channels=args.in_channels,
        input_size=args.input_size, mean=args.mean, std=args.std,
    )


def _job_spec(args: argparse.Namespace, method: str) -> JobSpec:
    params = HardeningParams(
        mask_ratio=args.mask_ratio, loss_constraint=args.loss_constraint, prune_rate=args.prune_rate,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, scores=tuple(args.scores),
        selection_score=args.selection_score, seed=args.seed, max_train_samples=args.max_train_samples,
        holdout_fraction=args.holdout_fraction, estimate_draws=args.estimate_draws,
    )
    return JobSpec(
        method=method, model=_model_spec(args), id_dataset=args.dataset, ood_datasets=list(args.ood),
        val_ood_datasets=list(args.val_ood), params=params,
    )


def _emit(args: argparse.Namespace, payload: dict, table: str) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)


# --------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    spec = ARCHITECTURES[args.arch]
    channels = args.in_channels or spec.in_channels
    size = args.input_size or spec.input_size
    data = load_dataset(args.dataset, channels=channels, size=size, split="train")
    test = load_dataset(args.dataset, channels=channels, size=size, split="test")
    if same_images(data, test):
        logger.warning("%s has no separate test split: the test accuracy below is measured on the training images",
                       args.dataset)
    num_classes = args.num_classes or data.num_classes or int(data.labels.max()) + 1
    normalization = resolve_normalization(
        ModelSpec(arch=args.arch, checkpoint_path=args.output, mean=args.mean, std=args.std), args.dataset, channels
    )
    model = build_model(args.arch, num_classes=num_classes, in_channels=channels).to(args.device)

    epochs = []
    with tqdm(total=args.epochs, desc="train", unit="epoch", disable=args.json) as bar:
        def on_epoch(record) -> None:
            test_accuracy = accuracy(model, test, normalization, 256, args.device)
            epochs.append({"epoch": record.epoch, "loss": record.loss, "test_accuracy": test_accuracy})
            bar.set_postfix(loss=f"{record.loss:.3f}", test_acc=f"{test_accuracy:.4f}")
            bar.update(1)

        train_classifier(
            model, data, normalization, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
            device=args.device, control=TrainingControl(on_epoch=on_epoch),
        )
    save_checkpoint(model.cpu(), args.output)
    lines = [f"epoch {row['epoch']}: loss {row['loss']:.4f}, test accuracy {row['test_accuracy']:.4f}" for row in epochs]
    lines.append(f"wrote {args.output}")
    _emit(args, {"checkpoint": str(args.output), "num_classes": num_classes, "epochs": epochs}, "\n".join(lines))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    loaded = load_model(args.checkpoint, args.arch, num_classes=args.num_classes, in_channels=args.in_channels)
    size = args.input_size or ARCHITECTURES[args.arch].input_size
    data = load_dataset(args.dataset, channels=loaded.in_channels, size=size, split="train")
    check_classes_fit(data, loaded.num_classes, args.dataset)
    normalization = resolve_normalization(_model_spec(args), args.dataset, loaded.in_channels)
    total = args.draws * len(args.mask_ratio)
    with tqdm(total=total, desc="estimate", unit="mask", disable=args.json) as bar:
        estimates = estimate_loss_constraint(
            loaded.model.to(args.device), data, normalization, args.mask_ratio, draws=args.draws, seed=args.seed,
            batch_size=args.batch_size, device=args.device, on_draw=lambda done, _: bar.update(done - bar.n),
        )
    lines = ["mask_ratio  c (mean +- std)     masked accuracy"]
    lines += [f"{e.mask_ratio:<10}  {e.mean:.4f} +- {e.std:.4f}   {e.accuracy:.4f}" for e in estimates]
    _emit(args, {"estimates": [estimate.as_dict() for estimate in estimates]}, "\n".join(lines))
    return 0


def _run_method(args: argparse.Namespace) -> int:
    spec = _job_spec(args, args.method)
    bar_format = "{l_bar}{bar}| {elapsed}<{remaining} {postfix}"
    with tqdm(total=1000, desc=args.method, disable=args.json, bar_format=bar_format, mininterval=1.0) as bar:
        def on_progress(progress: Progress) -> None:
            advance = int(progress.fraction * 1000) - bar.n
            if advance <= 0 and progress.stage == getattr(bar, "stage", None):
                return
            bar.stage = progress.stage
            bar.update(max(0, advance))
            postfix = {"stage": progress.stage}
            if progress.epoch is not None:
                postfix["epoch"] = f"{progress.epoch}/{progress.epochs}"
            if progress.loss is not None:
                postfix["loss"] = f"{progress.loss:.4f}"
            bar.set_postfix(postfix, refresh=False)

        result = run_job(spec, on_progress=on_progress, device=args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(result.artifact)
    if args.metrics_output:
        args.metrics_output.write_text(json.dumps(result.metrics, indent=2))
    table = format_comparison(result.metrics)
    table += f"\nwrote {result.artifact_kind} {args.output} (sha256 {result.artifact_sha256})"
    _emit(args, {"artifact": str(args.output), "sha256": result.artifact_sha256, "metrics": result.metrics}, table)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    spec = _job_spec(args, "um")
    artifact_path = args.mask or args.weights
    artifact = artifact_path.read_bytes() if artifact_path else None
    result = evaluate_checkpoint(spec, artifact, device=args.device)
    lines = [f"ID accuracy: {result['id_accuracy']:.4f}"]
    if "masked_id_accuracy" in result:
        lines.append(f"masked ID accuracy: {result['masked_id_accuracy']:.4f}")
    lines.append(format_table(result["scores"]))
    _emit(args, result, "\n".join(lines))
    return 0


def _score(args: argparse.Namespace) -> int:
    for path in [args.artifact, *args.inputs]:
        if not path.is_file():
            raise DatasetError(f"File {path} not found: check the path.")
    predictor = Predictor.from_artifact(_model_spec(args), args.artifact.read_bytes(), device=args.device)
    blobs = [(path.name, path.read_bytes()) for path in args.inputs]
    images, names = decode_named_images(blobs, predictor.in_channels, predictor.input_size)
    results = predictor.predict(images)
    if args.json:
        payload = {"score_name": predictor.score_name, "threshold": predictor.threshold,
                   "results": [{"input": name, **row} for name, row in zip(names, results)]}
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{predictor.score_name} threshold {predictor.threshold:.4f} (below it: OOD)")
    for name, row in zip(names, results):
        verdict = "OOD" if row["is_ood"] else "in-distribution"
        print(f"{name}: {verdict:<16} score {row['ood_score']:9.4f}  class {row['predicted_class']} "
              f"(p={row['probability']:.3f})")
    return 0


# --------------------------------------------------------------------------------------------


def format_table(scores: dict) -> str:
    """Format a `score_table` result: one row per score and OOD set, then the averages."""
    lines = [f"{'score':<12} {'OOD set':<34} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>9} {'FPR95':>7}"]
    for score, entry in scores.items():
        rows = list(entry["sets"].items()) + [("average", entry["average"]), ("average (no noise)", entry["average_real"])]
        for name, metrics in rows:
            if not metrics:
                continue
            lines.append(
                f"{score:<12} {name:<34} {100 * metrics['auroc']:7.2f} {100 * metrics['aupr_in']:8.2f} "
                f"{100 * metrics['aupr_out']:9.2f} {100 * metrics['fpr95']:7.2f}"
            )
    return "\n".join(lines)


def format_comparison(metrics: dict) -> str:
    """Format a job's before/after table of averaged metrics (percent)."""
    original, hardened = metrics["original"], metrics["hardened"]
    constraint = metrics["loss_constraint"]
    constraint_text = "none (plain fine-tuning)" if constraint is None else f"{constraint:.4f}"
    lines = [
        f"loss constraint c = {constraint_text}; selected epoch {metrics['selection']['selected_epoch']}",
        metrics["selection"]["summary"],
        f"ID accuracy: original {100 * original['id_accuracy']:.2f} %, hardened {100 * hardened['id_accuracy']:.2f} %",
        f"{'score':<12} {'':<9} {'AUROC':>7} {'FPR95':>7}   (averaged over the test OOD sets)",
    ]
    for score in hardened["scores"]:
        for label, block in (("original", original), ("hardened", hardened)):
            average = block["scores"][score]["average"]
            if average:
                lines.append(f"{score:<12} {label:<9} {100 * average['auroc']:7.2f} {100 * average['fpr95']:7.2f}")
    return "\n".join(lines)
