"""Zero-shot accuracy of a CLIP teacher on the shapes world's attributes.

Labels come from the captions (data/shapes_text.py writes groups like "two small red circles",
"an orange star"): every group phrase gives (count, colour, shape). Three tasks:

- colour: images whose groups all share one colour (8 classes);
- shape: images whose groups all share one shape (4 classes);
- count: images with one group, i.e. n identical shapes (1-4).

Each class is a prompt ensemble (CLIP's recipe): the mean normalised text embedding of every
caption-style phrase with that attribute, e.g. colour "red" averages "a small red circle",
"a large red star", ...; the image is assigned the class of highest cosine similarity.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from tokenflow_cli.checkpoint import read_metadata, resolve_weights_path
from tokenflow_cli.data.captions import load_captions
from tokenflow_cli.data.images import load_image, resize_center_crop
from tokenflow_cli.data.shapes_scene import COLORS, NUMBER_WORDS, SHAPES, SIZES
from tokenflow_cli.data.shapes_text import plural, with_article
from tokenflow_cli.eval.evalset import heldout_shapes
from tokenflow_cli.tokenizer.semantic_towers import register_tiny_open_clip
from tokenflow_cli.weights import require_weight_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COUNTS = (1, 2, 3, 4)
_COUNT_WORDS = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBER_WORDS)}}
_GROUP = re.compile(
    rf"\b({'|'.join(_COUNT_WORDS)})\s+(?:(?:{'|'.join(SIZES)})\s+)?({'|'.join(COLORS)})\s+"
    rf"({'|'.join(SHAPES)})(?:es|s)?\b"
)


def caption_groups(caption: str) -> list[tuple[int, str, str]]:
    """[(count, colour, shape)] for every object group a shapes caption names."""
    return [(_COUNT_WORDS[n], color, shape) for n, color, shape in _GROUP.findall(caption)]


def attribute_labels(caption: str) -> dict[str, str | int]:
    """The labels a caption supports: {"colour": ..., "shape": ..., "count": ...} (a subset)."""
    groups = caption_groups(caption)
    if not groups:
        return {}
    out: dict[str, str | int] = {}
    if len({c for _, c, _ in groups}) == 1:
        out["colour"] = groups[0][1]
    if len({s for _, _, s in groups}) == 1:
        out["shape"] = groups[0][2]
    if len(groups) == 1:
        out["count"] = groups[0][0]
    return out


def _phrase(count: int, size: str, color: str, shape: str) -> str:
    if count == 1:
        return with_article(f"{size} {color} {shape}")
    return f"{NUMBER_WORDS[count]} {size} {color} {plural(shape)}"


def class_prompts() -> dict[str, dict[str | int, list[str]]]:
    """task -> class -> the phrases averaged into that class's text embedding."""
    sizes, colors = tuple(SIZES), tuple(COLORS)
    return {
        "colour": {c: [_phrase(1, z, c, s) for z in sizes for s in SHAPES] for c in colors},
        "shape": {s: [_phrase(1, z, c, s) for z in sizes for c in colors] for s in SHAPES},
        "count": {n: [_phrase(n, z, c, s) for z in sizes for c in colors for s in SHAPES] for n in COUNTS},
    }


@dataclass
class LoadedClip:
    model: torch.nn.Module  # open_clip CLIP
    tokenizer: object  # open_clip tokenizer for this model
    image_size: int
    source: str


def load_clip(path: str | None, model_name: str = "tokenflow-tiny-vit") -> LoadedClip:
    """An open_clip CLIP from a teacher file or run folder (default: the trained tiny teacher).
    A file written by `train-teacher` names its architecture in its metadata."""

    register_tiny_open_clip()
    file = resolve_weights_path(path) if path else require_weight_file("teacher-tiny")
    if file.suffix == ".safetensors":
        config = read_metadata(file).get("config") or {}
        model_name = config.get("model_name", model_name)
    model = open_clip.create_model(model_name, pretrained=str(file)).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return LoadedClip(model, open_clip.get_tokenizer(model_name), size, str(file))


@torch.no_grad()
def class_embeddings(clip: LoadedClip, prompts: dict[str | int, list[str]], device: torch.device) -> torch.Tensor:
    """(C, D) normalised mean of each class's normalised phrase embeddings."""
    rows = []
    for phrases in prompts.values():
        text = clip.model.encode_text(clip.tokenizer(phrases).to(device))
        rows.append(F.normalize(F.normalize(text.float(), dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    arrays = np.stack([np.asarray(resize_center_crop(load_image(p), size)) for p in paths])
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_embeddings(clip: LoadedClip, paths: list[Path], device: torch.device, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(paths), batch_size):
        x = _load_images(paths[start : start + batch_size], clip.image_size).to(device)
        out.append(F.normalize(clip.model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


def zero_shot_report(clip: LoadedClip, captions: Path, device: torch.device, batch_size: int = 64,
                     limit: int = 0) -> dict:
    """Accuracy per task (with chance and majority-class baselines) on a captions.jsonl."""

    pairs = load_captions(captions)
    pairs = pairs[:limit] if limit else pairs
    labels = [attribute_labels(caption) for _, caption in pairs]
    clip.model.to(device)
    images = image_embeddings(clip, [p for p, _ in pairs], device, batch_size)
    tasks = {}
    for task, prompts in class_prompts().items():
        keep = [i for i, lab in enumerate(labels) if task in lab]
        if not keep:
            continue
        classes = list(prompts)
        text = class_embeddings(clip, prompts, device).cpu()
        pred = (images[keep] @ text.T).argmax(1).numpy()
        truth = np.array([classes.index(labels[i][task]) for i in keep])
        majority = Counter(truth.tolist()).most_common(1)[0][1] / len(keep)
        per_class = {str(c): float((pred[truth == k] == k).mean()) for k, c in enumerate(classes) if (truth == k).any()}
        tasks[task] = {"n": len(keep), "classes": [str(c) for c in classes], "accuracy": float((pred == truth).mean()),
                       "balanced_accuracy": float(np.mean(list(per_class.values()))), "chance": 1 / len(classes),
                       "majority": majority, "per_class": per_class}
    return {"command": "tokenflow eval teacher", "teacher": clip.source, "data": str(captions), "images": len(pairs),
            "protocol": "prompt-ensemble zero-shot: class = mean normalised embedding of caption-style phrases; "
                        "labels parsed from the captions; images resized+centre-cropped to the teacher's size, "
                        "CLIP mean/std", "tasks": tasks}


def default_eval_captions(size: int, n: int = 0) -> Path:
    """Held-out shapes (the eval set's seed) rendered at the teacher's size."""

    subset = heldout_shapes(size, n or 400)
    return subset.paths[0].parent.parent / "captions.jsonl"
