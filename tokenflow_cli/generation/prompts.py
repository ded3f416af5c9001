"""Prompts -> the generator's text input: the prompt (text) tokenizer of a run and the encoder
that pads and lays out a batch of prompts (generation/text_layout.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.model import TextBatch
from tokenflow_cli.generation.text_layout import text_layout


class PromptEncoder:
    """Prompts -> left-padded `TextBatch`: BOS (when the tokenizer has one) + the prompt's
    tokens, truncated to `max_tokens` (the start of the prompt is kept), under a text layout
    (generation/text_layout.py): padded to the batch's longest, or always to `max_tokens`
    followed by the `<img>` marker ids but the last (official)."""

    def __init__(self, text_tokenizer, max_tokens: int, layout: str = "padded",
                 marker_ids: tuple[int, ...] = ()) -> None:
        self.text_tokenizer = text_tokenizer
        self.max_tokens = max_tokens
        self.layout = text_layout(layout)
        self.marker = list(marker_ids[:-1]) if self.layout.image_marker else []
        self.pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
        self.bos = [text_tokenizer.bos_token_id] if text_tokenizer.bos_token_id is not None else []

    @classmethod
    def for_model(cls, text_tokenizer, cfg: GeneratorModelConfig) -> PromptEncoder:
        return cls(text_tokenizer, cfg.max_text_tokens, cfg.text_layout, tuple(cfg.image_marker_ids))

    def ids(self, prompt: str) -> list[int]:
        return (self.bos + self.text_tokenizer(prompt, add_special_tokens=False)["input_ids"])[: self.max_tokens]

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
