import pytest
import torch
from torch import nn

from core.architectures import build_model
from core.errors import MaskError
from core.masks import (
    MaskArtifact,
    ScoreMasks,
    check_masks_fit,
    flipped_fraction,
    kth_smallest,
    kept_fraction,
    maskable_parameters,
    masked_forward,
    pack_masks,
    random_masks,
    recalibrate_batch_norm,
    top_fraction_mask,
    unpack_masks,
)


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18_32x32", num_classes=10, in_channels=3).eval()


def test_maskable_parameters_lenet():
    model = build_model("lenet", num_classes=10, in_channels=1)
    assert list(maskable_parameters(model)) == [
        "block1.0.weight", "block2.0.weight", "block3.0.weight", "classifier1.weight", "fc.weight",
    ]


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.975, 1.0])
def test_top_fraction_mask_keeps_exact_share(keep):
    scores = torch.rand(40, 25, generator=torch.Generator().manual_seed(1))
    mask = top_fraction_mask(scores, keep)
    assert int(mask.sum()) == round(keep * 1000)


def test_top_fraction_mask_keeps_highest_scores():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.7])
    assert top_fraction_mask(scores, 0.5).tolist() == [False, True, False, True]


def test_top_fraction_mask_rejects_zero():
    with pytest.raises(MaskError, match="Kept fraction 0.0 is invalid"):
        top_fraction_mask(torch.rand(4), 0.0)


def test_random_masks_per_layer_ratio():
    model = build_model("lenet", num_classes=10, in_channels=1)
    masks = random_masks(model, 0.975, torch.Generator().manual_seed(0))
    for name, weight in maskable_parameters(model).items():
        assert int(masks[name].sum()) == round(0.975 * weight.numel()), name


def test_random_masks_depend_on_seed():
    model = build_model("lenet", num_classes=10, in_channels=1)
    first = random_masks(model, 0.9, torch.Generator().manual_seed(0))
    second = random_masks(model, 0.9, torch.Generator().manual_seed(1))
    assert flipped_fraction(first, second) > 0.05


def test_masked_forward_leaves_model_unchanged():
    model = build_model("lenet", num_classes=10, in_channels=1).eval()
    inputs = torch.randn(4, 1, 28, 28)
    before = model(inputs)
    masks = random_masks(model, 0.5, torch.Generator().manual_seed(0))
    masked = masked_forward(model, masks)(inputs)
    assert not torch.allclose(masked, before)
    assert torch.equal(model(inputs), before)


def test_masked_forward_equals_zeroed_weights():
    model = build_model("lenet", num_classes=10, in_channels=1).eval()
    inputs = torch.randn(4, 1, 28, 28)
    masks = random_masks(model, 0.7, torch.Generator().manual_seed(0))
    expected_model = build_model("lenet", num_classes=10, in_channels=1).eval()
    expected_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, weight in maskable_parameters(expected_model).items():
            weight.mul_(masks[name])
    torch.testing.assert_close(masked_forward(model, masks)(inputs), expected_model(inputs))


def test_straight_through_gradient_is_weight_times_output_gradient():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
    scores = ScoreMasks(model, prune_rate=2 / 3)
    inputs = torch.tensor([[1.0, 1.0, 1.0]])
    parameters = {"0.weight": model[0].weight * scores.straight_through_masks()["0.weight"]}
    output = torch.func.functional_call(model, parameters, (inputs,))
    # Scores start at |w| = [2, 1, 0.5]: the smallest is dropped, so the output is 2 - 1 = 1.
    assert float(output.detach()) == pytest.approx(1.0)
    output.sum().backward()
    # d output / d score_i = w_i * x_i for every weight, kept or not (straight-through).
    assert scores.scores[0].grad.tolist() == [[2.0, -1.0, 0.5]]


def test_score_masks_start_as_magnitude_pruning():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -3.0, 0.2, 2.0]]))
    masks = ScoreMasks(model, prune_rate=0.5).hard_masks()
    assert masks["0.weight"].tolist() == [[False, True, False, True]]


def test_score_masks_reject_bad_prune_rate():
    with pytest.raises(MaskError, match="prune_rate 1.5 is invalid"):
        ScoreMasks(nn.Linear(2, 2), prune_rate=1.5)


