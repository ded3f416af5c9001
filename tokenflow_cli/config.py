"""Typed configuration: dataclasses for every part, YAML recipes with `base:` inheritance,
`--set a.b=value` overrides typed by the dataclass, and errors that name the key, the file and
the nearest valid key.

A recipe file is YAML with top-level sections matching a recipe dataclass (for the tokenizer:
`model`, `data`, `train`, `eval`). `base: other.yaml` (relative to the file, or the name of a
built-in recipe) is loaded first and deep-merged under the file's own values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _recipes_dir() -> Path:
    """Top-level `recipes/` of a source checkout, else the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"


RECIPES_DIR = _recipes_dir()


class ConfigError(ValueError):
    """A recipe or override that does not fit the dataclasses."""


# --------------------------------------------------------------------------------------------
# Model parts
# --------------------------------------------------------------------------------------------


@dataclass
class PixelConfig:
    """VQGAN-style pixel encoder and decoder (official layout; see shared/official/README.md)."""

    in_channels: int = 3  # RGB
    base_channels: int = 128  # encoder width of the first level
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # per level; downsampling = 2**(levels-1)
    encoder_res_blocks: int = 2  # residual blocks per encoder level
    decoder_base_channels: int = 128  # 256 in the "enhanced" decoder
    decoder_res_blocks: int = 3  # 5 in the "enhanced" decoder
    z_channels: int = 256  # encoder output width before quant_conv
    attn_at_lowest: bool = True  # self-attention after each res block of the deepest level
    norm_groups: int = 32  # GroupNorm groups (eps 1e-6)
    dropout: float = 0.0  # dropout inside residual blocks


@dataclass
class SemanticEncoderConfig:
    """The semantic tower (CLIP/SigLIP), initialised from the teacher and trained."""

    backend: str = "open_clip"  # "open_clip" or "hf_siglip" (transformers SiglipVisionModel)
    model_name: str = "ViT-B-16"  # open_clip model name (built-in or registered tiny config)
    pretrained: str = ""  # open_clip tag, or a local .pt/.safetensors/HF folder; "" = random init
    native_size: int = 224  # image size the tower's position embeddings were trained at
    feature_layer: int = -1  # -1: last block (+ ln_post for CLIP); -2: penultimate hidden state
    input_norm: str = "none"  # on the [-1,1] image: "none" (official clipb), "clip_mean_std", "clamp"
    trainable: bool = True  # False freezes the tower (projection heads still train)
    quick_gelu: bool = False  # open_clip: OpenAI CLIP weights need QuickGELU (the "openai" tag sets it)


@dataclass
class TeacherConfig:
    """Frozen teacher whose features the semantic decoder regresses (training only)."""

    enabled: bool = True  # False drops the semantic loss (and the teacher) entirely
    backend: str = "open_clip"  # as SemanticEncoderConfig.backend
    model_name: str = "ViT-B-16"
    pretrained: str = ""  # "" = same source as the semantic encoder
    input_norm: str = "clip_mean_std"  # the official loss feeds CLIP mean/std to its teacher
    feature: str = "proj_tokens"  # "proj_tokens" (ln_post + proj, CLIP) or "penultimate" (SigLIP)
    dim: int = 512  # teacher feature size T (512 for CLIP-B/16, 1152 for SigLIP-so400m)


@dataclass
class QuantizerConfig:
    """Dual-codebook, shared-index, multi-scale residual quantizer."""

    codebook_size: int = 32768  # K, the same for both codebooks (one shared index)
    semantic_dim: int = 32  # d_sem
    pixel_dim: int = 8  # d_pix
    scales: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14, 16)  # side of each token map
    pixel_weight: float = 1.0  # w_dis in argmin(d_sem + w_dis * d_pix)
    use_semantic: bool = True  # False: index chosen by the pixel distance alone (ablation)
    l2_normalize: bool = True  # l2-normalise both halves and both codebooks
    commitment_beta: float = 0.25
    entropy_weight: float = 0.0  # 0 turns the entropy loss off
    entropy_temperature: float = 0.01
    scale_drop_prob: float = 0.1  # training: drop one random non-first scale with this prob
    downsample_mode: str = "area"  # residual -> s x s
    upsample_mode: str = "bicubic"  # s x s codes -> final grid
    search_chunk_size: int = 8192  # codebook rows per distance chunk (bounds extra memory)
    usage_window: int = 1000  # steps a code counts as "recently used" for dead-code restart


@dataclass
class SemanticDecoderConfig:
    """BEiT-v2 style ViT from quantized semantic codes back to the teacher's feature space."""

    width: int = 768  # D (the semantic tower width in the official models)
    depth: int = 3
    heads: int = 12
    mlp_ratio: float = 4.0
    grid_size: int = 14  # trained grid of its position embeddings (resized otherwise)


