"""Typed configuration: YAML recipes with `base:` inheritance, `--set a.b=value` overrides typed
by the dataclass, errors that name the key, the file and the nearest valid key, and the `kind:`
registry that maps a recipe to its schema.

A recipe file is YAML with `kind:` (tokenizer, generator, llava, teacher) and top-level sections
matching that kind's recipe dataclass (for the tokenizer: `model`, `data`, `train`, `eval`).
`base: other.yaml` (relative to the file, or the name of a built-in recipe) is loaded first and
deep-merged under the file's own values. The schemas live with their capability
(`tokenizer/config.py`, ...) and register themselves with `@register_recipe_kind`; this module
holds only what every stage shares (`TrainConfig`, `EvalConfig`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_write_text

T = TypeVar("T")


_PACKAGE_DIR = Path(__file__).resolve().parent
# built-in recipes: the top-level recipes/ folder of a checkout, shipped in a wheel as tokenflow_cli/recipes
RECIPES_DIR = next((d for d in (_PACKAGE_DIR / "recipes", _PACKAGE_DIR.parent / "recipes") if d.is_dir()),
                   _PACKAGE_DIR / "recipes")


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the dataclasses."""


# --------------------------------------------------------------------------------------------
# What every training stage shares
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The generic loop's settings (train/loop.py); a stage may extend it with its own fields."""

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
    checkpoint_every: int = 1000  # 0 = only at the end (and on a stop signal)
    log_every: int = 10
    seed: int = 0
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp" shards weights, gradients
    # and optimizer state across ranks (train/fsdp.py), for LLMs too large to replicate.
    distributed: str = "ddp"


@dataclass
class EvalConfig:
    batch_size: int = 8
    limit: int = 0  # 0 = all


# --------------------------------------------------------------------------------------------
# The `kind:` registry
# --------------------------------------------------------------------------------------------

RECIPE_KINDS: dict[str, type] = {}  # kind name -> recipe dataclass, filled by the capability packages


def register_recipe_kind(kind: str):
    """Class decorator: `@register_recipe_kind("tokenizer")` makes `kind: tokenizer` recipes load
    into the decorated dataclass."""

    def register(cls: type[T]) -> type[T]:
        RECIPE_KINDS[kind] = cls
        cls.recipe_kind = kind
        return cls

    return register


def kind_of(cls: type) -> str:
    return getattr(cls, "recipe_kind", "")
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


def recipe_class(tree: dict, cls: type | None, source: str) -> type:
    """The schema for a recipe tree: its `kind:` looked up in the registry, checked against `cls`
    when the caller needs a particular kind (a recipe without `kind:` is taken as `cls`)."""
    kind = tree.get("kind")
    if cls is not None:
        if kind is not None and kind != kind_of(cls):
            raise ConfigError(f"{source}: this is a `kind: {kind}` recipe; a {kind_of(cls)} recipe is needed here")
        return cls
    if kind is None:
        raise ConfigError(f"{source}: the recipe has no `kind:` line; add one of {sorted(RECIPE_KINDS)}")
    if kind not in RECIPE_KINDS:
        raise ConfigError(f"{source}: unknown kind {kind!r}{_nearest(str(kind), sorted(RECIPE_KINDS))}")
    return RECIPE_KINDS[kind]


def load_recipe(name_or_path: str | Path, cls: type[T] | None = None, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe (with `base:`), apply `--set` overrides, validate into its schema: `cls`,
    or the class registered for the recipe's `kind:`."""
    path = recipe_path(name_or_path)
    tree = load_yaml_tree(path)
    cls = recipe_class(tree, cls, str(path))
    tree.pop("kind", None)
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
    """A recipe as YAML that `load_recipe` reads back (its `kind:` first)."""
    kind = {"kind": kind_of(type(obj))} if kind_of(type(obj)) else {}
    return yaml.safe_dump({**kind, **to_dict(obj)}, sort_keys=False)


def save_resolved(obj: Any, path: Path) -> None:
    """Write the resolved recipe next to an output (atomically)."""

    atomic_write_text(Path(path), to_yaml(obj))

