"""One loading convention for every model kind: `Kind.from_pretrained(name_or_path)` and
`model.save_pretrained(folder)`, on the huggingface_hub `ModelHubMixin` contract (so
`push_to_hub` works for users with an account).

`name_or_path` is looked up in one order for every kind (`locate`):

    None                  the kind's default (weights.DefaultModel: $env, $TOKENFLOW_HOME, shipped)
    an existing path      a run folder or a weights file
    a built-in name       a model shipped in the package ("toy")
    "owner/name"          a Hugging Face hub id: the local cache (HF_HUB_OFFLINE=1), else downloaded

Each kind owns its folder format: it implements `_load(path, ...)` (a local folder or file) and
`_save_pretrained(folder)`. What a loaded model was made from travels with it (`Provenance`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub import ModelHubMixin, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from tokenflow_cli.weights import WEIGHT_SUFFIXES, DefaultModel, MissingWeightsError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from: said in every output that it makes."""

    source: str  # the weights file or folder it was loaded from, or a description of what was built
    random_init: bool = False  # no trained weights: outputs are meaningless

    @classmethod
    def built(cls, what: str = "built from a config") -> Provenance:
        return cls(f"{what}, RANDOM INIT", True)


class NoModelError(MissingWeightsError):
    """`name_or_path` names no model this machine has."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def locate(name_or_path: str | Path | None, defaults: DefaultModel, *, revision: str | None = None,
           cache_dir: str | Path | None = None, local_files_only: bool = False, token: str | bool | None = None,
           force_download: bool = False) -> Path:
    """A local file or folder for `name_or_path` (see the module docstring for the order)."""
    if name_or_path is None:
        found = defaults.find()
        if found is None:
            looked = ", ".join(str(p) for p in defaults.candidates())
            how = defaults.how or f"pass a path or set {defaults.env}"
            raise NoModelError(f"no {defaults.kind} model (looked at {looked}): {how}")
        return found
    path = Path(name_or_path).expanduser()
    if path.exists() or path.suffix in WEIGHT_SUFFIXES:  # a missing file: the kind's loader says so
        return path
    name = str(name_or_path)
    builtin = defaults.builtin(name)
    if builtin is not None:
        return builtin
    if HUB_ID.fullmatch(name) and not path.parent.exists():  # "runs/missing" is a path, not a hub id
        try:
            return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                          local_files_only=local_files_only or _offline(),
                                          force_download=force_download))
        except LocalEntryNotFoundError:
            raise NoModelError(f"{name}: not in the local Hugging Face cache and downloads are off "
                               "(HF_HUB_OFFLINE); copy the cache from a machine that has it") from None
    names = ", ".join(defaults.builtin_names()) or "none"
    raise NoModelError(f"no {defaults.kind} at {name!r}: not a path, a built-in name ({names}) "
                       "or a hub id (owner/name)")


class Pretrained(ModelHubMixin):
    """`from_pretrained` / `save_pretrained` / `push_to_hub` for one model kind.

    A subclass sets `defaults` (where its default model is looked for) and implements
    `_load(path, **options)` and `_save_pretrained(folder)`."""

    defaults: ClassVar[DefaultModel]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None, **options: Any):
        """Load a model: `name_or_path` is a run folder, a weights file, a built-in name, a hub id
        or None (the default model); `options` (device, dtype, ...) go to the kind's loader."""
        path = locate(name_or_path, cls.defaults, revision=revision, cache_dir=cache_dir,
                      local_files_only=local_files_only, token=token, force_download=force_download)
        return cls._load(path, **options)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None, **options: Any):
        """The `ModelHubMixin` hook (its own `from_pretrained` calls this)."""
        return cls.from_pretrained(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                   local_files_only=local_files_only, token=token, **options)

    @classmethod
    def _load(cls, path: Path, **options: Any):
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict | None = None,
                        **push_to_hub_kwargs: Any) -> str | None:
        """Write the kind's folder (its config travels inside it, so `config` is not needed);
        with `push_to_hub`, upload it to `repo_id` (default: the folder's name)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(folder)
        if push_to_hub:
            return self.push_to_hub(repo_id or folder.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None
