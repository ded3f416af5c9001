"""LLaVA conversation data for the understanding model: records, dataset, batching.

Records are LLaVA's JSON list (or JSON Lines of the same objects):
`{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value"}]}`; image paths
are relative to `image_root`, by default the JSON's folder. Images are padded to a square
(LLaVA-1.5's `pad` aspect mode, so nothing at the border is cropped away) and resized to the
tokenizer's resolution, in [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tokenflow_cli.data.captions import read_jsonl
from tokenflow_cli.data.images import load_image, to_tensor_pm1
from tokenflow_cli.understanding.conversation import IGNORE_INDEX, ConversationFormatter


@dataclass
class ConversationRecord:
    id: str
    image: Path | None
    conversations: list[dict[str, str]]


def read_records(path: str | Path, image_root: str | Path = "") -> list[ConversationRecord]:
    """LLaVA JSON (a list) or JSON Lines -> records with resolved image paths."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    raw = read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of conversation records")
    root = Path(image_root) if image_root else path.parent
    records = []
    for i, item in enumerate(raw):
        if not isinstance(item.get("conversations"), list) or not item["conversations"]:
            raise ValueError(f'{path}: record {i} has no "conversations" list')
        image = root / item["image"] if item.get("image") else None
        records.append(ConversationRecord(str(item.get("id", i)), image, item["conversations"]))
    return records


def conversation_texts(records: list[ConversationRecord]) -> list[str]:
    """Every turn's text (what a tiny LM's BPE is trained on)."""
    return [turn["value"] for r in records for turn in r.conversations]


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (127, 127, 127)) -> Image.Image:
    """Centre the image on a square canvas of its long side; grey is 0 after the [-1, 1] map."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def load_llava_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) in [-1, 1], padded to square first."""
    img = pad_to_square(load_image(path))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return to_tensor_pm1(img)


class ConversationDataset(torch.utils.data.Dataset):
    """Items {"input_ids", "labels", "image" (3, S, S) or None, "image_key"}.

    Conversations longer than `max_length` are cut at the end; one whose image placeholder run
    would be cut, or that keeps no answer token, raises (it cannot be trained on)."""

    def __init__(
        self,
        records: list[ConversationRecord],
        formatter: ConversationFormatter,
        num_image_tokens: int,
        image_size: int,
        max_length: int,
    ) -> None:
        self.records = records
        self.formatter = formatter
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        has_image = record.image is not None
        tok = self.formatter.tokenize(record.conversations, self.num_image_tokens, has_image=has_image)
        ids, labels = tok.input_ids[: self.max_length], tok.labels[: self.max_length]
        n_image = ids.count(self.formatter.image_token_id)
        if n_image != self.num_image_tokens * has_image or all(x == IGNORE_INDEX for x in labels):
            n_visual = self.num_image_tokens * has_image
            raise ValueError(
                f"record {record.id!r} does not fit in model.max_length={self.max_length} tokens "
                f"({n_visual} visual tokens + {len(tok.input_ids) - n_visual} text)"
            )
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "image": load_llava_image(record.image, self.image_size) if has_image else None,
            "image_key": str(record.image) if has_image else "",
        }


def collate_conversations(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch: input_ids/labels/attention_mask (B, T); images (n_img, 3, S, S) of
    the samples that have one, in batch order (the order their placeholders are filled in)."""
    width = max(len(item["input_ids"]) for item in items)
    ids_BT = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask_BT = torch.zeros((len(items), width), dtype=torch.long)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        ids_BT[b, :n], labels_BT[b, :n], mask_BT[b, :n] = item["input_ids"], item["labels"], 1
    images = [item["image"] for item in items if item["image"] is not None]
    return {
        "input_ids": ids_BT,
        "labels": labels_BT,
        "attention_mask": mask_BT,
        "images": torch.stack(images) if images else None,
        "image_keys": [item["image_key"] for item in items if item["image"] is not None],
    }
