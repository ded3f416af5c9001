"""Training stage of the tiny CLIP teacher (`tokenflow train-teacher`).

A small open_clip CLIP (default: the registered `tokenflow-tiny-vit`) learns from captioned
images with CLIP's symmetric contrastive loss (Radford et al. 2021, fig. 3):

    logits = exp(t) * img_BD @ txt_BD^T;   loss = (CE(logits, diag) + CE(logits^T, diag)) / 2

The weights are saved as the whole CLIP state dict (open_clip's own key names) in
RUN_DIR/model.safetensors, so `open_clip.create_model(name, pretrained=file)` and the tokenizer
recipes' `model.teacher.pretrained` / `model.semantic_encoder.pretrained` load them as they are.
Images get CLIP's mean/std, which is the tiny recipe's `input_norm: clip_mean_std`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tokenflow_cli.checkpoint import WEIGHTS_NAME
from tokenflow_cli.data.captions import read_jsonl
from tokenflow_cli.data.dataset import ImageDataset
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_write_bytes
from tokenflow_cli.teacher.config import TeacherRecipe
from tokenflow_cli.tokenizer.semantic_towers import register_tiny_open_clip
from tokenflow_cli.train.loop import Stage, TrainData, TrainResult, train
from tokenflow_cli.train.state import complete_checkpoints
from tokenflow_cli.weights import resolve_open_clip_weights, tokenflow_home

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(cfg) -> torch.nn.Module:
    """The open_clip CLIP of a TeacherModelConfig (local weights only; never downloads)."""

    register_tiny_open_clip()
    pretrained = None
    if cfg.pretrained:
        pretrained = str(resolve_open_clip_weights(cfg.model_name, cfg.pretrained, "model").path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip's "initialized randomly" warning: random init is the plan here
    try:
        model = open_clip.create_model(cfg.model_name, pretrained=pretrained)
    finally:
        root.setLevel(level)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    if size != cfg.image_size:
        raise ValueError(f"model.image_size={cfg.image_size} but {cfg.model_name!r} is built for {size}")
    return model


def clip_loss(img_BD: torch.Tensor, txt_BD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on normalised features; matching pairs on the diagonal."""
    logits = logit_scale * img_BD.float() @ txt_BD.float().T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CaptionedImages(Dataset):
    """{"image": CLIP-normalised (3, S, S), "text": (context,) token ids} per item; the caption
    field is drawn at random (torch RNG: seeded per item by the loop's stream)."""

    def __init__(self, pairs: list[tuple[Path, list[str]]], tokenizer, size: int,
                 crop_scale: tuple[float, float]) -> None:

        self.images = ImageDataset([p for p, _ in pairs], size, train=True, crop_scale=crop_scale, hflip=False,
                                   strict=True)  # no flips: captions say "left of"
        self.texts = [tokenizer(texts) for _, texts in pairs]  # (F, context) per item, tokenized once
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        img = self.images[index]["image"]  # [-1, 1]
        tokens = self.texts[index]
        pick = int(torch.randint(tokens.shape[0], ())) if tokens.shape[0] > 1 else 0
        return {"image": ((img + 1) / 2 - self.mean) / self.std, "text": tokens[pick]}


def read_pairs(captions: Path, fields: tuple[str, ...]) -> list[tuple[Path, list[str]]]:
    base = captions.parent
    out = []
    for number, record in enumerate(read_jsonl(captions), start=1):
        texts = [str(record[f]) for f in fields if record.get(f)]
        if "image" not in record or not texts:
            raise ValueError(f"{captions}: record {number} lacks \"image\" or any of the fields {list(fields)}")
        out.append((base / record["image"], texts))
    return out


def shapes_captions(n: int, seed: int, size: int) -> Path:
    """A rendered shapes world in $TOKENFLOW_HOME/datasets (made once, then reused)."""

    folder = tokenflow_home() / "datasets" / f"shapes-seed{seed}-{size}px-n{n}"
    marker, params = folder / ".complete.json", {"n": n, "seed": seed, "size": size}
    if not (marker.is_file() and json.loads(marker.read_text()) == params):
        render_shapes_world(folder, n, seed=seed, size=size)
        marker.write_text(json.dumps(params))
    return folder / "captions.jsonl"


