"""The LPIPS backbone is found through weights.py's one lookup order (env variable, torch hub
cache, tokenflow cache), and a missing one is an error that says where to put it."""

from __future__ import annotations

import pytest
import torch

from tokenflow_cli.eval.image_metrics import MissingLpipsBackboneError, build_lpips, lpips_backbone_path


@pytest.fixture(scope="module")
def alex_features() -> dict[str, torch.Tensor]:
    """A torchvision-layout AlexNet `features.N` state dict with recognisable random weights."""
    torch.manual_seed(7)
    trunk = build_lpips("alex", allow_random_backbone=True).module.net  # lpips' sliceK.N layout
    return {f"features.{name.split('.', 1)[1]}": torch.randn_like(v) for name, v in trunk.state_dict().items()}


@pytest.fixture
def no_backbones(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("TOKENFLOW_HOME", str(tmp_path / "tokenflow_home"))
    monkeypatch.delenv("TOKENFLOW_LPIPS_ALEX", raising=False)
    monkeypatch.delenv("TOKENFLOW_LPIPS_VGG", raising=False)
    return tmp_path


def assert_loaded(features: dict[str, torch.Tensor]) -> None:
    perceptual = build_lpips("alex")
    assert perceptual.label == "lpips-alex" and not perceptual.random_backbone
    assert torch.equal(perceptual.module.net.slice1[0].weight, features["features.0.weight"])
    assert torch.equal(perceptual.module.net.state_dict()["slice5.10.bias"], features["features.10.bias"])


def test_env_variable_points_at_the_backbone_anywhere(no_backbones, alex_features, monkeypatch):
    path = no_backbones / "elsewhere" / "my_alexnet.pth"
    path.parent.mkdir()
    torch.save(alex_features, path)
    monkeypatch.setenv("TOKENFLOW_LPIPS_ALEX", str(path))
    assert lpips_backbone_path("alex") == path
    assert_loaded(alex_features)


def test_tokenflow_cache_is_searched_after_the_torch_hub_cache(no_backbones, alex_features):
    path = no_backbones / "tokenflow_home" / "weights" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    torch.save(alex_features, path)
    assert lpips_backbone_path("alex") == path
    assert_loaded(alex_features)


def test_missing_backbone_error_names_the_file_and_every_way_to_provide_it(no_backbones):
    default = lpips_backbone_path("vgg")  # nothing found: where a copy should go
    assert default == no_backbones / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(MissingLpipsBackboneError) as caught:
        build_lpips("vgg")
    message = str(caught.value)
    for text in ("vgg16-397923af.pth", str(default), "TOKENFLOW_LPIPS_VGG",
                 str(no_backbones / "tokenflow_home" / "weights"), "lpips_weight=0", "lpips_random_backbone"):
        assert text in message, text


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ValueError, match="lpips_net"):
        lpips_backbone_path("squeeze")
