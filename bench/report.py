"""Write `docs/benchmarks.md` from the summary that `bench.run` stores."""

from __future__ import annotations

import statistics
from pathlib import Path

LABELS = {"original": "original", "finetune": "CE fine-tuning (control)", "um": "UM", "umap": "UMAP"}
PAPER_CIFAR10 = (
    "The paper reports, for DenseNet-101 on CIFAR-10 with the Energy score averaged over its six OOD "
    "sets: FPR95 42.69 % for the original model, 33.29 % after UM and 30.71 % after UMAP."
)


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """Format values as `mean ± std` (population std over seeds), in percent by default."""
    values = [scale * value for value in values if value is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def method_blocks(run: dict) -> dict[str, dict]:
    """Return the evaluation block of each method and of the original model for one seed."""
    blocks = {"original": run["methods"]["um"]["original"]}
    for method, metrics in run["methods"].items():
        blocks[method] = metrics["hardened"]
    return blocks


def write_report(summary: dict, path: Path) -> None:
    runs = summary["runs"]
    lines = [
        "# Benchmarks",
        "",
        "Figures measured by `bench/run.py` (UM and UMAP on real Fashion-MNIST) and "
        "`bench/step_time.py` (step cost). Regenerate with the command below; this page is "
        "written by the script, so edit `bench/report.py` rather than the tables.",
        "",
        f"- Command: `{summary['command']}`",
        f"- Machine: {summary['machine']}",
        f"- Wall time: {summary['wall_seconds'] / 60:.1f} minutes",
        f"- Seeds: {', '.join(str(seed) for seed in summary['seeds'])}; mean ± std over seeds (population std)",
        f"- Model: LeNet trained from scratch for {summary['baseline_epochs']} epochs on the Fashion-MNIST "
        f"training split ({'all 60,000 images' if not summary['max_train_samples'] else str(summary['max_train_samples']) + ' images'}), "
        "SGD with Nesterov momentum, lr 0.05, cosine schedule",
        f"- Hardening: {summary['epochs']} epochs each; c from random masks keeping "
        f"{summary['mask_ratio']} of each layer (3 draws); UMAP keeps {summary['prune_rate']} of each layer; "
        "the control is plain cross-entropy fine-tuning with UM's optimiser and schedule",
        f"- Test OOD sets (measure only): {', '.join(summary['test_ood'])}",
        f"- Validation OOD set (selects the epoch, with 10 % of the ID training split held out): "
        f"{', '.join(summary['validation_ood'])}, its disjoint `split=train` half",
        "- ID test set: the Fashion-MNIST test split (10,000 images)",
        "",
    ]
    lines += verdict_section(runs)
    lines += baseline_section(runs)
    lines += estimate_section(runs)
    lines += main_table(runs)
    lines += per_set_table(runs)
    lines += selection_table(runs)
    lines += timing_section(summary["timing"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def verdict_section(runs: list[dict]) -> list[str]:
    lines = ["## What reproduces", "", PAPER_CIFAR10, ""]
    for method in ("um", "umap", "finetune"):
        before, after, better = [], [], 0
        for run in runs:
            blocks = method_blocks(run)
            original = blocks["original"]["scores"]["energy"]["average_real"]["fpr95"]
            hardened = blocks[method]["scores"]["energy"]["average_real"]["fpr95"]
            before.append(original)
            after.append(hardened)
            better += hardened < original
        lines.append(
            f"- {LABELS[method]}: Energy FPR95 averaged over the real test OOD sets went from "
            f"{mean_std(before)} % to {mean_std(after)} %, lower on {better} of {len(runs)} seeds."
        )
    lines += [
        "",
        "Lower FPR95 is better. A method helps only where it beats both the original model and the "
        "fine-tuning control across seeds; the seed-to-seed spread in the tables below is of the "
        "same order as most differences, so read single numbers with care.",
        "",
    ]
    return lines


def baseline_section(runs: list[dict]) -> list[str]:
    lines = [
        "## Baseline training: OOD detection per epoch",
        "",
        "Energy score against the test OOD sets after each training epoch (for the paper's "
        "observation that an intermediate epoch detects OOD inputs better than the last; these "
        "test-set figures choose nothing).",
        "",
        "| epoch | ID accuracy % | FPR95 % (real sets) | FPR95 % (all sets) | AUROC % (real sets) |",
        "|---|---|---|---|---|",
    ]
    epochs = len(runs[0]["baseline_epochs"])
    for index in range(epochs):
        rows = [run["baseline_epochs"][index] for run in runs]
        lines.append(
            f"| {index + 1} | {mean_std([r['id_accuracy'] for r in rows])} | {mean_std([r['fpr95_real'] for r in rows])} "
            f"| {mean_std([r['fpr95_all'] for r in rows])} | {mean_std([r['auroc_real'] for r in rows])} |"
        )
    best = []
    for run in runs:
        values = [row["fpr95_real"] for row in run["baseline_epochs"]]
        best.append((values.index(min(values)) + 1, min(values), values[-1]))
    lines += [
        "",
        "Epoch with the lowest FPR95 (real sets) per seed: "
        + "; ".join(f"seed {run['seed']}: epoch {b[0]} ({100 * b[1]:.2f} % against {100 * b[2]:.2f} % at the last)"
                    for run, b in zip(runs, best))
        + ".",
        "",
    ]
    return lines


def estimate_section(runs: list[dict]) -> list[str]:
    lines = [
        "## Loss constraint c by kept fraction",
        "",
        "Mean cross-entropy of the randomly masked model in eval mode over the training set "
        "(3 masks per seed; the std column is the spread over all masks of all seeds).",
        "",
        "| kept fraction δ | c | c std over masks | masked accuracy % |",
        "|---|---|---|---|",
    ]
    for index, estimate in enumerate(runs[0]["estimates"]):
        losses = [loss for run in runs for loss in run["estimates"][index]["losses"]]
        accuracies = [run["estimates"][index]["accuracy"] for run in runs]
        lines.append(
            f"| {estimate['mask_ratio']} | {statistics.mean(losses):.4f} | {statistics.pstdev(losses):.4f} "
            f"| {mean_std(accuracies)} |"
        )
    lines += ["", "The paper's values for comparison: c ≈ 0.10 at δ = 0.975 on CIFAR-10, ≈ 1.2 at 0.97 on CIFAR-100.", ""]
    return lines


def main_table(runs: list[dict]) -> list[str]:
    lines = [
        "## OOD detection before and after, averaged over the test OOD sets",
        "",
        "FPR95 (lower is better) and AUROC in percent; `real` leaves out the two noise sets. "
        "For UMAP, ID accuracy is the original weights' (the mask only drives the OOD score); "
        "the masked model's own accuracy is listed after the slash.",
        "",
        "| score | model | ID accuracy % | FPR95 % real | FPR95 % all | AUROC % real | AUROC % all |",
        "|---|---|---|---|---|---|---|",
    ]
    scores = list(method_blocks(runs[0])["original"]["scores"])
    for score in scores:
        for model in ("original", "finetune", "um", "umap"):
            blocks = [method_blocks(run)[model] for run in runs]
            accuracy = mean_std([block["id_accuracy"] for block in blocks])
            if "masked_id_accuracy" in blocks[0]:
                accuracy += " / " + mean_std([block["masked_id_accuracy"] for block in blocks])
            entries = [block["scores"][score] for block in blocks]
            lines.append(
                f"| {score} | {LABELS[model]} | {accuracy} "
                f"| {mean_std([e['average_real']['fpr95'] for e in entries])} "
                f"| {mean_std([e['average']['fpr95'] for e in entries])} "
                f"| {mean_std([e['average_real']['auroc'] for e in entries])} "
                f"| {mean_std([e['average']['auroc'] for e in entries])} |"
            )
    lines.append("")
    return lines


def per_set_table(runs: list[dict]) -> list[str]:
    sets = list(method_blocks(runs[0])["original"]["scores"]["energy"]["sets"])
    lines = [
        "## Energy FPR95 % per test OOD set",
        "",
        "| model | " + " | ".join(name.split(":", 1)[-1] for name in sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for model in ("original", "finetune", "um", "umap"):
        cells = []
        for name in sets:
            cells.append(mean_std([method_blocks(run)[model]["scores"]["energy"]["sets"][name]["fpr95"] for run in runs]))
        lines.append(f"| {LABELS[model]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def selection_table(runs: list[dict]) -> list[str]:
    lines = [
        "## Epoch selection on validation data",
        "",
        "| seed | method | selected epoch | validation FPR95 % original → selected | beats original on validation |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        for method, metrics in run["methods"].items():
            selection = metrics["selection"]
            history = {row["epoch"]: row for row in metrics["history"]}
            chosen = history[selection["selected_epoch"]]["validation_fpr95"]
            lines.append(
                f"| {run['seed']} | {LABELS[method]} | {selection['selected_epoch']} "
                f"| {100 * selection['original_validation_fpr95']:.2f} → {100 * chosen:.2f} "
                f"| {'yes' if selection['beats_original'] else 'no'} |"
            )
    lines.append("")
    return lines


def timing_section(timing: list[dict]) -> list[str]:
    lines = [
        "## Step time",
        "",
        "Median seconds per optimiser step over interleaved rounds (30 for LeNet, 10 for the "
        "ResNet), same model object and "
        "batch (`python -m bench.step_time`). Target: a UMAP step costs at most 1.15× a plain "
        "fine-tuning step. The quantile column is a UMAP step whose per-layer thresholds come "
        "from `torch.quantile` on every forward pass, as in the paper's code.",
        "",
        "| model | batch | fine-tuning s | UMAP s | UMAP (quantile) s | UMAP / fine-tuning | quantile / UMAP |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in timing:
        seconds = case["seconds"]
        lines.append(
            f"| {case['arch']} | {case['batch_size']} | {seconds['finetune']:.4f} | {seconds['umap']:.4f} "
            f"| {seconds['umap_quantile']:.4f} | {case['umap_over_finetune']:.2f}× | {case['quantile_over_umap']:.2f}× |"
        )
    lines.append("")
    return lines


def main() -> None:
    """Rewrite the report from saved results, with fresh step timings.

    Useful when `bench.run` was stopped after some seeds, because `runs.json` contains every
    finished seed.
    """
    import argparse
    import json
    import time

    from bench.run import VALIDATION_OOD, TEST_OOD, machine_description
    from bench.step_time import measure_step_times
    from core.pipeline import HardeningParams

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="runs.json written by bench.run")
    parser.add_argument("--report", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to write")
    parser.add_argument("--command", default="make bench", help="command shown in the report")
    parser.add_argument("--wall-minutes", type=float, required=True, help="wall time of the benchmark run")
    args = parser.parse_args()

    runs = json.loads(args.runs.read_text())
    first = runs[0]["methods"]["um"]
    started = time.time()
    summary = {
        "command": args.command,
        "machine": machine_description(),
        "seeds": [run["seed"] for run in runs],
        "baseline_epochs": len(runs[0]["baseline_epochs"]),
        "epochs": len(first["history"]),
        "mask_ratio": 0.975,
        "prune_rate": HardeningParams().prune_rate,
        "max_train_samples": None if first["train_size"] > 50_000 else first["train_size"],
        "test_ood": TEST_OOD,
        "validation_ood": VALIDATION_OOD,
        "runs": runs,
        "timing": measure_step_times(),
    }
    summary["wall_seconds"] = 60 * args.wall_minutes + (time.time() - started)
    write_report(summary, args.report)


if __name__ == "__main__":
    main()
