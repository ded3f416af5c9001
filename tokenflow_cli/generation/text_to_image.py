"""TextToImage: the text-to-image pipeline (generator + its image tokenizer + its text
tokenizer), loaded and saved as one generator run folder (generation/run_folder.py).

    pipe = TextToImage.from_pretrained()                 # or a run folder, "toy", a hub id
    out = pipe("a red fox", k1=1200, k2=100, seed=0, n=4)
    out.images                                           # 4 PIL images
    pipe.save_pretrained("runs/t2i")

`generate_images` is the batched sampler under it (what `generate` and GenEval run): one
torch.Generator seeded with the settings' seed drives a whole run, so the same prompts, settings
and batch size give the same images; the global RNG is never touched.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenflow_cli.checkpoint import WEIGHTS_NAME, save_weights
from tokenflow_cli.config import load_recipe, to_dict
from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.device import dtype_of
from tokenflow_cli.eval.visual import to_uint8
from tokenflow_cli.generation.config import GeneratorRecipe, attach_code_space
from tokenflow_cli.generation.model import NextScaleGenerator, build_generator
from tokenflow_cli.generation.prompts import PromptEncoder, load_text_tokenizer
from tokenflow_cli.generation.run_folder import IMAGE_TOKENIZER_NAME, KIND, read_run_folder, write_run_files
from tokenflow_cli.generation.sampling import (
    Schedule,
    format_schedule,
    get_schedule,
    sampler_defaults,
    schedule_from_pairs,
)
from tokenflow_cli.pretrained import Pretrained, Provenance
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.weights import DEFAULT_GENERATOR


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


@dataclass
class TextToImageOutput:
    images: list[Image.Image]  # n per prompt, prompts in order
    prompts: list[str]  # the prompt of each image
    codes: np.ndarray  # (N, L) int32 multi-scale indices of each image
    settings: GenerationSettings  # what made them (schedule, cfg, seed, ...)


class TextToImage(Pretrained):
    """The generator with the image tokenizer that embeds and decodes its codes and the text
    tokenizer that reads its prompts. `provenance` says where the generator came from."""

    defaults = DEFAULT_GENERATOR

    def __init__(self, model: NextScaleGenerator, tokenizer: TokenFlowTokenizer, text_tokenizer,
                 provenance: Provenance | None = None) -> None:
        model.check_embedder(tokenizer)
        self.model = model
        self.tokenizer = tokenizer  # the image tokenizer
        self.text_tokenizer = text_tokenizer
        self.prompts = PromptEncoder.for_model(text_tokenizer, model.config)
        self.provenance = provenance or Provenance.built(f"generator {model.config.name}")

    @property
    def source(self) -> str:
        return self.provenance.source

    @property
    def random_init(self) -> bool:
        return self.provenance.random_init

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer.source

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

    def __call__(self, prompt: str | list[str], *, n: int = 1, seed: int = 0, k1: int | None = None,
                 p1: float | None = None, k2: int | None = None, p2: float | None = None, k3: int | None = None,
                 p3: float | None = None, preset: str | None = None, cfg: float | None = None,
                 negative_prompt: str | None = None, temperature: float = 1.0,
                 batch_size: int = 16) -> TextToImageOutput:
        """`n` images per prompt. The sampling schedule is the passes given (k1/p1, k2/p2, k3/p3:
        each pass re-predicts every scale), or an official preset by name ("one-pass",
        "two-pass", "three-pass"), or the model's default; `cfg` and `negative_prompt` likewise."""
        explicit = schedule_from_pairs([(k1, p1), (k2, p2), (k3, p3)])
        if explicit and preset:
            raise ValueError("give the passes (k1/p1, ...) or a preset, not both")
        schedule = explicit or (get_schedule(preset) if preset else None)
        settings = self.default_settings(schedule=schedule, cfg=cfg, negative_prompt=negative_prompt,
                                         temperature=temperature, seed=seed, samples_per_prompt=n,
                                         batch_size=batch_size)
        result = generate_images(self, [prompt] if isinstance(prompt, str) else list(prompt), settings)
        return TextToImageOutput([Image.fromarray(a) for a in result.images], result.prompts, result.codes, settings)

    # ---- loading and saving ------------------------------------------------------------------

    @classmethod
    def _load(cls, path: Path, device: torch.device | str = "cpu", dtype: str | None = None,
              tokenizer: str | None = None) -> TextToImage:
        """A generator run folder (or one of its checkpoints). `tokenizer` names an image tokenizer
        to use instead of the run's; the model runs in `dtype` (fp32, bf16, fp16), by default in
        the dtype its weights are stored in (a converted bf16 release stays bf16)."""
        device = torch.device(device)
        folder = read_run_folder(path)
        model = folder.model.to(device=device, dtype=dtype_of(dtype) if dtype else None).eval()
        text_tokenizer = load_text_tokenizer(folder.text_tokenizer_dir)
        return cls(model, _image_tokenizer(folder.image_tokenizer_candidates, tokenizer, device), text_tokenizer,
                   Provenance(str(folder.weights)))

    def _save_pretrained(self, save_directory: Path) -> None:
        """The run folder, with the image tokenizer copied in (the folder generates on its own)."""
        folder = Path(save_directory)
        self.tokenizer.save_checkpoint(folder / IMAGE_TOKENIZER_NAME)
        write_run_files(folder, self.model, self.text_tokenizer, folder / IMAGE_TOKENIZER_NAME)
        save_weights(self.model.state_dict(), folder / WEIGHTS_NAME, to_dict(self.model.config), kind=KIND)


