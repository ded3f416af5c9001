"""Loading a finetuned understanding model with the frozen tokenizer it was trained on
(what `ask` and `eval vqa` share).

A saved model folder records the tokenizer it was trained on (`tokenizer_source`, and its
sha256 when it was a file); `--tokenizer` replaces it, e.g. after moving the files. The LM loads
in the precision the model records (`llm_dtype`: bf16 for a converted release) unless `dtype`
names another; the projector and the visual features stay fp32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenflow_cli.device import dtype_of
from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.tokenizer.pipeline import resolve_tokenizer
from tokenflow_cli.understanding.build import locate_llava
from tokenflow_cli.understanding.data import load_llava_image
from tokenflow_cli.understanding.features import TokenizerFeatures, build_feature_source
from tokenflow_cli.understanding.model import LLAVA_JSON, LlavaModel
from tokenflow_cli.weights import DEFAULT_LLAVA


@dataclass
class Understanding:
    model: LlavaModel
    features: TokenizerFeatures
    model_dir: Path
    tokenizer_source: str
    dtype: str  # the LM's precision: fp32 | bf16 | fp16
    warnings: list[str] = field(default_factory=list)  # to be shown: random init, hash mismatch

    @torch.no_grad()
    def visual_tokens(self, image_paths: list[str | Path]) -> torch.Tensor:
        """Image files -> (B, N, C) features on the model's device."""

        device = next(self.model.parameters()).device
        images = [load_llava_image(p, self.features.image_size) for p in image_paths]
        return self.features(torch.stack(images).to(device))


def load_understanding(
    model: str | Path | None, device: torch.device, tokenizer: str | None = None, dtype: str = "auto"
) -> Understanding:
    """The model (`model`, else the default one) with its feature source, on `device`; `dtype`
    "auto" keeps the model's recorded precision."""
    found = Path(model) if model else DEFAULT_LLAVA.find()
    if found is None:
        looked = ", ".join(str(p) for p in DEFAULT_LLAVA.candidates())
        raise FileNotFoundError(
            f"no understanding model (looked at {looked}): pass --model (a model or finetune run folder) "
            "or set TOKENFLOW_LLAVA; train one with `tokenflow finetune-llava`"
        )
    model_dir, weights = locate_llava(found)
    info = json.loads((model_dir / LLAVA_JSON).read_text())
    dtype = info.get("config", {}).get("llm_dtype", "fp32") if dtype == "auto" else dtype
    llava = LlavaModel.from_pretrained(model_dir, dtype=dtype_of(dtype), weights=weights).to(device).eval()
    source = tokenizer or llava.extra.get("tokenizer_source", "")
    if source and not tokenizer and (model_dir / source).is_file():  # a converted folder's own copy
        source = str(model_dir / source)
    warnings = []
    if not source:
        warnings.append("the model names no tokenizer; using the default one")
    resolved = resolve_tokenizer(source or None, device)
    if resolved.random_init:
        warnings.append(f"tokenizer {resolved.source}: RANDOM INIT, answers are meaningless")
    expected = llava.extra.get("tokenizer_sha256")
    if expected and Path(resolved.source).is_file() and file_sha256(resolved.source) != expected:
        warnings.append(f"tokenizer {resolved.source} differs from the one the model was trained on")
    features = build_feature_source(resolved.tokenizer, llava.config.features, llava.config.feature_grid)
    if (features.num_tokens, features.feature_dim) != (llava.num_visual_tokens, llava.feature_dim):
        raise ValueError(
            f"tokenizer {resolved.source} gives {features.num_tokens} x {features.feature_dim} "
            f"{llava.config.features} tokens; the model expects {llava.num_visual_tokens} x {llava.feature_dim}"
        )
    if getattr(features.teacher, "random_init", False):
        warnings.append("teacher features come from a RANDOM INIT teacher")
    return Understanding(llava, features, model_dir, resolved.source, dtype, warnings)
