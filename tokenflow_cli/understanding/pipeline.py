"""Understanding: a finetuned LLaVA-style model with the frozen image tokenizer it reads images
through (what `ask` and `eval vqa` share).

    vlm = Understanding.from_pretrained()                # or a model / finetune run folder, "toy"
    vlm.ask(image, "What colour is the circle?")         # one answer
    vlm.ask_batch(images, questions)                     # one answer per (image, question)
    vlm.save_pretrained("runs/llava")                    # the model folder + its image tokenizer

A model folder records the tokenizer it was trained on (`tokenizer_source`, and its sha256 when
it was a file); `tokenizer=` replaces it, e.g. after moving the files. The LM loads in the
precision the model records (`llm_dtype`: bf16 for a converted release) unless `dtype` names
another; with fp32 and bf16 the projector and the visual features stay fp32 (the official
computation in fp32). `dtype="fp16"` is the release as its own loader runs it: LM, projector and
image tokenizer in float16, features computed as the official code does in fp16
(`release_fp16.py`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenflow_cli.data.images import load_image, to_tensor_pm1
from tokenflow_cli.device import dtype_of
from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.pretrained import Pretrained
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.understanding.build import locate_llava
from tokenflow_cli.understanding.data import pad_to_square
from tokenflow_cli.understanding.features import TokenizerFeatures, build_feature_source
from tokenflow_cli.understanding.model import LLAVA_JSON, LlavaModel
from tokenflow_cli.understanding.release_fp16 import ReleaseFp16Features
from tokenflow_cli.weights import DEFAULT_LLAVA

IMAGE_TOKENIZER_NAME = "image_tokenizer.safetensors"  # the tokenizer copy `save_pretrained` writes
AskImage = Image.Image | str | Path | np.ndarray


def llava_input(image: AskImage, size: int) -> torch.Tensor:
    """An image (PIL, path or uint8 (H, W, 3) array) -> (3, size, size) in [-1, 1], padded to
    square first (LLaVA's `pad` aspect mode)."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    img = pad_to_square(image.convert("RGB"))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return to_tensor_pm1(img)


class Understanding(Pretrained):
    """The LLaVA model and its visual feature source (the frozen image tokenizer)."""

    defaults = DEFAULT_LLAVA

    def __init__(self, model: LlavaModel, features: TokenizerFeatures | ReleaseFp16Features,
                 model_dir: Path | None = None, dtype: str = "fp32", warnings: list[str] | None = None) -> None:
        self.model = model
        self.features = features
        self.model_dir = model_dir  # the folder it was loaded from (None: built in memory)
        self.dtype = dtype  # the LM's precision: fp32 | bf16 | fp16 (fp16: everything, as the release runs)
        self.warnings = list(warnings or [])  # to be shown: random init, hash mismatch

    @property
    def tokenizer(self) -> TokenFlowTokenizer:
        """The image tokenizer."""
        return self.features.tokenizer

    @property
    def feature_scales(self) -> str:
        """Which scales' codes the model reads: "final" | "all" | "residual" (features.py)."""
        return self.model.config.feature_scales

    @property
    def text_tokenizer(self):
        return self.model.text_tokenizer

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer.source

    @torch.no_grad()
    def visual_tokens(self, images: Sequence[AskImage]) -> torch.Tensor:
        """Images (paths, PIL images or uint8 arrays) -> (B, N, C) features on the model's device."""
        device = next(self.model.parameters()).device
        return self.features(torch.stack([llava_input(img, self.features.image_size) for img in images]).to(device))

    def ask(self, image: AskImage, question: str, max_new_tokens: int = 128, temperature: float = 0.0,
            seed: int = 0) -> str:
        """The answer to one question about one image (greedy at temperature 0)."""
        return self.ask_batch([image], [question], max_new_tokens, temperature, seed)[0]

    @torch.no_grad()
    def ask_batch(self, images: Sequence[AskImage], questions: Sequence[str], max_new_tokens: int = 128,
                  temperature: float = 0.0, seed: int = 0) -> list[str]:
        """One answer per (image, question) pair, in one batch; sampling (temperature > 0) draws
        from a torch.Generator seeded with `seed`."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        visual_BNC = self.visual_tokens(images)
        generator = torch.Generator(visual_BNC.device).manual_seed(seed) if temperature > 0 else None
        return self.model.answer(visual_BNC, list(questions), max_new_tokens, temperature, generator)

    # ---- loading and saving ------------------------------------------------------------------

    @classmethod
    def _load(cls, path: Path, device: torch.device | str = "cpu", dtype: str = "auto",
              tokenizer: str | None = None) -> Understanding:
        """A model folder or finetune run folder with its image tokenizer (`tokenizer` overrides
        the one the model names), on `device`; `dtype` "auto" keeps the recorded precision."""
        model_dir, weights = locate_llava(path.parent if path.is_file() else path)  # llava.json names its folder
        info = json.loads((model_dir / LLAVA_JSON).read_text())
        dtype = info.get("config", {}).get("llm_dtype", "fp32") if dtype == "auto" else dtype
        llava = LlavaModel.from_pretrained(model_dir, dtype=dtype_of(dtype), weights=weights).to(device).eval()
        source = tokenizer or llava.extra.get("tokenizer_source", "")
        if source and not tokenizer and (model_dir / source).is_file():  # the folder's own copy
            source = str(model_dir / source)
        warnings = [] if source else ["the model names no tokenizer; using the default one"]
        tok = resolve_tokenizer(source or None, device)
        if tok.random_init:
            warnings.append(f"tokenizer {tok.source}: RANDOM INIT, answers are meaningless")
        expected = llava.extra.get("tokenizer_sha256")
        if expected and Path(tok.source).is_file() and file_sha256(tok.source) != expected:
            warnings.append(f"tokenizer {tok.source} differs from the one the model was trained on")
        cfg = llava.config
        if dtype == "fp16":  # the official loader's float16 run
            if (cfg.features, cfg.feature_scales) != ("tokenflow", "final"):
                raise ValueError(f"--dtype fp16 runs the release's final tokenflow features, not "
                                 f"{cfg.features!r} with feature_scales={cfg.feature_scales!r}")
            features = ReleaseFp16Features(tok, cfg.feature_grid)
            llava.projector.to(torch.float16)
        else:
            features = build_feature_source(tok, cfg.features, cfg.feature_grid, cfg.feature_scales)
        if (features.num_tokens, features.feature_dim) != (llava.num_visual_tokens, llava.feature_dim):
            raise ValueError(
                f"tokenizer {tok.source} gives {features.num_tokens} x {features.feature_dim} {cfg.features} "
                f"({cfg.feature_scales}) tokens; the model expects {llava.num_visual_tokens} x {llava.feature_dim}"
            )
        if getattr(features.teacher, "random_init", False):
            warnings.append("teacher features come from a RANDOM INIT teacher")
        return cls(llava, features, model_dir, dtype, warnings)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The model folder (LM, text tokenizer, projector, llava.json) with a copy of the image
        tokenizer, which llava.json names: the folder answers on its own."""
        folder = Path(save_directory)
        self.model.save_pretrained(folder, atomic=False)
        self.tokenizer.save_checkpoint(folder / IMAGE_TOKENIZER_NAME)
        info = json.loads((folder / LLAVA_JSON).read_text())
        info.update(tokenizer_source=IMAGE_TOKENIZER_NAME, tokenizer_sha256=file_sha256(folder / IMAGE_TOKENIZER_NAME))
        (folder / LLAVA_JSON).write_text(json.dumps(info, indent=2))
