"""VQA evaluation of an understanding model: exact match after normalisation, per question type,
and MME-style yes/no scoring.

Question sets: the shapes world's `vqa.jsonl` ({"image", "question", "answer", "type"}) or a
LLaVA JSON/JSONL (question = the first human turn, answer = the first gpt turn, type = the
record's "type" or "all").

MME scores yes/no questions two ways: accuracy per question, and accuracy+ per image (an image
counts only when every yes/no question about it is right, which a model answering "yes" to
everything cannot reach); its score is acc + acc+ in percent.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenflow_cli.data.captions import read_jsonl
from tokenflow_cli.understanding.data import load_llava_image, read_records

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
}


@dataclass
class VqaItem:
    image: Path | None
    question: str
    answer: str
    type: str = "all"


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, number words -> digits, and a leading yes/no
    stands for the whole answer ("Yes, there is." -> "yes"), as VQAv2 / MME scoring do."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    words = [_NUMBERS.get(w, w) for w in words if w not in _ARTICLES]
    if words and words[0] in ("yes", "no"):
        return words[0]
    return " ".join(words)


def load_vqa_items(path: str | Path, image_root: str | Path = "") -> list[VqaItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question set not found: {path}")
    root = Path(image_root) if image_root else path.parent
    if path.suffix == ".jsonl":

        rows = read_jsonl(path)
        if rows and "question" in rows[0]:  # the shapes world's flat VQA pairs
            return [
                VqaItem(
                    root / r["image"] if r.get("image") else None,
                    r["question"],
                    str(r["answer"]),
                    str(r.get("type", "all")),
                )
                for r in rows
            ]
    raw_types = _record_types(path)
    items = []
    for record, kind in zip(read_records(path, image_root), raw_types, strict=True):
        human = next((t["value"] for t in record.conversations if t["from"] == "human"), None)
        gpt = next((t["value"] for t in record.conversations if t["from"] == "gpt"), None)
        if human is None or gpt is None:
            raise ValueError(f"{path}: record {record.id!r} needs a human and a gpt turn")
        question = human.replace("<image>", "").strip()
        items.append(VqaItem(record.image, question, gpt, kind))
    return items


def _record_types(path: Path) -> list[str]:
    raw = read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
    return [str(r.get("type", "all")) for r in raw]


def is_yes_no(item: VqaItem) -> bool:
    return normalize_answer(item.answer) in ("yes", "no")


def score_vqa(items: Sequence[VqaItem], predictions: Sequence[str]) -> dict[str, Any]:
    """Report: overall and per-type exact-match accuracy, and the MME-style yes/no section."""
    correct = [normalize_answer(p) == normalize_answer(i.answer) for i, p in zip(items, predictions, strict=True)]
    per_type: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct, strict=True):
        per_type[item.type].append(ok)
    report: dict[str, Any] = {
        "n": len(items),
        "accuracy": _mean(correct),
        "per_type": {t: {"n": len(v), "accuracy": _mean(v)} for t, v in sorted(per_type.items())},
    }
    yes_no = [(item, ok) for item, ok in zip(items, correct, strict=True) if is_yes_no(item)]
    if yes_no:
        by_image: dict[str, list[bool]] = defaultdict(list)
        for item, ok in yes_no:
            by_image[str(item.image)].append(ok)
        acc = _mean([ok for _, ok in yes_no])
        acc_plus = _mean([all(v) for v in by_image.values()])
        said_yes = [normalize_answer(p) == "yes" for i, p in zip(items, predictions, strict=True) if is_yes_no(i)]
        report["yes_no"] = {
            "n": len(yes_no),
            "images": len(by_image),
            "accuracy": acc,
            "accuracy_plus": acc_plus,
            "mme_score": 100 * (acc + acc_plus),
            "yes_ratio": _mean(said_yes),
        }
    return report


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _batches(items: Sequence[VqaItem], size: int) -> Iterator[Sequence[VqaItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def answer_questions(
    model: Any,
    feature_source: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[VqaItem],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy (by default) answers, batched; items with an image and without are batched apart."""
    device = next(model.parameters()).device
    size = getattr(feature_source, "image_size", None)
    answers: dict[int, str] = {}
    indexed = list(enumerate(items))
    for has_image in (True, False):
        group = [(i, it) for i, it in indexed if (it.image is not None) == has_image]
        for batch in _batches(group, batch_size):
            visual = None
            if has_image:
                images = torch.stack([load_llava_image(it.image, size) for _, it in batch]).to(device)
                visual = feature_source(images)
            texts = model.answer(visual, [it.question for _, it in batch], max_new_tokens, temperature)
            answers.update({i: t for (i, _), t in zip(batch, texts, strict=True)})
            if progress is not None:
                progress(len(batch))
    return [answers[i] for i in range(len(items))]
