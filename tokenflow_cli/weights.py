"""Where pretrained weights are looked for, offline only, with errors that say how to fix it.

Nothing here downloads: open_clip tags are looked up in the local Hugging Face cache (and
open_clip's own URL cache, ~/.cache/clip); everything else must be a local path. When a file
is missing, `MissingWeightsError` names what was expected and the `--set` override that
points the recipe at a local copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class MissingWeightsError(FileNotFoundError):
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
        from huggingface_hub import try_to_load_from_cache

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
    """An open_clip tag (local cache only) or a local checkpoint path -> a file to load."""
    if looks_like_path(pretrained):
        return OpenClipWeights(require_local_file(pretrained, config_key), quick_gelu=False)
    import open_clip

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
        from huggingface_hub import try_to_load_from_cache

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
