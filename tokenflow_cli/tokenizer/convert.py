"""Import a released official TokenFlow tokenizer (`.pt`) into our safetensors checkpoint.

The file is read by `official_file.load_official` (weights_only, no pickled code runs).

Every official key is renamed by a prefix table (`KEY_RENAMES`) onto our modules, every shape is
checked against our model built on the meta device, and the conversion fails listing every key
left over on either side. The few official entries we deliberately do not carry are listed with
their reason in `NOT_CARRIED`; our entries with no official counterpart in `FRESH`. The written
checkpoint carries the variant's recipe (a `ModelConfig`) in its metadata, so `load_tokenizer`
rebuilds it. Layout facts and decisions: docs/CONVERT.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenflow_cli.checkpoint import save_weights
from tokenflow_cli.config import load_recipe, to_dict
from tokenflow_cli.tokenizer.config import ModelConfig, TokenizerRecipe
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.official_file import ConversionError, load_official, strip_module_prefix

# --------------------------------------------------------------------------------------------
# Variants and key tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialVariant:
    recipe: str  # built-in recipe with the official architecture
    description: str
    name: str  # stored as ModelConfig.name (shows up in codes files)


OFFICIAL_VARIANTS: dict[str, OfficialVariant] = {
    "clipb-256-enhanced": OfficialVariant(
        "clipb-256",
        "CLIP ViT-B/16 teacher run at 256 px (interpolated positions), enhanced decoder: "
        "tokenflow_clipb_32k_enhanced.pt, the text-to-image tokenizer",
        "official-clipb-256-enhanced",
    ),
    "clipb-224": OfficialVariant(
        "clipb-224", "CLIP ViT-B/16 teacher at 224 px, standard decoder", "official-clipb-224"
    ),
    "siglip-384": OfficialVariant(
        "siglip-384",
        "SigLIP-so400m teacher at 384 px: tokenflow_siglip_32k.pt (TokenFlow-XL), the understanding tokenizer",
        "official-siglip-384",
    ),
}

# Official prefix -> our prefix, first match wins. The SigLIP tower was saved with transformers
# 4.43, which nests it under `vision_model.`; our tower module is that inner level.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("encoder_vqkd.vision_model.", "semantic_encoder.tower."),
    ("encoder_vqkd.", "semantic_encoder.tower."),
    ("decoder_vqkd.", "semantic_decoder."),
    ("encode_task_layer.", "semantic_proj."),
    ("decode_task_layer.", "semantic_head."),
    ("encoder.", "pixel_encoder."),
    ("decoder.", "pixel_decoder."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
    ("quantize.embedding_vqkd.", "quantizer.semantic_codebook."),
    ("quantize.embedding_vqgan.", "quantizer.pixel_codebook."),
)

# Official entries with no counterpart in our model, and why that loses nothing at inference.
NOT_CARRIED: dict[str, str] = {
    "quantize.codebook_used": "training-time record of used codes; affects no output "
    "(our usage statistics start fresh in quantizer.usage_counts)",
    "scaling_layer.shift": "SigLIP input constant 0.5 (checked); semantic_encoder.input_norm='clamp' applies it",
    "scaling_layer.scale": "SigLIP input constant 0.5 (checked); semantic_encoder.input_norm='clamp' applies it",
}

# Our entries with no official counterpart: written as zeros (a fresh model's values).
FRESH: dict[str, str] = {
    "quantizer.usage_counts": "per-scale code usage counts (statistics)",
    "quantizer.last_used_step": "dead-code restart bookkeeping",
    "quantizer.step": "training step counter of the quantizer",
}

# Config values the official encode path implies; a converted model must use them to reproduce
# the official indices (checked, so a custom --recipe cannot silently differ).
PARITY_BY_BACKEND: dict[str, dict[str, object]] = {
    "open_clip": {"input_norm": "none", "feature_layer": -1, "quick_gelu": True},
    "hf_siglip": {"input_norm": "clamp", "feature_layer": -2},
}
PARITY_QUANTIZER: dict[str, object] = {
    "l2_normalize": True,
    "pixel_weight": 1.0,
    "use_semantic": True,
    "downsample_mode": "area",
    "upsample_mode": "bicubic",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConversionReport:
    source: str
    entry: str  # "ema", "model", "state_dict" or "bare state dict"
    other_entries: list[str]  # top-level entries not used (optimizer, discriminator, ...)
    variant: str
    variant_reason: str  # "given" or what the guess was based on
    dtype: str
    official_keys: int
    written_keys: int
    parameters: int  # elements of floating tensors written
    not_carried: dict[str, str]  # official key -> reason
    fresh: dict[str, str]  # our key -> reason
    notes: list[str] = field(default_factory=list)
    stripped_module_prefix: int = 0
    steps: int | None = None


# --------------------------------------------------------------------------------------------
# Variant, config and key map
# --------------------------------------------------------------------------------------------


def guess_variant(sd: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """(variant, reason) from the keys: a SigLIP tower, or CLIP with the decoder's width."""
    if any(k.startswith(("encoder_vqkd.vision_model.", "encoder_vqkd.embeddings.")) for k in sd):
        return "siglip-384", "keys encoder_vqkd.vision_model.* (SigLIP tower)"
    if "encoder_vqkd.conv1.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise ConversionError(
            "cannot tell the variant: no encoder_vqkd.conv1.weight (CLIP) or encoder_vqkd.vision_model.* (SigLIP) "
            "and decoder.conv_out.weight; pass --variant"
        )
    width = sd["decoder.conv_out.weight"].shape[1]
    reason = f"CLIP tower, pixel decoder output width {width}"
    if width == 256:
        return "clipb-256-enhanced", reason + " (enhanced decoder)"
    if width == 128:
        return "clipb-224", reason + " (standard decoder)"
    raise ConversionError(f"{reason}: neither the standard (128) nor the enhanced (256) decoder; pass --variant")


