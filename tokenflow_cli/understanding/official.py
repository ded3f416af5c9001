"""The released official understanding model's layout: which keys of its folder become which of
ours, which are not carried and why, how its config.json becomes a plain LM config, and the
conversion plan that checks every key and shape from the shard headers before anything is read.

Facts from `tests/data/I2T.md` (the official `i2t/llava` fork, LLaVA-1.5 style):
the folder is a `Qwen2ForCausalLM` state dict (`model.embed_tokens`, `model.layers.N.*` with
q/k/v biases, `model.norm`, `lm_head`) plus the projector `model.mm_projector.{0,2}.*`
(mlp2x_gelu: Linear(40, D), GELU, Linear(D, D)) plus a frozen copy of the image tokenizer under
`model.vision_tower.vision_tower.*`; config.json is a Qwen2 config with `model_type: llava_qwen`
and the `mm_*` fields. That copy is the image tokenizer the release runs: the official loader
builds the tower from the `.pt` and then `from_pretrained` overwrites it with the copy in the
shards (stored in bf16 by the trainer), so the converter carries it as the model's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenflow_cli.hub import HubFolder, tensor_shapes
from tokenflow_cli.tokenizer.convert import ConversionError
from tokenflow_cli.understanding.model import Projector

# official config.json model_type -> the transformers model_type of its language model
OFFICIAL_LLM_TYPES = {"llava_qwen": ("qwen2", "Qwen2ForCausalLM")}

PROJECTOR_PREFIX = "model.mm_projector."
VISION_TOWER_PREFIX = "model.vision_tower."
TOWER_COPY_PREFIX = "model.vision_tower.vision_tower."  # + the official tokenizer's own keys
IMAGE_NEWLINE = "model.image_newline"

# the official template `qwen_2_5` (conversation.py conv_qwen, ChatML) and its system prompt
QWEN_TEMPLATE = "qwen_2_5"
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."

# config.json fields that describe the LLaVA wrapper, not the language model
LLAVA_CONFIG_PREFIXES = ("mm_",)
LLAVA_CONFIG_KEYS = {
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "image_aspect_ratio",
    "image_crop_resolution",
    "image_grid_pinpoints",
    "image_split_resolution",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
}


@dataclass(frozen=True)
class KeyTarget:
    part: str  # "lm" | "projector" | "tokenizer" (the embedded copy, official tokenizer names) | "not_carried"
    key: str  # our key inside that part ("" when not carried)
    reason: str = ""  # why it is not carried


def classify_key(key: str, lm_keys: set[str]) -> KeyTarget | None:
    """Where an official key goes; None: no rule applies (the converter reports it)."""
    if key in lm_keys:
        return KeyTarget("lm", key)  # the LM keeps transformers' own names
    if key.startswith(PROJECTOR_PREFIX):
        return KeyTarget("projector", key[len(PROJECTOR_PREFIX) :])
    if key.startswith(TOWER_COPY_PREFIX):
        return KeyTarget("tokenizer", key[len(TOWER_COPY_PREFIX) :])
    if key.startswith(VISION_TOWER_PREFIX):
        return KeyTarget("not_carried", "", "vision-tower state outside the tokenizer copy; not used by features")
    if key == IMAGE_NEWLINE:
        return KeyTarget("not_carried", "", "used only by mm_patch_merge_type 'unpad' (anyres); this model is flat")
    return None


def lm_config_dict(official: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plain LM config.json, the LLaVA-only fields removed from it)."""
    model_type = official.get("model_type", "")
    llm_type, architecture = OFFICIAL_LLM_TYPES[model_type]
    llava_fields = {k: v for k, v in official.items() if k.startswith(LLAVA_CONFIG_PREFIXES) or k in LLAVA_CONFIG_KEYS}
    lm = {k: v for k, v in official.items() if k not in llava_fields and k not in ("_name_or_path", "auto_map")}
    lm.update(model_type=llm_type, architectures=[architecture])
    return lm, llava_fields