class TeacherStage(Stage):
    kind = "teacher"

    def __init__(self, recipe: TeacherRecipe) -> None:
        self.recipe = recipe
        self.model = build_clip(recipe.model)
        self.model_config = recipe.model
        self.tokenizer = open_clip.get_tokenizer(recipe.model.model_name)
        data = recipe.data
        captions = Path(data.captions) if data.captions else shapes_captions(data.shapes, data.shapes_seed,
                                                                             recipe.model.image_size)
        pairs = read_pairs(captions, data.caption_fields)
        random.Random(0).shuffle(pairs)  # a fixed held-out slice, whatever the file order
        n_val = min(data.val_size, len(pairs) // 5)
        self.captions = captions
        self.val_pairs, self.train_pairs = pairs[:n_val], pairs[n_val:]

    def train_data(self) -> TrainData:
        dataset = CaptionedImages(self.train_pairs, self.tokenizer, self.recipe.model.image_size,
                                  self.recipe.data.random_resized_crop)
        return TrainData(dataset, num_workers=self.recipe.data.num_workers)

    def step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        img_BD, txt_BD, scale = self.wrapped["model"](batch["image"].to(self.device), batch["text"].to(self.device))
        return {"loss": clip_loss(img_BD, txt_BD, scale), "logit_scale": scale.detach()}

    def after_step(self, step: int) -> None:
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            self.model.logit_scale.clamp_(0, 4.6052)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out contrastive loss and retrieval top-1 within batches of eval.batch_size."""
        if not self.val_pairs:
            return {}
        data = CaptionedImages(self.val_pairs, self.tokenizer, self.recipe.model.image_size, (1.0, 1.0))
        bs = self.recipe.eval.batch_size
        losses, hits, n = [], 0, 0
        for start in range(0, len(data), bs):
            items = [data[i] for i in range(start, min(start + bs, len(data)))]
            img = torch.stack([it["image"] for it in items]).to(self.device)
            txt = torch.stack([it["text"] for it in items]).to(self.device)
            img_BD, txt_BD, scale = self.model(img, txt)
            losses.append(float(clip_loss(img_BD, txt_BD, scale)) * len(items))
            hits += int(((img_BD @ txt_BD.T).argmax(1) == torch.arange(len(items), device=self.device)).sum())
            n += len(items)
        return {"val_loss": sum(losses) / n, "i2t_top1": hits / n}

    def num_samples(self, batch: Any) -> int:
        return batch["image"].shape[0]


def train_teacher(recipe: TeacherRecipe, run_dir: str | Path, *, device: str = "auto", resume: bool = True,
                  live: bool | None = True) -> TrainResult:
    """Train (resuming RUN_DIR); publishes nothing (`publish_teacher` is the separate step)."""
    return train(TeacherStage(recipe), recipe.train, run_dir, recipe=recipe, device=device, resume=resume,
                 live=live)


class UnfinishedRunError(UserError, ValueError):
    """A run that has not reached its recipe's last step cannot be published as a default."""


def publish_teacher(run_dir: str | Path, target: Path, steps: int) -> Path:
    """Copy a FINISHED run's weights to `target` (the default teacher location), atomically. A run
    whose newest checkpoint is short of `steps` (stopped by Ctrl-C, a time limit or a crash) is
    refused, so a barely trained teacher never becomes the default every recipe picks up."""
    found = complete_checkpoints(Path(run_dir))
    done = found[-1][0] if found else 0
    weights = Path(run_dir) / WEIGHTS_NAME
    if done < steps or not weights.is_file():
        raise UnfinishedRunError(f"{run_dir} has not finished ({done} of {steps} steps): nothing published; "
                                 "finish it with the same command, then publish")
    atomic_write_bytes(target, weights.read_bytes())
    return target