def variant_config(variant: str) -> ModelConfig:
    """The official architecture of a variant, from its built-in recipe."""
    if variant not in OFFICIAL_VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; choose one of {sorted(OFFICIAL_VARIANTS)}")
    spec = OFFICIAL_VARIANTS[variant]
    cfg = load_recipe(spec.recipe, TokenizerRecipe).model
    return dataclasses.replace(cfg, name=spec.name)


def parity_problems(cfg: ModelConfig) -> list[str]:
    """Config values that would make a converted model's encode differ from the official one."""
    problems = []
    enc = cfg.semantic_encoder
    for name, want in PARITY_BY_BACKEND.get(enc.backend, {}).items():
        if getattr(enc, name) != want:
            problems.append(f"model.semantic_encoder.{name}={getattr(enc, name)!r} (official: {want!r})")
    for name, want in PARITY_QUANTIZER.items():
        if getattr(cfg.quantizer, name) != want:
            problems.append(f"model.quantizer.{name}={getattr(cfg.quantizer, name)!r} (official: {want!r})")
    return problems


# The sizes an official state dict states itself: config field -> (key, dim) of the tensor that
# holds it. The recipe supplies only what the file cannot say (depths, widths, scales).
SIZES_FROM_FILE: dict[str, tuple[str, int]] = {
    "codebook_size": ("quantize.embedding_vqkd.weight", 0),
    "semantic_dim": ("quantize.embedding_vqkd.weight", 1),
    "pixel_dim": ("quantize.embedding_vqgan.weight", 1),
}