def check_llava_fields(fields: dict[str, Any]) -> list[str]:
    """The LLaVA settings our understanding model reproduces; anything else is a problem."""
    problems = []
    projector = fields.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        problems.append(f"mm_projector_type {projector!r}: only 'mlp2x_gelu' (Linear, GELU, Linear) is supported")
    merge = fields.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        problems.append(f"mm_patch_merge_type {merge!r}: only 'flat' (one token per map position) is supported")
    if fields.get("mm_use_im_start_end", False):
        problems.append("mm_use_im_start_end is set: image start/end tokens are not supported")
    return problems


@dataclass
class ConversionPlan:
    """Every official key placed: into the LM, the projector, or not carried (with why)."""

    lm: dict[str, str]  # official key -> our LM key
    projector: dict[str, str]  # official key -> projector key
    not_carried: dict[str, tuple[int, str]]
    stored_dtypes: set[str]
    tokenizer: dict[str, str] = field(default_factory=dict)  # official key -> the embedded tokenizer's own key
    tokenizer_dtypes: set[str] = field(default_factory=set)  # how the embedded copy is stored


def _expected_lm(lm_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the LM config.json describes, built on the meta device (no memory)."""
    config = AutoConfig.for_model(**lm_config)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # tied: the checkpoint may or may not store it
    return shapes


def embedded_code_dim(folder: HubFolder) -> int | None:
    """d_sem + d_pix of the embedded tokenizer copy, from its codebook shapes (None: no copy)."""
    infos = tensor_shapes(folder)
    halves = [infos.get(TOWER_COPY_PREFIX + f"quantize.embedding_{name}.weight") for name in ("vqkd", "vqgan")]
    if any(h is None or len(h.shape) != 2 for h in halves):
        return None
    return sum(int(h.shape[1]) for h in halves)


def plan_conversion(folder: HubFolder, lm_config: dict, llava_fields: dict, code_dim: int) -> ConversionPlan:
    """Map every key and check every shape from the headers; raise listing every problem
    (the embedded tokenizer's shapes are checked when it is converted)."""
    problems = check_llava_fields(llava_fields)
    infos = tensor_shapes(folder)
    expected = _expected_lm(lm_config)
    mm_hidden = int(llava_fields.get("mm_hidden_size", code_dim))
    if mm_hidden != code_dim:
        problems.append(f"mm_hidden_size {mm_hidden} but the image tokenizer gives {code_dim}-channel features")
    hidden = int(lm_config["hidden_size"])
    first = infos.get(PROJECTOR_PREFIX + "0.weight")
    width = first.shape[0] if first is not None and first.shape else hidden  # the stored hidden width
    with torch.device("meta"):
        projector_shapes = {k: tuple(v.shape) for k, v in Projector(code_dim, width, hidden).state_dict().items()}
    plan = ConversionPlan({}, {}, {}, set())
    lm_keys = set(expected) | {"lm_head.weight"}
    for key, info in infos.items():
        target = classify_key(key, lm_keys)
        if target is None:
            problems.append(f"{key} {list(info.shape)} ({info.shard}): no rule maps it")
            continue
        if target.part == "not_carried":
            count = plan.not_carried.get(key, (0, ""))[0]
            plan.not_carried[key] = (count + 1, target.reason)
            continue
        if target.part == "tokenizer":
            plan.tokenizer[key] = target.key
            plan.tokenizer_dtypes.add(info.dtype)
            continue
        shapes = expected if target.part == "lm" else projector_shapes
        want = shapes.get(target.key, tuple(info.shape) if target.key == "lm_head.weight" else None)
        if want is None:
            problems.append(f"{key} ({info.shard}): the {target.part} has no {target.key}")
        elif tuple(info.shape) != want:
            problems.append(f"{key} ({info.shard}): shape {list(info.shape)}, config.json implies {list(want)}")
        getattr(plan, target.part)[key] = target.key
    plan.stored_dtypes = {infos[k].dtype for k in plan.lm}  # the LM's (the tower copy may differ)
    missing = sorted(set(expected) - set(plan.lm.values())) + sorted(
        set(projector_shapes) - set(plan.projector.values())
    )
    problems += [f"missing: {k} (config.json implies it; no shard holds it)" for k in missing]
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise ConversionError(f"{folder.root} cannot be converted:\n  " + "\n  ".join(shown))
    return plan
