"""The image tokenizer a released LLaVA folder embeds, and how far another copy is from it.

The official loader (`i2t/llava/model/builder.py`) builds the vision tower from the tokenizer
`.pt` that config.json names and then lets `from_pretrained` overwrite it with the copy stored
in the shards under `model.vision_tower.vision_tower.*`; the trainer cast that copy to bf16
before saving. So the tokenizer the release runs is the embedded copy, not the `.pt`: its bf16
rounding moves features enough to flip indices at the fine scales. The converter writes the copy
in its stored dtype (`write_embedded`) and, when a `.pt` is given too, measures the two against
each other (`compare_tokenizers`): weights, and the indices of a fixed probe image per scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tokenflow_cli.tokenizer.config import ModelConfig
from tokenflow_cli.tokenizer.convert import ConversionError, ConversionReport, convert_official_state
from tokenflow_cli.tokenizer.model import load_tokenizer

EMBEDDED_SOURCE = "model.vision_tower.vision_tower.* (the tokenizer copy in the LLaVA shards)"
FLOATING = ("float32", "bfloat16", "float16")  # stored dtypes (hub.TensorInfo names) the copy may have
CODEBOOKS = ("quantizer.semantic_codebook.weight", "quantizer.pixel_codebook.weight")
SAME_TOKENIZER_RELATIVE = 1e-2  # codebooks closer than this (relative) are one tokenizer, bf16-rounded


@dataclass
class TokenizerDifference:
    """The embedded copy against another checkpoint of the same tokenizer."""

    tensors: int  # floating tensors compared
    max_abs: float  # largest |embedded - other| over every weight
    codebook_relative: float  # largest relative codebook difference (per entry, floor 1e-3)
    flips: dict[int, float]  # scale side -> fraction of the probe image's indices that differ

    def line(self) -> str:
        flips = ", ".join(f"{side}: {100 * frac:.0f}%" for side, frac in self.flips.items())
        return (f"{self.tensors} weights differ by up to {self.max_abs:.3g} (codebooks {self.codebook_relative:.2g} "
                f"relative); indices of a probe image that differ per scale: {flips}")


def write_embedded(state: dict[str, torch.Tensor], output: Path, stored_dtype: str,
                   config: ModelConfig | None = None) -> ConversionReport:
    """The embedded copy (official tokenizer names) -> our tokenizer checkpoint at `output`, in
    the dtype it is stored in. `config` describes an architecture that is not a release variant
    (the sizes the copy states are always taken from it)."""
    return convert_official_state(state, output, EMBEDDED_SOURCE, config=config, dtype=stored_dtype)


def probe_image(size: int) -> torch.Tensor:
    """A fixed smooth test pattern in [-1, 1], (1, 3, size, size): no RNG, the same everywhere."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    rgb = torch.stack([torch.sin(3 * x + 2 * y), torch.cos(4 * y - x), x * y * torch.cos(5 * x)])
    return rgb.clamp(-1, 1)[None]


def _weight_difference(embedded: Path, other: Path) -> tuple[int, float, float]:
    count, worst, codebook = 0, 0.0, 0.0
    with safe_open(str(embedded), framework="pt") as a_fh, safe_open(str(other), framework="pt") as b_fh:
        for key in a_fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            a, b = a_fh.get_tensor(key), b_fh.get_tensor(key)
            if not a.is_floating_point():
                continue
            if a.shape != b.shape:
                raise ConversionError(f"{other}: {key} {list(b.shape)} but the LLaVA folder's tokenizer copy has "
                                      f"{list(a.shape)}: not the tokenizer this model was trained with")
            delta = (a.float() - b.float()).abs()
            count, worst = count + 1, max(worst, float(delta.max()) if delta.numel() else 0.0)
            if key in CODEBOOKS:
                codebook = max(codebook, float((delta / (b.float().abs() + 1e-3)).max()))
    return count, worst, codebook


@torch.no_grad()
def compare_tokenizers(embedded: Path, other: Path) -> TokenizerDifference:
    """Weights and probe-image indices of the embedded copy against `other` (both our checkpoints)."""
    count, worst, codebook = _weight_difference(embedded, other)
    a, b = load_tokenizer(str(embedded)), load_tokenizer(str(other))
    image = probe_image(a.image_size)
    idx_a, idx_b = a.img_to_codes(image).indices[0], b.img_to_codes(image).indices[0]
    flips, start = {}, 0
    for side in a.config.quantizer.scales:
        part = slice(start, start + side * side)
        flips[int(side)] = float((idx_a[part] != idx_b[part]).float().mean())
        start += side * side
    return TokenizerDifference(count, worst, codebook, flips)


def require_same_tokenizer(difference: TokenizerDifference, other: Path) -> None:
    """Codebooks further apart than bf16 rounding: `other` is another tokenizer."""
    if difference.codebook_relative > SAME_TOKENIZER_RELATIVE:
        raise ConversionError(
            f"{other}: its codebooks differ from the LLaVA folder's tokenizer copy by up to "
            f"{difference.codebook_relative:.3g} (relative): not the tokenizer this model was trained with "
            "(override_tokenizer / --override-tokenizer uses it anyway)")


def stored_dtype(dtypes: set[str]) -> str:
    """The one floating dtype the embedded copy is stored in."""
    floating = sorted(d for d in dtypes if d in FLOATING)
    if len(floating) != 1:
        raise ConversionError(f"the embedded tokenizer copy is stored as {sorted(dtypes)}: expected one of {FLOATING}")
    return floating[0]
