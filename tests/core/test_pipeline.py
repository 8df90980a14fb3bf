import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.architectures import build_model
from core.checkpoints import save_checkpoint, sha256_file
from core.datasets import load_dataset
from core.errors import Cancelled, ConfigError, DatasetError, MaskError
from core.masks import read_metadata
from core.pipeline import (
    HardeningParams,
    JobSpec,
    ModelSpec,
    Predictor,
    decode_images,
    decode_named_images,
    evaluate_checkpoint,
    run_job,
)
from tests.core.conftest import FASHION_MNIST


def job_spec(checkpoint, method: str, **params) -> JobSpec:
    settings = dict(
        epochs=1, max_train_samples=800, scores=("energy", "msp", "odin", "mahalanobis"), loss_constraint=0.3,
    )
    settings.update(params)
    return JobSpec(
        method=method,
        model=ModelSpec(arch="lenet", checkpoint_path=checkpoint),
        id_dataset=f"{FASHION_MNIST}?limit=1500",
        ood_datasets=["builtin:lfw-faces", "builtin:gaussian-noise"],
        val_ood_datasets=["builtin:sklearn-digits"],
        params=HardeningParams(**settings),
    )


@pytest.fixture(scope="module")
def umap_job(trained_lenet):
    _, checkpoint = trained_lenet
    progress = []
    result = run_job(job_spec(checkpoint, "umap"), on_progress=progress.append)
    return checkpoint, result, progress


def test_umap_job_reports_progress(umap_job):
    _, _, progress = umap_job
    stages = [event.stage for event in progress]
    assert stages[0] == "loading"
    assert "training" in stages
    assert stages[-1] == "calibrating"
    assert progress[-1].fraction == pytest.approx(1.0)
    fractions = [event.fraction for event in progress]
    assert fractions == sorted(fractions)


def test_umap_job_metrics_shape(umap_job):
    _, result, _ = umap_job
    metrics = result.metrics
    assert metrics["method"] == "umap"
    assert set(metrics["hardened"]["scores"]) == {"energy", "msp", "odin", "mahalanobis"}
    assert set(metrics["hardened"]["scores"]["energy"]["sets"]) == {"builtin:lfw-faces", "builtin:gaussian-noise"}
    assert metrics["selection"]["selected_epoch"] == 1
    assert isinstance(metrics["selection"]["beats_original"], bool)
    assert "masked_id_accuracy" in metrics["hardened"]
    # For UMAP the classes come from the original weights.
    assert metrics["hardened"]["id_accuracy"] == metrics["original"]["id_accuracy"]


def test_umap_artifact_carries_provenance(umap_job):
    checkpoint, result, _ = umap_job
    metadata = read_metadata(result.artifact)
    assert result.artifact_kind == "mask"
    assert metadata["arch"] == "lenet"
    assert metadata["prune_rate"] == "0.9"
    assert float(metadata["threshold"]) == result.threshold
    assert metadata["checkpoint_sha256"] == sha256_file(checkpoint)


def test_mask_round_trip_reproduces_metrics(umap_job):
    checkpoint, result, _ = umap_job
    evaluated = evaluate_checkpoint(job_spec(checkpoint, "umap"), result.artifact)
    assert evaluated["scores"] == result.metrics["hardened"]["scores"]
    assert evaluated["masked_id_accuracy"] == result.metrics["hardened"]["masked_id_accuracy"]


def test_predictor_threshold_keeps_95_percent_of_id(umap_job):
    checkpoint, result, _ = umap_job
    predictor = Predictor.from_artifact(ModelSpec(arch="lenet", checkpoint_path=checkpoint), result.artifact)
    test = load_dataset(f"{FASHION_MNIST}?limit=1500", channels=1, size=28, split="test")
    rows = predictor.predict(test.images[:1000])
    accepted = sum(not row["is_ood"] for row in rows) / len(rows)
    assert accepted == pytest.approx(0.95, abs=0.04)
    noise = load_dataset("builtin:uniform-noise", channels=1, size=28, split="test")
    assert sum(row["is_ood"] for row in predictor.predict(noise.images[:200])) > 150


def test_predictor_rejects_other_checkpoint(umap_job, tmp_path):
    _, result, _ = umap_job
    other = tmp_path / "other.safetensors"
    save_checkpoint(build_model("lenet", num_classes=10, in_channels=1), other)
    with pytest.raises(MaskError, match="Use the checkpoint the job ran on"):
        Predictor.from_artifact(ModelSpec(arch="lenet", checkpoint_path=other), result.artifact)


def test_um_weights_round_trip(trained_lenet):
    _, checkpoint = trained_lenet
    spec = job_spec(checkpoint, "um", scores=("energy", "msp"))
    result = run_job(spec)
    assert result.artifact_kind == "weights"
    evaluated = evaluate_checkpoint(job_spec(checkpoint, "um", scores=("energy", "msp")), result.artifact)
    assert evaluated["scores"] == result.metrics["hardened"]["scores"]
    assert evaluated["id_accuracy"] == result.metrics["hardened"]["id_accuracy"]


def test_job_cancelled_between_steps(trained_lenet):
    _, checkpoint = trained_lenet
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        run_job(job_spec(checkpoint, "umap", scores=("energy",)), should_stop=should_stop)


def test_job_rejects_unknown_method(trained_lenet):
    with pytest.raises(ConfigError, match="Method 'prune' is unknown"):
        run_job(job_spec(trained_lenet[1], "prune"))


def test_job_rejects_out_of_range_param(trained_lenet):
    with pytest.raises(ConfigError, match=r"prune_rate=1.5 is out of range"):
        run_job(job_spec(trained_lenet[1], "umap", prune_rate=1.5))


def test_job_rejects_unknown_score(trained_lenet):
    with pytest.raises(ConfigError, match=r"Unknown scores \['entropy'\]"):
        run_job(job_spec(trained_lenet[1], "umap", scores=("entropy",)))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_images_png_and_npy():
    rgb = np.full((40, 30, 3), 200, dtype=np.uint8)
    batch = np.zeros((2, 28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, batch)
    images = decode_images([("a.png", png_bytes(rgb)), ("b.npy", buffer.getvalue())], channels=1, size=28)
    assert images.shape == (3, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert int(images[0].max()) == 200


def test_decode_images_rejects_garbage():
    with pytest.raises(DatasetError, match="'x.png' is not a readable PNG or JPEG"):
        decode_images([("x.png", b"not an image")], channels=1, size=28)


def test_decode_images_rejects_float_npy():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(DatasetError, match="has dtype float32"):
        decode_images([("x.npy", buffer.getvalue())], channels=1, size=28)


def test_decode_named_images_names_each_image():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 28, 28), dtype=np.uint8))
    rgb = np.full((28, 28, 3), 10, dtype=np.uint8)
    _, names = decode_named_images([("batch.npy", buffer.getvalue()), ("a.png", png_bytes(rgb))], channels=1, size=28)
    assert names == ["batch.npy[0]", "batch.npy[1]", "a.png"]


def test_decode_images_error_has_no_object_repr():
    with pytest.raises(DatasetError) as error:
        decode_images([("x.png", b"garbage")], channels=1, size=28)
    assert "BytesIO" not in str(error.value)


def test_predictor_rejects_plain_checkpoint_as_artifact(trained_lenet):
    _, checkpoint = trained_lenet
    with pytest.raises(MaskError, match="not a UM or UMAP artifact"):
        Predictor.from_artifact(ModelSpec(arch="lenet", checkpoint_path=checkpoint), checkpoint.read_bytes())
