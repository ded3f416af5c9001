"""The generator's folder format (written by `train-generator`, `convert` and
`TextToImage.save_pretrained`; read by `TextToImage.from_pretrained`):

    model.safetensors             the generator (LM + projectors + head), its
                                  GeneratorModelConfig in the metadata (written by the loop)
    generator.json                the LM's transformers config, the image tokenizer's source
    text_tokenizer/               the prompt tokenizer (transformers `save_pretrained` layout)
    image_tokenizer.safetensors   a copy of the image tokenizer when it is small (tiny runs), so
                                  the folder generates on its own
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenflow_cli.checkpoint import WEIGHTS_NAME, load_state, resolve_weights_path, save_weights
from tokenflow_cli.config import from_dict, to_dict
from tokenflow_cli.fileio import atomic_write_text
from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.model import NextScaleGenerator, build_generator

KIND = "generator"
TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_NAME = "image_tokenizer.safetensors"
SIDECAR_NAME = "generator.json"
COPY_TOKENIZER_MAX_BYTES = 200 * 2**20  # copy the image tokenizer into the run when smaller


def write_run_files(
    run_dir: str | Path, model: NextScaleGenerator, text_tokenizer, image_tokenizer_path: str | Path | None
) -> None:
    """Everything but the weights: the prompt tokenizer, `generator.json` (the LM's
    transformers config and where the image tokenizer is) and a copy of a small image tokenizer.
    Written before training starts, so every checkpoint of the run loads."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text_tokenizer.save_pretrained(str(run_dir / TEXT_TOKENIZER_DIR))
    source = ""
    if image_tokenizer_path:
        src = resolve_weights_path(image_tokenizer_path)
        source = str(src.resolve())
        copy = run_dir / IMAGE_TOKENIZER_NAME
        if src.stat().st_size <= COPY_TOKENIZER_MAX_BYTES and src.resolve() != copy.resolve():
            shutil.copyfile(src, copy)
    sidecar = {"lm_config": model.lm.config.to_dict(), "image_tokenizer": source, "text_tokenizer": TEXT_TOKENIZER_DIR}
    atomic_write_text(run_dir / SIDECAR_NAME, json.dumps(sidecar, indent=2))


def save_generator(
    run_dir: str | Path, model: NextScaleGenerator, text_tokenizer, image_tokenizer_path: str | Path | None
) -> Path:
    """A complete run folder outside the training loop (tests, conversions)."""
    write_run_files(run_dir, model, text_tokenizer, image_tokenizer_path)
    save_weights(model.state_dict(), Path(run_dir) / WEIGHTS_NAME, to_dict(model.config), kind=KIND)
    return Path(run_dir) / WEIGHTS_NAME


def run_dir_of(weights: Path) -> Path:
    """The run folder of RUN/model.safetensors or RUN/checkpoints/step-N/model.safetensors."""
    for folder in (weights.parent, *weights.parents[1:3]):
        if (folder / SIDECAR_NAME).is_file():
            return folder
    raise FileNotFoundError(f"{weights}: no {SIDECAR_NAME} next to it or in its run folder")


@dataclass
class GeneratorFolder:
    """A generator run folder as read from disk (the model built, nothing else loaded)."""

    model: NextScaleGenerator  # on the CPU, in the dtype its weights are stored in
    weights: Path  # the model.safetensors it came from
    run_dir: Path
    text_tokenizer_dir: Path
    image_tokenizer_candidates: list[Path]  # the run's copy, then the source it names (may be gone)


def read_run_folder(path: str | Path) -> GeneratorFolder:
    """A run folder, or one checkpoint file of it -> the model and where its tokenizers are."""
    weights = resolve_weights_path(path)
    state, meta = load_state(weights)
    if meta.get("format") != f"tokenflow-cli/{KIND}" or "config" not in meta:
        raise ValueError(f"{weights} is not a tokenflow-cli generator checkpoint (format={meta.get('format')!r})")
    cfg = from_dict(GeneratorModelConfig, meta["config"], str(weights))
    run_dir = run_dir_of(weights)
    sidecar = json.loads((run_dir / SIDECAR_NAME).read_text())
    model = model_from_state(cfg, sidecar["lm_config"], state)
    candidates = [run_dir / IMAGE_TOKENIZER_NAME] + ([Path(sidecar["image_tokenizer"])]
                                                     if sidecar.get("image_tokenizer") else [])
    return GeneratorFolder(model, weights, run_dir, run_dir / sidecar.get("text_tokenizer", TEXT_TOKENIZER_DIR),
                           candidates)


def model_from_state(cfg: GeneratorModelConfig, lm_config: dict, state: dict[str, torch.Tensor]) -> NextScaleGenerator:
    """The model holding the checkpoint's own tensors (their dtype, no second copy: a 7B in bf16
    needs its 13 GiB once): built on the meta device, the state assigned, the LM's rotary
    embedding (its only non-persistent buffers) rebuilt on the CPU."""
    with torch.device("meta"):
        model = build_generator(cfg, lm_config=lm_config)
    model.load_state_dict(state, strict=True, assign=True)
    rotary = model.lm.rotary_emb
    model.lm.rotary_emb = type(rotary)(config=model.lm.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"checkpoint leaves {left[0]!r} unset ({len(left)} tensors)")
    return model
