import json

import numpy as np
import pytest

from cli.main import build_parser, main


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """An npz set of 300 28x28 images whose class is the brightness of a square."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    images = rng.integers(0, 40, size=(300, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 8:20, 8:20] = 80 + 80 * label
    path = tmp_path_factory.mktemp("data") / "squares.npz"
    np.savez(path, x=images, y=labels)
    return path


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("model") / "lenet.safetensors"
    code = main(["train", "--arch", "lenet", "--dataset", f"npz:{tiny_dataset}", "--epochs", "3",
                 "--output", str(output), "--json"])
    assert code == 0
    return output


@pytest.mark.parametrize("command", ["train", "estimate", "um", "umap", "evaluate", "score", "submit", "wait"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: harden" in capsys.readouterr().out


def test_train_writes_checkpoint(trained_checkpoint):
    assert trained_checkpoint.stat().st_size > 100_000


def test_estimate_json(tiny_dataset, trained_checkpoint, capsys):
    code = main(["estimate", "--arch", "lenet", "--checkpoint", str(trained_checkpoint), "--dataset",
                 f"npz:{tiny_dataset}", "--mask-ratio", "0.9", "0.99", "--draws", "2", "--json"])
    assert code == 0
    estimates = json.loads(capsys.readouterr().out)["estimates"]
    assert [estimate["mask_ratio"] for estimate in estimates] == [0.9, 0.99]
    assert len(estimates[0]["losses"]) == 2


def test_umap_then_evaluate_and_score(tiny_dataset, trained_checkpoint, tmp_path, capsys):
    mask = tmp_path / "mask.safetensors"
    common = ["--arch", "lenet", "--checkpoint", str(trained_checkpoint), "--dataset", f"npz:{tiny_dataset}",
              "--ood", "builtin:gaussian-noise", "--scores", "energy,msp"]
    assert main(["umap", *common, "--epochs", "1", "--loss-constraint", "0.2", "--output", str(mask), "--json"]) == 0
    job = json.loads(capsys.readouterr().out)

    assert main(["evaluate", *common, "--mask", str(mask), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["scores"] == job["metrics"]["hardened"]["scores"]

    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((3, 28, 28), dtype=np.uint8))
    assert main(["score", "--arch", "lenet", "--checkpoint", str(trained_checkpoint), "--artifact", str(mask),
                 str(batch), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert len(scored["results"]) == 3
    assert scored["score_name"] == "energy"


def test_bad_dataset_reference_exits_2(trained_checkpoint, capsys):
    code = main(["estimate", "--arch", "lenet", "--checkpoint", str(trained_checkpoint), "--dataset", "nosuch:/x"])
    assert code == 2
    assert "nosuch" in capsys.readouterr().err


def test_estimate_rejects_dataset_with_more_classes(trained_checkpoint, capsys):
    code = main(["estimate", "--arch", "lenet", "--checkpoint", str(trained_checkpoint), "--dataset",
                 "builtin:mnist-5k?limit=200"])
    assert code == 2
    assert "has 10 classes but the checkpoint's classifier has 3 outputs" in capsys.readouterr().err


def test_score_missing_input_exits_2(trained_checkpoint, tmp_path, capsys):
    code = main(["score", "--arch", "lenet", "--checkpoint", str(trained_checkpoint), "--artifact",
                 str(trained_checkpoint), str(tmp_path / "nosuch.png")])
    assert code == 2
    assert "nosuch.png not found" in capsys.readouterr().err
