"""LLaVA finetuning on the generic loop: stage 1 trains the projector, stage 2 the LLM and the
projector (LLaVA-1.5; TokenFlow paper section 4.2).

The tokenizer is frozen, so each image's visual tokens never change: with
`data.cache_features` they are computed once per image and kept. The run folder layout is in
`understanding/build.py`; at the end the finished model is exported in transformers' format to
RUN_DIR/final.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from tokenflow_cli.checkpoint import WEIGHTS_NAME, load_state
from tokenflow_cli.config import ConfigError
from tokenflow_cli.distributed import barrier
from tokenflow_cli.tokenizer.identity import tokenizer_id
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.train.fsdp import is_sharded, transformer_blocks
from tokenflow_cli.train.loop import Stage, TrainData, TrainResult, train
from tokenflow_cli.train.parallel import enable_activation_checkpointing
from tokenflow_cli.train.state import latest_checkpoint
from tokenflow_cli.understanding.build import FINAL_DIR, SKELETON_DIR, build_llava
from tokenflow_cli.understanding.config import LlavaRecipe, stage_train_config, validate
from tokenflow_cli.understanding.conversation import IGNORE_INDEX
from tokenflow_cli.understanding.data import (
    ConversationDataset,
    ConversationRecord,
    collate_conversations,
    conversation_texts,
    load_llava_image,
    read_records,
)
from tokenflow_cli.understanding.features import build_feature_source
from tokenflow_cli.understanding.model import LLAVA_JSON, LlavaModel
from tokenflow_cli.understanding.vqa import normalize_answer


class LlavaStage(Stage):
    kind = "llava"

    def __init__(self, recipe: LlavaRecipe, stage: int, run_dir: str | Path, resume: bool = True) -> None:
        validate(recipe)
        self.recipe, self.stage_number = recipe, stage
        m, d = recipe.model, recipe.data
        data_path = (d.pretrain or d.train) if stage == 1 else d.train
        if not data_path:
            raise ConfigError(f"data.train{' (or data.pretrain)' if stage == 1 else ''}: no conversation file set")
        self.records = read_records(data_path, d.image_root)
        self.val_records = read_records(d.val, d.image_root)[: d.val_limit] if d.val else []
        tok = resolve_tokenizer(m.tokenizer or None, torch.device("cpu"))
        self.tokenizer_random_init = tok.random_init
        self.source = build_feature_source(tok, m.features, m.feature_grid, m.feature_scales)
        if self.source.num_tokens >= m.max_length:
            raise ConfigError(
                f"model.max_length: {m.max_length} tokens cannot hold the {self.source.num_tokens} visual tokens "
                f"(model.features={m.features}, model.feature_scales={m.feature_scales}) and an answer; "
                "raise model.max_length (and tiny_llm.max_position_embeddings for a tiny LM)"
            )
        self.extra = {**tokenizer_id(tok), "stage": stage, "data": str(data_path)}
        run_dir = Path(run_dir)
        torch.manual_seed(recipe.train.seed)  # the same fresh LM on every rank
        if resume and latest_checkpoint(run_dir) is not None:  # rebuilt as saved; the loop loads the weights
            if not (run_dir / SKELETON_DIR / LLAVA_JSON).is_file():
                raise FileNotFoundError(f"{run_dir} has checkpoints but no {SKELETON_DIR}/; use --no-resume")
            model = LlavaModel.from_pretrained(run_dir / SKELETON_DIR, weights=run_dir / WEIGHTS_NAME)
        else:
            texts = conversation_texts(self.records)
            if stage == 1 and d.pretrain and d.train:  # the tiny LM's vocabulary must cover stage 2 too
                texts += conversation_texts(read_records(d.train, d.image_root))
            model = build_llava(m, self.source.feature_dim, self.source.num_tokens, texts, self.extra)
        model.set_stage(stage)
        if stage == 2 and m.gradient_checkpointing:
            enable_activation_checkpointing(model.lm)
        self.model = model
        self.model_config = m
        self.cache: dict[str, torch.Tensor] = {}

    # ---- loop hooks ------------------------------------------------------------------------

    def setup(self) -> None:
        self.source.to(self.device)
        if self.dist.is_main:
            self.model.save_skeleton(self.run_dir / SKELETON_DIR, self.extra)

    def _dataset(self, records: list[ConversationRecord]) -> ConversationDataset:
        return ConversationDataset(
            records,
            self.model.formatter,
            self.model.num_visual_tokens,
            self.source.image_size,
            self.model_config.max_length,
        )

    def _collate(self) -> Any:
        return functools.partial(collate_conversations, pad_id=self.model.text_tokenizer.pad_token_id)

    def train_data(self) -> TrainData:
        return TrainData(self._dataset(self.records), self._collate(), self.recipe.data.num_workers)

    def visual_features(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """(n_images, N, C) for the batch's images, from the cache where possible."""
        images = batch["images"]
        if images is None:
            return None
        if not self.recipe.data.cache_features:
            return self.source(images.to(self.device))
        keys = batch["image_keys"]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            for i, f_NC in zip(missing, self.source(images[missing].to(self.device)), strict=True):
                self.cache[keys[i]] = f_NC
        return torch.stack([self.cache[key] for key in keys])

    def step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        dev = self.device
        out = self.wrapped["model"](
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            self.visual_features(batch),
            batch["labels"].to(dev),
        )
        return {"loss": out.loss}

    def notes(self) -> list[str]:
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        source = self.source
        out = [
            f"stage {self.stage_number}: training {trained:,} parameters; "
            f"{source.num_tokens} x {source.feature_dim} {source.kind} visual tokens"
        ]
        if self.tokenizer_random_init:
            out.append(f"tokenizer {self.extra['tokenizer_source']}: RANDOM INIT, visual tokens carry little meaning")
        if getattr(self.source.teacher, "random_init", False):
            out.append("teacher features come from a RANDOM INIT teacher")
        return out

    def num_samples(self, batch: dict[str, Any]) -> int:
        return batch["input_ids"].shape[0]

    def fsdp_units(self) -> list[torch.nn.Module]:
        return transformer_blocks(self.model.lm)  # the feature source stays whole (frozen, not in modules())

    def metrics(self, step: int) -> dict[str, float]:
        return {"cached_images": float(len(self.cache))} if self.recipe.data.cache_features else {}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out loss and greedy exact-match accuracy of the first answer."""

        if not self.val_records:
            return {}
        loader = torch.utils.data.DataLoader(
            self._dataset(self.val_records), batch_size=self.recipe.eval.batch_size, collate_fn=self._collate()
        )
        loss_sum, targets, correct = 0.0, 0, 0
        for batch in loader:
            ids, mask, labels = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
            n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the loss averages over these
            loss_sum += float(self.model(ids, mask, self.visual_features(batch), labels).loss) * n_targets
            targets += n_targets
        for start in range(0, len(self.val_records), self.recipe.eval.batch_size):
            chunk = self.val_records[start : start + self.recipe.eval.batch_size]
            correct += self._score_answers(chunk, normalize_answer)
        return {"val_loss": loss_sum / max(targets, 1), "val_accuracy": correct / len(self.val_records)}

    def _score_answers(self, records: list[ConversationRecord], normalize: Any) -> int:
        with_image = [r for r in records if r.image is not None]
        without = [r for r in records if r.image is None]
        correct = 0
        for group, has_image in ((with_image, True), (without, False)):
            if not group:
                continue
            visual = None
            if has_image:
                images = [load_llava_image(r.image, self.source.image_size) for r in group]
                visual = self.visual_features(
                    {"images": torch.stack(images), "image_keys": [str(r.image) for r in group]}
                )
            questions = [[next(t for t in r.conversations if t["from"] == "human")] for r in group]
            answers = self.model.answer(visual, questions, max_new_tokens=self.recipe.eval.max_new_tokens)
            truths = [next(t["value"] for t in r.conversations if t["from"] == "gpt") for r in group]
            correct += sum(normalize(a) == normalize(t) for a, t in zip(answers, truths, strict=True))
        return correct


def finetune_llava(
    recipe: LlavaRecipe,
    stage: int,
    run_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = True,
    live: bool | None = True,
) -> tuple[TrainResult, Path | None]:
    """Run one LLaVA stage; returns the loop's result and RUN_DIR/final when the run finished."""

    run_dir = Path(run_dir)
    llava_stage = LlavaStage(recipe, stage, run_dir, resume)
    cfg = stage_train_config(recipe, stage)
    result = train(llava_stage, cfg, run_dir, recipe=recipe, device=device, resume=resume, live=live)
    final = None
    if llava_stage.dist.is_main and result.step >= cfg.steps:
        # FSDP leaves the model sharded: export the full weights its last checkpoint gathered
        weights = load_state(result.checkpoint / WEIGHTS_NAME)[0] if is_sharded(llava_stage.model) else None
        final = llava_stage.model.save_pretrained(run_dir / FINAL_DIR, extra={"step": result.step}, state_dict=weights)
    barrier()
    return result, final