@dataclass
class ModelConfig:
    """The whole tokenizer."""

    name: str = "tokenflow"  # free-form identifier stored in checkpoints and codes files
    image_size: int = 256  # resolution of `tokenize`/`reconstruct` inputs
    pixel_input_size: int = 0  # pixel branch resizes to this first (siglip: 432); 0 = image_size
    pixel: PixelConfig = field(default_factory=PixelConfig)
    semantic_encoder: SemanticEncoderConfig = field(default_factory=SemanticEncoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semantic_decoder: SemanticDecoderConfig = field(default_factory=SemanticDecoderConfig)


# --------------------------------------------------------------------------------------------
# Data, training, evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    train: str = ""  # folder, glob, file list (.txt) or .jsonl with an "image" field
    val: str = ""  # held-out images for periodic eval ("" = a slice of train)
    captions: str = ""  # .jsonl with {"image", "caption"} (generator, teacher)
    image_size: int = 256  # training crop size
    random_resized_crop: tuple[float, float] = (0.8, 1.0)  # area range; (1, 1) = resize+centre
    hflip: bool = True
    num_workers: int = 0
    val_limit: int = 64  # images used by the periodic eval


@dataclass
class LossConfig:
    l2_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"  # lpips backbone: "vgg" or "alex"
    lpips_random_backbone: bool = False  # allow a random backbone (tests only; labelled)
    gan_weight: float = 0.5
    gan_start_step: int = 20000  # discriminator and generator GAN loss start here
    gan_adaptive_weight: bool = False  # VQGAN's adaptive weight from last-layer gradients
    disc_layers: int = 3  # PatchGAN depth
    disc_channels: int = 64
    disc_lr: float = 1e-4
    semantic_weight: float = 1.0  # weight of 1 - cos(pred, teacher)
    vq_weight: float = 1.0  # codebook + beta * commitment


@dataclass
class TrainConfig:
    steps: int = 100000
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (after warmup)
    min_lr_ratio: float = 0.1  # cosine floor as a share of lr
    grad_clip: float = 1.0  # 0 disables
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast; no-op where unsupported)
    ema_decay: float = 0.0  # 0 disables model EMA
    eval_every: int = 1000
    checkpoint_every: int = 1000
    log_every: int = 10
    seed: int = 0
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp" shards weights, gradients
    # and optimizer state across ranks (train/fsdp.py), for LLMs too large to replicate.
    distributed: str = "ddp"
    dead_code_restart_steps: int = 0  # 0 disables; else re-seed codes unused this many steps
    kmeans_init: bool = False  # k-means init of both codebooks from the first batch
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class EvalConfig:
    batch_size: int = 8
    limit: int = 0  # 0 = all


@dataclass
class TokenizerRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading, merging, overriding
# --------------------------------------------------------------------------------------------


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a built-in recipe (`tiny`, `clipb-256`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / f"{name_or_path}.yaml", RECIPES_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {name_or_path!r} not found: not a file, and not one of {known}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and everything it inherits through `base:`, merged (file wins)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular `base:` chain {[str(p) for p in _seen]}")
    with open(path) as fh:
        tree = yaml.safe_load(fh) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base:
        base_path = path.parent / base
        if not base_path.is_file():
            base_path = recipe_path(Path(base).stem)
        tree = _deep_merge(load_yaml_tree(base_path, (*_seen, path)), tree)
    return tree


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        number = _as_float(value)  # ints, integral floats ("12.0", 1e3) and their strings
        if isinstance(value, bool) or number is None or not number.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value if isinstance(value, int) else int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _build(cls: type[T], tree: dict, where: str) -> T:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in tree.items():
        if key not in types_:
            raise ConfigError(f"{where}: unknown key {key!r}{_nearest(key, list(types_))}")
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["train.lr=3e-4", "model.quantizer.scales=1,2,4"]` -> nested dict (values YAML-parsed)."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def from_dict(cls: type[T], tree: dict, source: str = "<dict>") -> T:
    try:
        return _build(cls, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_recipe(name_or_path: str | Path, cls: type[T] = TokenizerRecipe, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe (with `base:`), apply `--set` overrides, validate into `cls`."""
    path = recipe_path(name_or_path)
    tree = load_yaml_tree(path)
    try:
        recipe = _build(cls, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if overrides:
        try:
            recipe = _build(cls, _deep_merge(to_dict(recipe), parse_overrides(overrides)), "")
        except ConfigError as err:
            raise ConfigError(f"--set: {err}") from None
    return recipe


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML/JSON-safe tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def save_resolved(obj: Any, path: Path) -> None:
    """Write the resolved recipe next to an output (atomically)."""
    from tokenflow_cli.checkpoint import atomic_write_text

    atomic_write_text(Path(path), to_yaml(obj))


def num_tokens(scales: tuple[int, ...]) -> int:
    return sum(s * s for s in scales)
