import copy

import pytest
import torch

from core.datasets import load_dataset
from core.errors import ConfigError
from core.evaluate import accuracy, validation_metrics
from core.hardening import (
    TrainingControl,
    constrained_loss,
    estimate_loss_constraint,
    fine_tune,
    learn_mask,
)
from core.masks import kept_fraction


def test_constrained_loss_above_constraint_is_cross_entropy():
    cross_entropy = torch.tensor(0.8, requires_grad=True)
    loss = constrained_loss(cross_entropy, 0.3)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.8)
    assert float(cross_entropy.grad) == 1.0


def test_constrained_loss_below_constraint_ascends():
    cross_entropy = torch.tensor(0.1, requires_grad=True)
    loss = constrained_loss(cross_entropy, 0.3)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.5)
    assert float(cross_entropy.grad) == -1.0


def test_estimate_grows_as_fewer_weights_kept(trained_lenet, fashion_subset):
    model, _ = trained_lenet
    train, _, normalization = fashion_subset
    estimates = estimate_loss_constraint(model, train, normalization, [0.99, 0.6], draws=3, seed=0)
    assert [len(estimate.losses) for estimate in estimates] == [3, 3]
    assert estimates[1].mean > estimates[0].mean
    assert estimates[1].accuracy < estimates[0].accuracy


def test_estimate_is_deterministic_per_seed(trained_lenet, fashion_subset):
    model, _ = trained_lenet
    train, _, normalization = fashion_subset
    first = estimate_loss_constraint(model, train, normalization, [0.9], draws=2, seed=5)[0]
    second = estimate_loss_constraint(model, train, normalization, [0.9], draws=2, seed=5)[0]
    assert first.losses == second.losses


def test_estimate_rejects_zero_draws(trained_lenet, fashion_subset):
    model, _ = trained_lenet
    train, _, normalization = fashion_subset
    with pytest.raises(ConfigError, match="draws=0 is invalid"):
        estimate_loss_constraint(model, train, normalization, [0.9], draws=0)


def test_um_one_epoch_reports_progress(trained_lenet, fashion_subset):
    model = copy.deepcopy(trained_lenet[0])
    train, test, normalization = fashion_subset
    original_accuracy = accuracy(model, test, normalization, 256, "cpu")
    steps = []
    result = fine_tune(
        model, train, normalization, loss_constraint=0.3, epochs=1, batch_size=128,
        control=TrainingControl(on_step=steps.append),
    )
    assert len(steps) == 16
    assert steps[-1].loss_constraint == 0.3
    assert 0.0 <= steps[-1].ascent_share <= 1.0
    assert result.method == "um"
    assert result.selected_epoch == 1
    assert result.beats_original is None
    assert original_accuracy > 0.7
    assert accuracy(model, test, normalization, 256, "cpu") > original_accuracy - 0.1


def test_um_changes_weights(trained_lenet, fashion_subset):
    model = copy.deepcopy(trained_lenet[0])
    train, _, normalization = fashion_subset
    fine_tune(model, train, normalization, loss_constraint=0.3, epochs=1)
    assert not torch.equal(model.fc.weight, trained_lenet[0].fc.weight)


def test_um_stops_when_asked(trained_lenet, fashion_subset):
    model = copy.deepcopy(trained_lenet[0])
    train, _, normalization = fashion_subset
    steps = []
    control = TrainingControl(on_step=steps.append, should_stop=lambda: len(steps) >= 3)
    result = fine_tune(model, train, normalization, loss_constraint=0.3, epochs=2, control=control)
    assert len(steps) == 3
    assert result.stopped_early


def test_umap_one_epoch_learns_mask(trained_lenet, fashion_subset):
    model, _ = trained_lenet
    model.zero_grad(set_to_none=True)
    before = copy.deepcopy(model.state_dict())
    train, test, normalization = fashion_subset
    steps = []
    result = learn_mask(
        model, train, normalization, loss_constraint=0.3, prune_rate=0.9, epochs=1,
        control=TrainingControl(on_step=steps.append),
    )
    assert kept_fraction(result.masks) == pytest.approx(0.9, abs=1e-3)
    assert result.history[0].flipped > 0.0
    assert steps[-1].flipped == result.history[0].flipped
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_umap_selects_epoch_on_validation(trained_lenet, fashion_subset):
    model, _ = trained_lenet
    train, test, normalization = fashion_subset
    val_ood = {"builtin:sklearn-digits": load_dataset("builtin:sklearn-digits", channels=1, size=28, split="train")}

    def validate(forward):
        return validation_metrics(model, forward, test, val_ood, "energy", normalization)

    result = learn_mask(
        model, train, normalization, loss_constraint=0.3, prune_rate=0.9, epochs=2, validate=validate,
    )
    best = min(result.history, key=lambda record: record.selection_key())
    assert result.selected_epoch == best.epoch
    assert result.original_validation_fpr95 is not None
    assert result.beats_original == (best.selection_key() < (result.original_validation_fpr95, -result.original_validation_auroc))
    assert str(result.selected_epoch) in result.summary()


def test_um_resumes_from_saved_state(trained_lenet, fashion_subset, tmp_path):
    train, _, normalization = fashion_subset
    uninterrupted = copy.deepcopy(trained_lenet[0])
    fine_tune(uninterrupted, train, normalization, loss_constraint=0.3, epochs=2)

    state_path = tmp_path / "state.pt"
    interrupted = copy.deepcopy(trained_lenet[0])
    steps = []
    stop_in_second_epoch = TrainingControl(on_step=steps.append, should_stop=lambda: len(steps) >= 20)
    first = fine_tune(
        interrupted, train, normalization, loss_constraint=0.3, epochs=2, control=stop_in_second_epoch,
        state_path=state_path,
    )
    assert first.stopped_early
    assert [record.epoch for record in first.history] == [1]

    resumed_model = copy.deepcopy(trained_lenet[0])
    resumed_steps = []
    result = fine_tune(
        resumed_model, train, normalization, loss_constraint=0.3, epochs=2,
        control=TrainingControl(on_step=resumed_steps.append), state_path=state_path,
    )
    assert len(resumed_steps) == 16
    assert [record.epoch for record in result.history] == [1, 2]
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], tensor, msg=name)


def test_umap_resumes_from_saved_state(trained_lenet, fashion_subset, tmp_path):
    model, _ = trained_lenet
    train, _, normalization = fashion_subset
    uninterrupted = learn_mask(model, train, normalization, loss_constraint=0.3, prune_rate=0.9, epochs=2)

    state_path = tmp_path / "state.pt"
    steps = []
    learn_mask(
        model, train, normalization, loss_constraint=0.3, prune_rate=0.9, epochs=2, state_path=state_path,
        control=TrainingControl(on_step=steps.append, should_stop=lambda: len(steps) >= 20),
    )
    resumed = learn_mask(model, train, normalization, loss_constraint=0.3, prune_rate=0.9, epochs=2, state_path=state_path)
    assert [record.epoch for record in resumed.history] == [1, 2]
    for name, mask in uninterrupted.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
