"""Loading a finetuned understanding model with the frozen tokenizer it was trained on
(what `ask` and `eval vqa` share).

A saved model folder records the tokenizer it was trained on (`tokenizer_source`, and its
sha256 when it was a file); `--tokenizer` replaces it, e.g. after moving the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.tokenizer.pipeline import resolve_tokenizer
from tokenflow_cli.understanding.build import locate_llava
from tokenflow_cli.understanding.data import load_llava_image
from tokenflow_cli.understanding.features import TokenizerFeatures, build_feature_source
from tokenflow_cli.understanding.model import LlavaModel
from tokenflow_cli.weights import DEFAULT_LLAVA


@dataclass
class Understanding:
    model: LlavaModel
    features: TokenizerFeatures
    model_dir: Path
    tokenizer_source: str
    warnings: list[str] = field(default_factory=list)  # to be shown: random init, hash mismatch

    @torch.no_grad()
    def visual_tokens(self, image_paths: list[str | Path]) -> torch.Tensor:
        """Image files -> (B, N, C) features on the model's device."""

        device = next(self.model.parameters()).device
        images = [load_llava_image(p, self.features.image_size) for p in image_paths]
        return self.features(torch.stack(images).to(device))


def load_understanding(model: str | Path | None, device: torch.device, tokenizer: str | None = None) -> Understanding:
    found = Path(model) if model else DEFAULT_LLAVA.find()
    if found is None:
        looked = ", ".join(str(p) for p in DEFAULT_LLAVA.candidates())
        raise FileNotFoundError(
            f"no understanding model (looked at {looked}): pass --model (a model or finetune run folder) "
            "or set TOKENFLOW_LLAVA; train one with `tokenflow finetune-llava`"
        )
    model_dir, weights = locate_llava(found)
    llava = LlavaModel.from_pretrained(model_dir, weights=weights).to(device).eval()
    source = tokenizer or llava.extra.get("tokenizer_source", "")
    warnings = []
    if not source:
        warnings.append("the model names no tokenizer; using the default one")
    resolved = resolve_tokenizer(source or None, device)
    if resolved.random_init:
        warnings.append(f"tokenizer {resolved.source}: RANDOM INIT, answers are meaningless")
    expected = llava.extra.get("tokenizer_sha256")
    if expected and Path(resolved.source).is_file() and file_sha256(resolved.source) != expected:
        warnings.append(f"tokenizer {resolved.source} differs from the one the model was trained on")
    features = build_feature_source(resolved.tokenizer, llava.config.features)
    if (features.num_tokens, features.feature_dim) != (llava.num_visual_tokens, llava.feature_dim):
        raise ValueError(
            f"tokenizer {resolved.source} gives {features.num_tokens} x {features.feature_dim} "
            f"{llava.config.features} tokens; the model expects {llava.num_visual_tokens} x {llava.feature_dim}"
        )
    if getattr(features.teacher, "random_init", False):
        warnings.append("teacher features come from a RANDOM INIT teacher")
    return Understanding(llava, features, model_dir, resolved.source, warnings)
