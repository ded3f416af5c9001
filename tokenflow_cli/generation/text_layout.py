"""How a prompt becomes the text block in front of the image positions: a registry
(`TEXT_LAYOUTS`, picked by `model.text_layout`); generation/pipeline.py's PromptEncoder builds
the ids, the model reads `level_embed_on_text`.

- `padded` (ours): BOS + prompt ids, left-padded to the longest prompt of the batch.
- `official` (official/T2I.md "Sequence"): `[PAD] * n + BOS + prompt` truncated or left-padded
  to exactly `max_text_tokens` ids, then the ids of the text `<img>` (`model.image_marker_ids`).
  The last `<img>` id's position is where the official model predicts the first scale, so it
  is our scale-0 position: the text block ends with the other marker ids, and the converter
  puts that id's embedding into the start token. Every text position adds the first level
  embedding (our scale 0's). RoPE positions count the pads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEXT_LAYOUTS", "TextLayout", "text_layout"]


@dataclass(frozen=True)
class TextLayout:
    name: str
    fixed_length: bool  # always max_text_tokens prompt ids (else as long as the batch's longest)
    image_marker: bool  # model.image_marker_ids follow the prompt (all but the last: the start token)
    level_embed_on_text: bool  # text positions add scale 0's embedding


TEXT_LAYOUTS: dict[str, TextLayout] = {
    "padded": TextLayout("padded", fixed_length=False, image_marker=False, level_embed_on_text=False),
    "official": TextLayout("official", fixed_length=True, image_marker=True, level_embed_on_text=True),
}


def text_layout(name: str) -> TextLayout:
    if name not in TEXT_LAYOUTS:
        raise ValueError(f"unknown model.text_layout {name!r}; choose one of {sorted(TEXT_LAYOUTS)}")
    return TEXT_LAYOUTS[name]