def _image_tokenizer(candidates: list[Path], override: str | None, device: torch.device) -> TokenFlowTokenizer:
    """`override`, else the run's copy or the tokenizer it names, else the default tokenizer."""
    if override:
        if not Path(override).exists():
            raise FileNotFoundError(f"image tokenizer not found: {override}")
        return TokenFlowTokenizer.from_pretrained(override, device=device)
    for candidate in candidates:
        if candidate.exists():
            return TokenFlowTokenizer.from_pretrained(candidate, device=device)
    return resolve_tokenizer(None, device)


def resolve_generator(model: str | None, device: torch.device | str, tokenizer: str | None = None,
                      dtype: str | None = None) -> TextToImage:
    """An explicit run folder/checkpoint/built-in name, else the default generator, else a
    clearly labelled random-init tiny one (so `generate` always runs)."""
    if model or DEFAULT_GENERATOR.find() is not None:
        return TextToImage.from_pretrained(model, device=device, tokenizer=tokenizer, dtype=dtype)
    return random_tiny_generator(device, tokenizer)


def random_tiny_generator(device: torch.device | str, tokenizer: str | None = None, seed: int = 0) -> TextToImage:
    """The generator-tiny recipe with weights drawn from `seed` (the global RNG is left alone)."""
    recipe = load_recipe("generator-tiny", GeneratorRecipe)
    text_tokenizer = train_bpe_tokenizer(["a photo of a red circle left of a blue square"], vocab_size=300)
    tok = resolve_tokenizer(tokenizer, device)
    cfg = attach_code_space(dataclasses.replace(recipe.model, text_vocab_size=len(text_tokenizer)),
                            tok.scales, tok.codebook_size, tok.code_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_generator(cfg)
    source = Provenance("generator-tiny recipe, RANDOM INIT (no trained generator found: run `make demo`)", True)
    return TextToImage(model.to(device).eval(), tok, text_tokenizer, source)


@torch.no_grad()
def generate_images(pipe: TextToImage, prompts: list[str], settings: GenerationSettings,
                    progress: Callable[[int], None] | None = None) -> GenerationResult:
    """Every prompt `samples_per_prompt` times, in batches, from one torch.Generator seeded with
    `settings.seed`."""
    model, tok = pipe.model, pipe.tokenizer
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    images, codes = [], []
    start = time.perf_counter()
    for first in range(0, len(rows), settings.batch_size):
        batch = rows[first : first + settings.batch_size]
        text = pipe.prompts(batch, device)
        negative = pipe.prompts([settings.negative_prompt] * len(batch), device) if settings.cfg else None
        idx_BL = model.generate(tok, text, negative, settings.schedule, settings.cfg, settings.temperature,
                                generator, use_cache=settings.use_cache, keep_ties=settings.keep_ties)
        images.append(to_uint8(tok.codes_to_img(idx_BL)))
        codes.append(idx_BL.cpu().numpy().astype(np.int32))
        if progress is not None:
            progress(len(batch))
    return GenerationResult(rows, np.concatenate(images), np.concatenate(codes), time.perf_counter() - start)
