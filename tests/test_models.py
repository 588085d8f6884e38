"""The model registry: offline random init, shapes, bottleneck, weight files, BN momentum."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ttdl.core.io import save_torch
from ttdl.core.models import REGISTRY, SegmentationNet, build_model

NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"build_model tried to download weights: {args} {kwargs}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", refuse)
    torch.set_num_threads(1)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_matches_the_schema_enum() -> None:
    from ttdl.core.config import load_schema
    assert sorted(REGISTRY) == sorted(load_schema()["definitions"]["model"]["properties"]["name"]["enum"])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_builds_offline_and_gives_logits_and_bottleneck(name) -> None:
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES)
    assert isinstance(model, SegmentationNet)
    assert model.bottleneck_channels == REGISTRY[name].bottleneck_channels
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        logits, bottleneck = model(images)
    assert logits.shape == (2, NUM_CLASSES, 64, 64)
    assert bottleneck.ndim == 4 and bottleneck.shape[:2] == (2, REGISTRY[name].bottleneck_channels)
    assert bottleneck.shape[-1] < 64  # a downsampled feature map, not the output
    assert torch.isfinite(logits).all() and torch.isfinite(bottleneck).all()
    # the captured bottleneck is handed out once, not kept alive on the module
    assert model._bottleneck is None


def test_training_mode_forward_has_gradients_to_the_bottleneck() -> None:
    model = build_model("lraspp_mobilenet_v3_large", 3)
    logits, bottleneck = model(torch.rand(2, 3, 64, 64))
    assert bottleneck.requires_grad
    (logits.mean() + bottleneck.mean()).backward()
    assert all(p.grad is not None for p in model.net.backbone.parameters() if p.requires_grad)


def test_random_init_differs_between_seeds() -> None:
    torch.manual_seed(0)
    a = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES)
    torch.manual_seed(1)
    b = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES)
    assert not states_equal(a, b)


@pytest.mark.parametrize("layout", ["ours", "checkpoint", "torchvision"])
def test_weights_round_trip_through_a_file(tmp_path, layout) -> None:
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES)
    model.train()
    model(torch.rand(4, 3, 64, 64))  # move the BN running stats off their init values
    path = tmp_path / "w.pth"
    obj = {"ours": model.state_dict(), "checkpoint": {"model": model.state_dict(), "epoch": 3},
           "torchvision": model.net.state_dict()}[layout]
    save_torch(path, obj)
    torch.manual_seed(1)
    loaded = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, weights=str(path))
    assert states_equal(model, loaded)
    x = torch.rand(2, 3, 64, 64)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])


def test_weights_of_another_class_count_fail_naming_the_file(tmp_path) -> None:
    path = tmp_path / "five_classes.pth"
    save_torch(path, {"model": build_model("lraspp_mobilenet_v3_large", 5).state_dict()})
    with pytest.raises(RuntimeError, match="five_classes.pth"):
        build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, weights=str(path))


def test_backbone_weights_load_only_the_backbone(tmp_path) -> None:
    torch.manual_seed(0)
    donor = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES)
    path = tmp_path / "backbone.pth"
    save_torch(path, donor.net.backbone.state_dict())
    torch.manual_seed(1)
    model = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, backbone_weights=str(path))
    assert states_equal(model.net.backbone, donor.net.backbone)
    assert not states_equal(model.net.classifier, donor.net.classifier)


def test_backbone_weights_that_match_no_key_fail_naming_the_file(tmp_path) -> None:
    """E.g. a classification checkpoint ('features.0.0.weight') instead of the segmentation
    backbone's keys ('0.0.weight') must not silently leave the backbone random."""
    torch.manual_seed(0)
    classifier_keys = {f"features.{k}": v for k, v in
                       build_model("lraspp_mobilenet_v3_large", NUM_CLASSES).net.backbone.state_dict().items()}
    wrong = tmp_path / "unrelated.pth"
    save_torch(wrong, classifier_keys)
    with pytest.raises(RuntimeError, match="unrelated.pth"):
        build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, backbone_weights=str(wrong))


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        build_model("unet_tiny", NUM_CLASSES)
    message = str(info.value)
    assert "unet_tiny" in message
    for name in REGISTRY:
        assert name in message


def test_bn_momentum_is_applied() -> None:
    model = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, bn_momentum=0.25)
    layers = bn_layers(model)
    assert len(layers) > 10 and all(m.momentum == 0.25 for m in layers)
    assert all(m.momentum == 0.1 for m in bn_layers(build_model("lraspp_mobilenet_v3_large", NUM_CLASSES)))
    # None keeps torchvision's own values (0.01 in the MobileNetV3 backbone)
    kept = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, bn_momentum=None)
    assert all(m.momentum == 0.01 for m in bn_layers(kept.net.backbone))