def test_recalibration_keeps_model_buffers():
    model = small_resnet()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    masks = random_masks(model, 0.5, torch.Generator().manual_seed(0))
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    buffers = recalibrate_batch_norm(model, masks, batches)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert not model.training
    assert int(buffers["bn1.num_batches_tracked"]) == 2


def test_recalibration_matches_batch_statistics():
    model = small_resnet()
    masks = random_masks(model, 0.5, torch.Generator().manual_seed(0))
    inputs = torch.randn(16, 3, 32, 32)
    buffers = recalibrate_batch_norm(model, masks, [inputs])
    # The stem's batch norm normalises the masked first convolution's output directly.
    conv = model.conv1.weight * masks["conv1.weight"]
    features = torch.nn.functional.conv2d(inputs, conv, padding=1)
    torch.testing.assert_close(buffers["bn1.running_mean"], features.mean(dim=(0, 2, 3)))


def test_pack_round_trip_reproduces_outputs():
    model = small_resnet()
    masks = random_masks(model, 0.8, torch.Generator().manual_seed(3))
    buffers = recalibrate_batch_norm(model, masks, [torch.randn(8, 3, 32, 32)])
    data = pack_masks(MaskArtifact(masks=masks, buffers=buffers, metadata={"arch": "resnet18_32x32"}))
    restored = unpack_masks(data)
    inputs = torch.randn(4, 3, 32, 32)
    expected = masked_forward(model, masks, buffers)(inputs)
    assert torch.equal(masked_forward(model, restored.masks, restored.buffers)(inputs), expected)
    assert restored.metadata["arch"] == "resnet18_32x32"


def test_pack_uses_one_bit_per_weight():
    model = small_resnet()
    masks = random_masks(model, 0.8, torch.Generator().manual_seed(3))
    data = pack_masks(MaskArtifact(masks=masks, buffers={}))
    weights = sum(mask.numel() for mask in masks.values())
    assert len(data) < weights / 8 + 20_000


def test_unpack_rejects_garbage():
    with pytest.raises(MaskError, match="not a valid safetensors file"):
        unpack_masks(b"not a mask at all")


def test_check_masks_fit_names_missing_layer():
    model = build_model("lenet", num_classes=10, in_channels=1)
    masks = random_masks(model, 0.9, torch.Generator().manual_seed(0))
    del masks["fc.weight"]
    with pytest.raises(MaskError, match=r"missing \['fc.weight'\]"):
        check_masks_fit(model, masks)


def test_kept_fraction_counts_all_layers():
    masks = {"a": torch.tensor([True, False]), "b": torch.tensor([True, True])}
    assert kept_fraction(masks) == 0.75


def test_fused_masked_weights_match_straight_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    inputs = torch.randn(5, 6)
    reference = ScoreMasks(model, prune_rate=0.5)
    fused = ScoreMasks(model, prune_rate=0.5)
    fused.load_state_dict(reference.state_dict())

    plain = {"0.weight": model[0].weight * reference.straight_through_masks()["0.weight"]}
    torch.func.functional_call(model, plain, (inputs,)).pow(2).sum().backward()
    torch.func.functional_call(model, fused.masked_weights(model), (inputs,)).pow(2).sum().backward()
    torch.testing.assert_close(fused.scores[0].grad, reference.scores[0].grad)


@pytest.mark.parametrize("hint", [None, 0.5, 0.0, 2.0])
def test_kth_smallest_matches_kthvalue(hint):
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    value, _ = kth_smallest(values, 1234, hint, width=0.01)
    assert float(value) == float(values.kthvalue(1234).values)


def test_score_masks_keep_share_across_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40))
    scores = ScoreMasks(model, prune_rate=0.9)
    optimizer = torch.optim.Adam(scores.parameters(), lr=0.05)
    for _ in range(5):
        masks = scores.hard_masks()
        assert int(masks["0.weight"].sum()) == 1800
        torch.testing.assert_close(masks["0.weight"], top_fraction_mask(scores.scores[0], 0.9))
        scores.scores[0].grad = torch.randn_like(scores.scores[0])
        optimizer.step()
