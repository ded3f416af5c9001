"""Library side of `generate` (and of `train-generator`'s outputs): prompt encoding, saving and
loading generator run folders, the default generator, batched text-to-image sampling and the
files it writes. Progress goes through a callback; the CLI draws it.

A generator run folder holds

    model.safetensors             the generator (LM + projectors + head), its
                                  GeneratorModelConfig in the metadata (written by the loop)
    generator.json                the LM's transformers config, the image tokenizer's source
    text_tokenizer/               the prompt tokenizer (transformers `save_pretrained` layout)
    image_tokenizer.safetensors   a copy of the image tokenizer when it is small (tiny runs), so
                                  the folder generates on its own
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from tokenflow_cli.checkpoint import WEIGHTS_NAME, load_state, resolve_weights_path, save_weights
from tokenflow_cli.config import from_dict, load_recipe, to_dict
from tokenflow_cli.data.captions import read_jsonl
from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.device import dtype_of
from tokenflow_cli.eval.visual import save_png, tile, to_uint8
from tokenflow_cli.fileio import atomic_write_text
from tokenflow_cli.generation.config import GeneratorModelConfig, GeneratorRecipe, attach_code_space
from tokenflow_cli.generation.model import NextScaleGenerator, TextBatch, build_generator
from tokenflow_cli.generation.sampling import Schedule, format_schedule, get_schedule, sampler_defaults
from tokenflow_cli.generation.text_layout import text_layout
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer, load_tokenizer
from tokenflow_cli.tokenizer.pipeline import resolve_tokenizer
from tokenflow_cli.weights import DEFAULT_GENERATOR

KIND = "generator"
TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_NAME = "image_tokenizer.safetensors"
SIDECAR_NAME = "generator.json"
COPY_TOKENIZER_MAX_BYTES = 200 * 2**20  # copy the image tokenizer into the run when smaller


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


class PromptEncoder:
    """Prompts -> left-padded `TextBatch`: BOS (when the tokenizer has one) + the prompt's
    tokens, truncated to `max_tokens` (the start of the prompt is kept), under a text layout
    (generation/text_layout.py): padded to the batch's longest, or always to `max_tokens`
    followed by the `<img>` marker ids but the last (official)."""

    def __init__(self, tokenizer, max_tokens: int, layout: str = "padded", marker_ids: tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.layout = text_layout(layout)
        self.marker = list(marker_ids[:-1]) if self.layout.image_marker else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    @classmethod
    def for_model(cls, tokenizer, cfg: GeneratorModelConfig) -> PromptEncoder:
        return cls(tokenizer, cfg.max_text_tokens, cfg.text_layout, tuple(cfg.image_marker_ids))

    def ids(self, prompt: str) -> list[int]:
        return (self.bos + self.tokenizer(prompt, add_special_tokens=False)["input_ids"])[: self.max_tokens]

    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> TextBatch:
        rows = [self.ids(p) for p in prompts]
        width = self.max_tokens if self.layout.fixed_length else max(1, max(len(r) for r in rows))
        T = width + len(self.marker)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, row in enumerate(rows):
            row = row + self.marker
            if row:
                ids[i, T - len(row) :] = torch.tensor(row)
                mask[i, T - len(row) :] = 1
        return TextBatch(ids.to(device), mask.to(device))


def load_text_tokenizer(path: str | Path):
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(f"no text tokenizer at {path}: {err}") from None


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------


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


def _run_dir_of(weights: Path) -> Path:
    """The run folder of RUN/model.safetensors or RUN/checkpoints/step-N/model.safetensors."""
    for folder in (weights.parent, *weights.parents[1:3]):
        if (folder / SIDECAR_NAME).is_file():
            return folder
    raise FileNotFoundError(f"{weights}: no {SIDECAR_NAME} next to it or in its run folder")


@dataclass
class LoadedGenerator:
    model: NextScaleGenerator
    prompts: PromptEncoder
    tokenizer: TokenFlowTokenizer  # the image tokenizer (code embedder and decoder)
    source: str
    tokenizer_source: str
    random_init: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def default_settings(self, **given) -> GenerationSettings:
        """The model's sampler defaults (`model.sampler_defaults`) under the values given
        (None = the default): schedule, cfg, negative_prompt, keep_ties, ..."""
        defaults = sampler_defaults(self.model.config.sampler_defaults)
        base = {"schedule": get_schedule(defaults.schedule), "cfg": defaults.cfg,
                "negative_prompt": defaults.negative_prompt, "keep_ties": defaults.keep_ties}
        return GenerationSettings(**(base | {k: v for k, v in given.items() if v is not None}))


def _image_tokenizer_for(run_dir: Path, sidecar: dict, override: str | None, device: torch.device):
    candidates = [override] if override else [run_dir / IMAGE_TOKENIZER_NAME, sidecar.get("image_tokenizer") or None]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return load_tokenizer(str(candidate), device), str(candidate)
    if override:
        raise FileNotFoundError(f"image tokenizer not found: {override}")

    resolved = resolve_tokenizer(None, device)
    return resolved.tokenizer, resolved.source


def load_generator(
    path: str | Path, device: torch.device | str = "cpu", tokenizer: str | None = None, dtype: str | None = None
) -> LoadedGenerator:
    """A generator run folder (or one of its checkpoints) -> model, prompt encoder, image
    tokenizer (`tokenizer` overrides the one the run names). The model runs in `dtype` (fp32,
    bf16, fp16), by default in the dtype its weights are stored in (a converted bf16 release
    stays bf16)."""
    device = torch.device(device)
    weights = resolve_weights_path(path)
    state, meta = load_state(weights)
    if meta.get("format") != f"tokenflow-cli/{KIND}" or "config" not in meta:
        raise ValueError(f"{weights} is not a tokenflow-cli generator checkpoint (format={meta.get('format')!r})")
    cfg = from_dict(GeneratorModelConfig, meta["config"], str(weights))
    run_dir = _run_dir_of(weights)
    sidecar = json.loads((run_dir / SIDECAR_NAME).read_text())
    model = _from_state(cfg, sidecar["lm_config"], state)
    model = model.to(device=device, dtype=dtype_of(dtype) if dtype else None).eval()
    text_tok = load_text_tokenizer(run_dir / sidecar.get("text_tokenizer", TEXT_TOKENIZER_DIR))
    image_tok, tok_source = _image_tokenizer_for(run_dir, sidecar, tokenizer, device)
    model.check_embedder(image_tok)
    return LoadedGenerator(model, PromptEncoder.for_model(text_tok, cfg), image_tok, str(weights), tok_source)


def _from_state(cfg: GeneratorModelConfig, lm_config: dict, state: dict[str, torch.Tensor]) -> NextScaleGenerator:
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


def resolve_generator(model: str | None, device: torch.device, tokenizer: str | None = None,
                      dtype: str | None = None) -> LoadedGenerator:
    """An explicit run folder/checkpoint, else the default generator, else a clearly labelled
    random-init tiny one (so `generate` always runs)."""
    if model:
        return load_generator(model, device, tokenizer, dtype)
    found = DEFAULT_GENERATOR.find()
    if found is not None:
        return load_generator(found, device, tokenizer, dtype)
    return random_tiny_generator(device, tokenizer)


def random_tiny_generator(device: torch.device, tokenizer: str | None = None) -> LoadedGenerator:
    recipe = load_recipe("generator-tiny", GeneratorRecipe)
    text_tok = train_bpe_tokenizer(["a photo of a red circle left of a blue square"], vocab_size=300)
    resolved = resolve_tokenizer(tokenizer, device)
    tok = resolved.tokenizer
    cfg = attach_code_space(dataclasses.replace(recipe.model, text_vocab_size=len(text_tok)),
                            tok.scales, tok.codebook_size, tok.code_dim)
    torch.manual_seed(0)
    model = build_generator(cfg).to(device).eval()
    model.check_embedder(tok)
    source = "generator-tiny recipe, RANDOM INIT (no trained generator found: run `make demo`)"
    return LoadedGenerator(model, PromptEncoder.for_model(text_tok, cfg), resolved.tokenizer, source,
                           resolved.source, random_init=True)


# --------------------------------------------------------------------------------------------
# Sampling many prompts
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    schedule: Schedule
    cfg: float = 3.0
    temperature: float = 1.0
    seed: int = 0
    samples_per_prompt: int = 1
    negative_prompt: str = ""
    batch_size: int = 16  # images per forward (the CFG batch is twice this)
    use_cache: bool = True
    keep_ties: bool = False  # top-k keeps every code tied with the k-th (official)

    def to_json(self) -> dict:
        out = asdict(self)
        out["schedule"] = format_schedule(self.schedule)
        out["passes"] = [{"top_k": p.top_k, "top_p": p.top_p} for p in self.schedule]
        return out


@dataclass
class GenerationResult:
    prompts: list[str]  # one per image (a prompt repeated samples_per_prompt times)
    images: np.ndarray  # (N, H, W, 3) uint8
    codes: np.ndarray  # (N, L) int32
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def generate_images(
    loaded: LoadedGenerator,
    prompts: list[str],
    settings: GenerationSettings,
    progress: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Every prompt `samples_per_prompt` times, in batches. One torch.Generator seeded with
    `settings.seed` drives the whole run: the same prompts, settings and batch size give the
    same images."""

    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    images, codes = [], []
    start = time.perf_counter()
    for first in range(0, len(rows), settings.batch_size):
        batch = rows[first : first + settings.batch_size]
        text = loaded.prompts(batch, device)
        negative = loaded.prompts([settings.negative_prompt] * len(batch), device) if settings.cfg else None
        idx_BL = model.generate(tok, text, negative, settings.schedule, settings.cfg, settings.temperature,
                                generator, use_cache=settings.use_cache, keep_ties=settings.keep_ties)
        images.append(to_uint8(tok.codes_to_img(idx_BL)))
        codes.append(idx_BL.cpu().numpy().astype(np.int32))
        if progress is not None:
            progress(len(batch))
    return GenerationResult(rows, np.concatenate(images), np.concatenate(codes), time.perf_counter() - start)


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def write_outputs(out_dir: str | Path, result: GenerationResult, settings: GenerationSettings,
                  extra: dict | None = None) -> list[Path]:
    """PNGs (00000.png, ...), grid.png (one row per prompt, up to 16) and settings.json."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(result.images):
        save_png(img, out_dir / image_name(i))
        written.append(out_dir / image_name(i))
    per_row = settings.samples_per_prompt
    ncols = per_row if per_row > 1 else 8  # one row per prompt when there are several samples
    save_png(tile(result.images[: 16 * ncols], ncols=ncols), out_dir / "grid.png")
    record = {**settings.to_json(), **(extra or {}), "seconds": round(result.seconds, 3),
              "images": [{"file": image_name(i), "prompt": p} for i, p in enumerate(result.prompts)]}
    atomic_write_text(out_dir / "settings.json", json.dumps(record, indent=2))
    return [*written, out_dir / "grid.png", out_dir / "settings.json"]


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line, blank lines and #-comments skipped) or a .jsonl with
    "prompt" (or "caption") fields."""
    path = Path(path)
    if path.suffix == ".jsonl":

        records = read_jsonl(path)
        out = [str(r.get("prompt", r.get("caption", ""))) for r in records]
        if any(not ("prompt" in r or "caption" in r) for r in records):
            raise ValueError(f"{path}: every record needs a \"prompt\" or \"caption\"")
        return out
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
