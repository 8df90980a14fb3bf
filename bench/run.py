"""Benchmark: UM and UMAP on real Fashion-MNIST against the original model and a fine-tuning control.

For every seed it trains a LeNet baseline and records Energy FPR95 and AUROC on the test OOD sets
after each epoch. It estimates the loss constraint c over several kept fractions, then runs UM,
UMAP and plain cross-entropy fine-tuning with UM's schedule. Each run selects its epoch on the
validation OOD set and a held-out slice of the training set only. The tables in
`docs/benchmarks.md` are written from the JSON this script stores under `bench/output/`.

    python -m bench.run --seeds 0 1 2      # the full benchmark (about 25 minutes on 2 CPU cores)
    python -m bench.run --quick            # one seed, fewer epochs and samples (minutes)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.report import write_report
from bench.step_time import measure_step_times
from core.architectures import build_model
from core.checkpoints import save_checkpoint
from core.datasets import default_normalization, load_dataset, subset
from core.evaluate import accuracy, average_metrics, compute_scores, is_noise_set
from core.hardening import TrainingControl, estimate_loss_constraint, train_classifier
from core.metrics import ood_metrics
from core.pipeline import HardeningParams, JobSpec, ModelSpec, run_job
from core.scores import make_scorer

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "fashion-mnist:/usr/share/datasets/fashion-mnist"
TEST_OOD = [
    "builtin:mnist-5k",
    "builtin:skimage-textures",
    "builtin:skimage-natural",
    "builtin:lfw-faces",
    "builtin:gaussian-noise",
    "builtin:uniform-noise",
]
VALIDATION_OOD = ["builtin:sklearn-digits"]
SCORES = ("msp", "maxlogit", "energy", "odin", "mahalanobis")
MASK_RATIOS = [0.9, 0.95, 0.975, 0.99]
METHODS = ("finetune", "um", "umap")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    parser.add_argument("--quick", action="store_true", help="one seed, short schedules, smaller training set")
    parser.add_argument("--baseline-epochs", type=int, default=8, help="baseline training epochs (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="UM / UMAP / control epochs (default 3)")
    parser.add_argument("--mask-ratio", type=float, default=0.975, help="kept fraction that sets c (default 0.975)")
    parser.add_argument("--prune-rate", type=float, default=HardeningParams().prune_rate, help="UMAP kept fraction")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "output", help="where results go")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown report to write")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.seeds = args.seeds[:1]
        args.baseline_epochs, args.epochs = 3, 2
    max_train = 10_000 if args.quick else None
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.time()

    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args, max_train))
        (args.output / "runs.json").write_text(json.dumps(runs, indent=2))

    timing = measure_step_times()
    summary = {
        "command": "make bench-quick" if args.quick else "make bench",
        "machine": machine_description(),
        "seeds": args.seeds,
        "baseline_epochs": args.baseline_epochs,
        "epochs": args.epochs,
        "mask_ratio": args.mask_ratio,
        "prune_rate": args.prune_rate,
        "max_train_samples": max_train,
        "test_ood": TEST_OOD,
        "validation_ood": VALIDATION_OOD,
        "runs": runs,
        "timing": timing,
        "wall_seconds": time.time() - started,
    }
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(summary, args.report)
    logger.info("wrote %s in %.0f s", args.report, summary["wall_seconds"])


def run_seed(seed: int, args: argparse.Namespace, max_train: int | None) -> dict:
    """Train a baseline for one seed, estimate c and run the three methods on it."""
    seed_dir = args.output / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    train = load_dataset(FASHION_MNIST, channels=1, size=28, split="train")
    test = load_dataset(FASHION_MNIST, channels=1, size=28, split="test")
    if max_train is not None:
        train = subset(train, max_train, seed)
    normalization = default_normalization(FASHION_MNIST, 1)
    ood_sets = {reference: load_dataset(reference, channels=1, size=28, split="test") for reference in TEST_OOD}

    model = build_model("lenet", num_classes=10, in_channels=1)
    epoch_rows = []
    with tqdm(total=args.baseline_epochs, desc=f"seed {seed} baseline", unit="epoch") as bar:
        def on_epoch(record) -> None:
            row = {"epoch": record.epoch, "loss": record.loss}
            row.update(energy_summary(model, test, ood_sets, normalization))
            epoch_rows.append(row)
            bar.set_postfix(acc=f"{row['id_accuracy']:.4f}", fpr95=f"{row['fpr95_real']:.3f}")
            bar.update(1)

        train_classifier(
            model, train, normalization, epochs=args.baseline_epochs, seed=seed,
            control=TrainingControl(on_epoch=on_epoch),
        )
    checkpoint = seed_dir / "baseline.safetensors"
    save_checkpoint(model, checkpoint)

    estimates = estimate_loss_constraint(model, train, normalization, MASK_RATIOS, draws=3, seed=seed)
    constraint = next(estimate.mean for estimate in estimates if estimate.mask_ratio == args.mask_ratio)

    results = {}
    # NOTE: each run_job evaluates the original model again (three times per seed), which costs
    # about a minute per seed but keeps every method's report self-contained.
    for method in METHODS:
        spec = JobSpec(
            method=method,
            model=ModelSpec(arch="lenet", checkpoint_path=checkpoint),
            id_dataset=FASHION_MNIST,
            ood_datasets=TEST_OOD,
            val_ood_datasets=VALIDATION_OOD,
            params=HardeningParams(
                loss_constraint=constraint, prune_rate=args.prune_rate, epochs=args.epochs, scores=SCORES,
                seed=seed, max_train_samples=max_train,
            ),
        )
        with tqdm(total=100, desc=f"seed {seed} {method}", unit="%") as bar:
            result = run_job(spec, on_progress=lambda progress: bar.update(int(100 * progress.fraction) - bar.n))
        results[method] = result.metrics
        (seed_dir / f"{method}.json").write_text(json.dumps(result.metrics, indent=2))
    return {
        "seed": seed,
        "baseline_epochs": epoch_rows,
        "estimates": [estimate.as_dict() for estimate in estimates],
        "loss_constraint": constraint,
        "methods": results,
    }


def energy_summary(model, test, ood_sets, normalization) -> dict:
    """Return ID accuracy and Energy FPR95 / AUROC averaged over the OOD sets, with and without noise."""
    model.eval()
    scorer = make_scorer("energy", model)
    id_scores = compute_scores(scorer, test, normalization, 512, "cpu")
    per_set = {name: ood_metrics(id_scores, compute_scores(scorer, data, normalization, 512, "cpu"))
               for name, data in ood_sets.items()}
    everything = average_metrics(per_set)
    real = average_metrics({name: value for name, value in per_set.items() if not is_noise_set(name)})
    return {
        "id_accuracy": accuracy(model, test, normalization, 512, "cpu"),
        "fpr95_all": everything["fpr95"],
        "auroc_all": everything["auroc"],
        "fpr95_real": real["fpr95"],
        "auroc_real": real["auroc"],
        "fpr95_per_set": {name: value["fpr95"] for name, value in per_set.items()},
    }


def machine_description() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, CPU only"
    )


if __name__ == "__main__":
    main()