def file_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The quantizer sizes the file states (K, d_sem, d_pix), from its codebook shapes."""
    sizes = {name: int(sd[key].shape[dim]) for name, (key, dim) in SIZES_FROM_FILE.items() if key in sd}
    if "quantize.embedding_vqgan.weight" in sd and "codebook_size" in sizes:
        rows = int(sd["quantize.embedding_vqgan.weight"].shape[0])
        if rows != sizes["codebook_size"]:
            raise ConversionError(f"the two codebooks have {sizes['codebook_size']} and {rows} rows: "
                                  "TokenFlow's codebooks share one index and must be the same size")
    return sizes


def apply_file_sizes(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], explicit: bool) -> tuple[ModelConfig, list[str]]:
    """`cfg` with the sizes the file states. A built-in variant's recipe (`explicit` False) takes
    them, with a note for each it changes; a recipe the user gave must agree, else an error that
    names both values."""
    sizes = file_sizes(sd)
    differ = {k: (getattr(cfg.quantizer, k), v) for k, v in sizes.items() if getattr(cfg.quantizer, k) != v}
    if differ and explicit:
        raise ConversionError("the recipe and the file disagree: " + "; ".join(
            f"model.quantizer.{k}={ours} in the recipe, {theirs} in the file ({SIZES_FROM_FILE[k][0]})"
            for k, (ours, theirs) in differ.items()))
    notes = [f"model.quantizer.{k} = {theirs} from the file ({SIZES_FROM_FILE[k][0]}; the variant's recipe "
             f"says {ours})" for k, (ours, theirs) in differ.items()]
    return dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer, **sizes)), notes


def official_to_ours(key: str) -> str | None:
    """Our state-dict key for an official one, or None when no rename rule applies."""
    for official, ours in KEY_RENAMES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return None


def expected_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our tokenizer's state-dict keys, shapes and dtypes, built on the meta device (no memory)."""

    build = dataclasses.replace(cfg, semantic_encoder=dataclasses.replace(cfg.semantic_encoder, pretrained=""))
    with torch.device("meta"):
        model = TokenFlowTokenizer(build)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _check_scaling_layer(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> list[str]:
    """The SigLIP scaling buffers must hold the constants our `clamp` input norm applies."""
    keys = [k for k in ("scaling_layer.shift", "scaling_layer.scale") if k in sd]
    if not keys:
        return []
    if cfg.semantic_encoder.input_norm != "clamp":
        raise ConversionError("the file has a scaling_layer but the config's semantic input_norm is not 'clamp'")
    values = {k: [round(float(x), 6) for x in sd[k].float().flatten()] for k in keys}
    if any(v != [0.5, 0.5, 0.5] for v in values.values()):
        raise ConversionError(
            f"scaling_layer values {values} differ from the (0.5, 0.5) our 'clamp' input norm applies"
        )
    shown = ", ".join(f"{k.split('.')[-1]}={tuple(v)}" for k, v in values.items())
    return [f"scaling_layer {shown}: stored, not needed (input_norm='clamp' applies the same constants)"]


def _unused_tower_note(cfg: ModelConfig, layout: Mapping[str, tuple]) -> list[str]:
    """Tower entries carried but not run by encode (SigLIP: last layer, post_layernorm, head)."""
    if cfg.semantic_encoder.feature_layer == -1:
        return []
    n_layers = len({k.split(".")[4] for k in layout if k.startswith("semantic_encoder.tower.encoder.layers.")})
    first_unused = n_layers + cfg.semantic_encoder.feature_layer + 1
    prefixes = [f"semantic_encoder.tower.encoder.layers.{i}." for i in range(first_unused, n_layers)]
    prefixes += ["semantic_encoder.tower.post_layernorm.", "semantic_encoder.tower.head."]
    count = sum(math.prod(shape) for k, (shape, _) in layout.items() if k.startswith(tuple(prefixes)))
    return [
        f"carried but unused by encode: tower layers {first_unused}..{n_layers - 1}, post_layernorm, head "
        f"({count:,} parameters; features are the output of layer {first_unused - 1})"
    ]


def convert_state_dict(
    official: Mapping[str, torch.Tensor], cfg: ModelConfig, dtype: str = "float32"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official state dict -> ours (in our key order) and notes; raises listing every problem."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    problems = [f"config would not reproduce the official encode: {p}" for p in parity_problems(cfg)]
    layout = expected_layout(cfg)
    mapped: dict[str, torch.Tensor] = {}
    unmapped, bad_shape = [], []
    for key, value in official.items():
        if key in NOT_CARRIED:
            continue
        ours = official_to_ours(key)
        if ours is None or ours not in layout:
            unmapped.append(key if ours is None else f"{key} (-> {ours}, not in our model)")
        elif ours in mapped:
            unmapped.append(f"{key} (-> {ours}, already filled by another key)")
        elif tuple(value.shape) != layout[ours][0]:
            bad_shape.append(f"{key}: {tuple(value.shape)} vs ours {ours}: {layout[ours][0]}")
        else:
            mapped[ours] = value
    missing = [k for k in layout if k not in mapped and k not in FRESH]
    for title, items in (
        ("official keys with no place in our model", unmapped),
        ("shape mismatches", bad_shape),
        ("our keys the file does not fill", missing),
    ):
        if items:
            problems.append(f"{title} ({len(items)}):\n    " + "\n    ".join(items))
    if problems:
        raise ConversionError("cannot convert:\n  " + "\n  ".join(problems))
    notes = _check_scaling_layer(official, cfg) + _unused_tower_note(cfg, layout)
    target = DTYPES[dtype]
    out = {}
    for key, (shape, our_dtype) in layout.items():
        if key in mapped:
            value = mapped[key]
            out[key] = value.to(target) if value.is_floating_point() else value.to(our_dtype)
        else:
            out[key] = torch.zeros(shape, dtype=our_dtype)
    return out, notes


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    variant: str | None = None,
    config: ModelConfig | None = None,
    dtype: str = "float32",
) -> ConversionReport:
    """Read an official `.pt`, convert, and write our `.safetensors` (atomically).

    `config` replaces the variant's recipe (e.g. a reduced or custom-trained official model);
    the variant is then only a label ("custom" when not given). The sizes the file states
    (codebook size K, semantic and pixel code dims) always come from the file: a variant's
    recipe takes them, a given `config` must agree with them.
    """

    official, entry, others, steps = load_official(source)
    report = convert_official_state(official, output, str(source), variant, config, dtype, entry)
    report.source, report.other_entries, report.steps = str(source), others, steps
    return report


def convert_official_state(
    official: Mapping[str, torch.Tensor],
    output: str | Path,
    source: str,
    variant: str | None = None,
    config: ModelConfig | None = None,
    dtype: str = "float32",
    entry: str = "bare state dict",
) -> ConversionReport:
    """Convert an official tokenizer state dict already in memory (e.g. the copy a LLaVA folder
    embeds) and write our `.safetensors`; `source` names where it came from, `entry` which part
    of it the state dict was."""
    official, stripped = strip_module_prefix(dict(official))
    if variant is not None:
        reason = "given"
    elif config is not None:
        variant, reason = "custom", "architecture from the given recipe"
    else:
        variant, reason = guess_variant(official)
    try:
        cfg, size_notes = apply_file_sizes(config or variant_config(variant), official, explicit=config is not None)
        ours, notes = convert_state_dict(official, cfg, dtype)
    except ConversionError as err:
        raise ConversionError(f"{source} as variant {variant} ({reason}): {err}") from None
    extra = {"converted_from": Path(source).name, "official_entry": entry, "official_variant": variant}
    save_weights(ours, Path(output), to_dict(cfg), kind="tokenizer", extra=extra)
    return ConversionReport(
        source=source,
        entry=entry,
        other_entries=[],
        variant=variant,
        variant_reason=reason,
        dtype=dtype,
        official_keys=len(official),
        written_keys=len(ours),
        parameters=sum(v.numel() for v in ours.values() if v.is_floating_point()),
        not_carried={k: NOT_CARRIED[k] for k in official if k in NOT_CARRIED},
        fresh={k: FRESH[k] for k in ours if k in FRESH},
        notes=size_notes + notes,
        stripped_module_prefix=stripped,
    )
