"""The tokenizer training stage (`tokenflow train-tokenizer`), run by the generic loop.

Loss, every weight in `train.loss`:

    L = l2 * ||x - x^||^2 + lpips * LPIPS(x, x^) + vq * (codebook + commitment) + entropy
        + semantic * mean(1 - cos(decoder(q_sem), teacher(x)))
        + gan * lambda * hinge_G(D(x^))                      from gan_start_step on
    L_D = hinge_D(D(x), D(sg(x^)))                           the discriminator's own optimizer

with lambda = 1, or VQGAN's adaptive weight when `gan_adaptive_weight`. Codebook health
(`train.dead_code_restart_steps`, `train.kmeans_init`, both off in the paper recipes): dead
codes are re-seeded from the latest encoder outputs (both halves of a code together, so the
shared index stays meaningful), and k-means can initialise both codebooks from the first batch.
Under DDP both happen on rank 0 and the codebooks are broadcast.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenflow_cli.config import ConfigError, TrainConfig
from tokenflow_cli.data.dataset import ImageDataset, collate_skip_bad
from tokenflow_cli.data.images import list_images
from tokenflow_cli.device import seed_everything
from tokenflow_cli.eval.image_metrics import MissingLpipsBackboneError, Perceptual, build_lpips, psnr_uint8
from tokenflow_cli.eval.visual import grid, save_png, to_uint8
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from tokenflow_cli.tokenizer.losses import adaptive_gan_weight, frozen, gan_active, semantic_cosine_loss
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer, build_tokenizer
from tokenflow_cli.tokenizer.semantic import Teacher, load_teacher_state_into_encoder
from tokenflow_cli.tokenizer.usage import UsageTracker, codes_hit, perplexity
from tokenflow_cli.train.loop import OptimizerSpec, Stage, TrainData, TrainResult, train

RESTART_SAMPLE_ROWS = 4096  # encoder outputs kept from the latest step to re-seed dead codes


def split_train_val(recipe: TokenizerRecipe) -> tuple[list[Path], list[Path], str]:
    """Training and held-out images. Without `data.val`, a fixed random share of the training
    list (at most `data.val_limit`, about a tenth) is held out and not trained on."""

    data = recipe.data
    if not data.train:
        raise ConfigError("data.train is empty: --set data.train=DIR (e.g. a folder from `tokenflow data shapes`)")
    paths = list_images(data.train)
    if data.val:
        return paths, list_images(data.val)[: data.val_limit], f"val {data.val}"
    n_val = min(data.val_limit, len(paths) // 10)
    if n_val == 0:
        return paths, paths[: data.val_limit], "val = train images (too few to hold any out)"
    held = set(random.Random(0).sample(range(len(paths)), n_val))
    train_paths = [p for i, p in enumerate(paths) if i not in held]
    return train_paths, [paths[i] for i in sorted(held)], f"val = {n_val} images held out of data.train"


class TokenizerStage(Stage):
    kind = "tokenizer"

    def __init__(self, recipe: TokenizerRecipe, train_paths: list[Path] | None = None,
                 val_paths: list[Path] | None = None) -> None:
        if recipe.data.image_size != recipe.model.image_size:
            raise ConfigError(f"data.image_size={recipe.data.image_size} must equal model.image_size="
                              f"{recipe.model.image_size} (the token grids are fixed by the model)")
        self.recipe = recipe
        self.loss_cfg = recipe.train.loss
        self._notes: list[str] = []
        if train_paths is None:
            train_paths, val_paths, where = split_train_val(recipe)
            self._notes.append(f"data: {len(train_paths)} training images, {where}")
        self.train_paths, self.val_paths = train_paths, val_paths or []
        self.model: TokenFlowTokenizer = build_tokenizer(recipe.model)
        self.model_config = recipe.model
        q, teacher_cfg = recipe.model.quantizer, recipe.model.teacher
        self.semantic_loss_on = teacher_cfg.enabled and q.use_semantic and self.loss_cfg.semantic_weight > 0
        self.teacher = Teacher(teacher_cfg, recipe.model.semantic_encoder) if self.semantic_loss_on else None
        if self.teacher is not None and self.model.semantic_encoder.random_init:
            load_teacher_state_into_encoder(self.model.semantic_encoder, self.teacher)  # official init
        self._freeze_unused()
        self.discriminator = None
        if self.loss_cfg.gan_weight > 0:
            self.discriminator = PatchDiscriminator(3, self.loss_cfg.disc_channels, self.loss_cfg.disc_layers)
        self.kmeans_pending = recipe.train.kmeans_init
        self.restarted = 0
        self.lpips: Perceptual | None = None
        self.eval_lpips: Perceptual | None = None
        self._recent_features: torch.Tensor | None = None

    def _freeze_unused(self) -> None:
        """Parts that no loss reaches get no gradient, so DDP needs no unused-parameter search."""
        tok = self.model
        if not self.recipe.model.quantizer.use_semantic:
            for part in (tok.semantic_encoder, tok.semantic_proj, tok.semantic_decoder, tok.semantic_head):
                part.requires_grad_(False)
        elif not self.semantic_loss_on:
            for part in (tok.semantic_decoder, tok.semantic_head):
                part.requires_grad_(False)

    # ---- loop hooks -----------------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"discriminator": self.discriminator} if self.discriminator else {})}

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        specs = super().optimizers(cfg)
        if self.discriminator is not None:
            specs.append(OptimizerSpec("discriminator", self.discriminator.parameters(), self.loss_cfg.disc_lr,
                                       cfg.betas, cfg.weight_decay, cfg.grad_clip, loss_key="disc_loss"))
        return specs

    def setup(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        q = self.recipe.model.quantizer
        self.tracker = UsageTracker(tuple(q.scales), q.codebook_size, q.usage_window, self.device)
        loss = self.loss_cfg
        if loss.lpips_weight > 0:
            self.lpips = build_lpips(loss.lpips_net, loss.lpips_random_backbone)
            self.lpips.module.to(self.device)
            self._notes.append(f"perceptual loss: {self.lpips.label}")
        if self.lpips is not None and not self.lpips.random_backbone:
            self.eval_lpips = self.lpips
        else:
            try:
                self.eval_lpips = build_lpips(loss.lpips_net)
                self.eval_lpips.module.to(self.device)
            except MissingLpipsBackboneError:
                self._notes.append("eval: no LPIPS (backbone weights not in the torchvision cache)")
        for part in self.model.random_init_parts:
            self._notes.append(f"{part}: random init (no pretrained weights named in the recipe)")
        if self.teacher is not None and self.teacher.random_init:
            self._notes.append("teacher: RANDOM init (no pretrained weights): the semantic loss regresses "
                               "a random network's features")

    def notes(self) -> list[str]:
        return self._notes

    def train_data(self) -> TrainData:
        data = self.recipe.data
        dataset = ImageDataset(self.train_paths, data.image_size, train=True,
                               crop_scale=data.random_resized_crop, hflip=data.hflip)
        return TrainData(dataset, collate_skip_bad, data.num_workers)

    def step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if batch["image"] is None:
            raise RuntimeError(f"every image of a batch failed to load: {batch['skipped'][:4]} ({batch['errors'][:4]})")
        img = batch["image"].to(self.device, non_blocking=True)
        if self.kmeans_pending:
            self._kmeans_init(img)
        out = self.wrapped["model"](img, decode_semantic=self.teacher is not None)
        rec = out.reconstruction.float()
        w = self.loss_cfg
        l2 = F.mse_loss(rec, img)
        losses: dict[str, torch.Tensor] = {"l2": l2, "codebook": out.codebook_loss, "commit": out.commit_loss}
        nll = w.l2_weight * l2
        if self.lpips is not None:
            perceptual = self.lpips(rec, img).mean()
            losses["lpips_random" if self.lpips.random_backbone else "lpips"] = perceptual
            nll = nll + w.lpips_weight * perceptual
        total = nll + w.vq_weight * (out.codebook_loss + out.commit_loss) + out.entropy_loss
        if self.recipe.model.quantizer.entropy_weight > 0:
            losses["entropy"] = out.entropy_loss
        if self.teacher is not None:
            semantic = semantic_cosine_loss(out.semantic_pred, self.teacher(img))
            losses["semantic"] = semantic
            total = total + w.semantic_weight * semantic
        if self.discriminator is not None and gan_active(step, w):
            total = total + self._gan_losses(img, rec, nll, losses)
        losses["loss"] = total
        self.tracker.update(out.codes.per_scale(), step + 1)
        if self.recipe.train.dead_code_restart_steps > 0:
            f_Nc = out.features.detach().float().permute(0, 2, 3, 1).reshape(-1, out.features.shape[1])
            self._recent_features = f_Nc[torch.randperm(f_Nc.shape[0], device=f_Nc.device)[:RESTART_SAMPLE_ROWS]]
        return losses

    def _gan_losses(self, img: torch.Tensor, rec: torch.Tensor, nll: torch.Tensor,
                    losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Generator term (returned; frozen discriminator) and the discriminator's own loss on
        real and detached fake images (into `losses["disc_loss"]`)."""
        with frozen(self.discriminator):
            g_loss = hinge_g_loss(self.discriminator(rec))
        weight = torch.ones((), device=rec.device)
        if self.loss_cfg.gan_adaptive_weight:
            weight = adaptive_gan_weight(nll, g_loss, self.model.pixel_decoder.last_layer_weight)
        logits = self.wrapped["discriminator"](torch.cat([img, rec.detach()]))
        losses["gan_g"], losses["gan_lambda"] = g_loss, weight
        losses["disc_loss"] = hinge_d_loss(logits[: img.shape[0]], logits[img.shape[0] :])
        return self.loss_cfg.gan_weight * weight * g_loss

    def after_step(self, step: int) -> None:
        idle = self.cfg.dead_code_restart_steps
        if idle > 0 and self._recent_features is not None:
            q = self.model.quantizer
            if self.dist.enabled:
                dist.all_reduce(q.last_used_step, op=dist.ReduceOp.MAX)
            n = q.restart_dead_codes(self._recent_features, idle) if self.dist.is_main else 0
            if self.dist.enabled:
                self._broadcast_codebooks()
            self.restarted += n

    def metrics(self, step: int) -> dict[str, float]:
        out = self.tracker.summary(step)
        if self.cfg.dead_code_restart_steps > 0:
            out["restarted"] = float(self.restarted)
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"usage": self.tracker.state_dict(), "kmeans_pending": self.kmeans_pending,
                                 "restarted": self.restarted}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["usage"])
        self.kmeans_pending = bool(state["kmeans_pending"])
        self.restarted = int(state["restarted"])
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])

    # ---- codebook health ------------------------------------------------------------------

    @torch.no_grad()
    def _kmeans_init(self, img: torch.Tensor) -> None:
        f = self.model.encode_features(img)
        if self.dist.is_main:
            self.model.quantizer.kmeans_init(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        if self.dist.enabled:
            self._broadcast_codebooks()
        self.kmeans_pending = False

    def _broadcast_codebooks(self) -> None:
        q = self.model.quantizer
        for tensor in (q.semantic_codebook.weight.data, q.pixel_codebook.weight.data, q.last_used_step):
            dist.broadcast(tensor, src=0)

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """PSNR, L2, LPIPS (when a real backbone is available), semantic cosine and codebook
        usage on the held-out images; writes RUN_DIR/samples/recon-<step>.png."""

        if not self.val_paths:
            return {}
        tok = self.model
        sums: dict[str, float] = {}
        psnrs, hits, n = [], None, 0
        first = None
        for img in self._val_batches():
            out = tok(img, decode_semantic=self.teacher is not None)
            rec = out.reconstruction.float().clamp(-1, 1)
            orig_u8, rec_u8 = to_uint8(img), to_uint8(rec)
            psnrs.append(psnr_uint8(orig_u8, rec_u8))
            b = img.shape[0]
            sums["l2"] = sums.get("l2", 0.0) + float(F.mse_loss(rec, img)) * b
            if self.eval_lpips is not None:
                sums["lpips"] = sums.get("lpips", 0.0) + float(self.eval_lpips(rec, img).sum())
            if self.teacher is not None:
                sums["semantic"] = sums.get("semantic", 0.0) + float(
                    semantic_cosine_loss(out.semantic_pred, self.teacher(img))) * b
            counts = codes_hit(out.codes.per_scale(), tok.codebook_size)
            hits = counts if hits is None else hits + counts
            if first is None:
                first = (orig_u8, rec_u8)
            n += b
        result = {"psnr": float(np.concatenate(psnrs).mean()), **{k: v / n for k, v in sums.items()}}
        result["usage"] = float((hits.sum(0) > 0).float().mean())
        for s, row in zip(tok.scales, hits):
            result[f"usage@{s}"] = float((row > 0).float().mean())
        result["ppl"] = perplexity(hits.sum(0).float())
        save_png(grid([first[0], first[1]], max_rows=8), self.run_dir / "samples" / f"recon-{step:08d}.png")
        return result

    def _val_batches(self):
        dataset = ImageDataset(self.val_paths[: self.recipe.data.val_limit], self.recipe.model.image_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.recipe.eval.batch_size,
                                             collate_fn=collate_skip_bad)
        for batch in loader:
            if batch["image"] is not None:
                yield batch["image"].to(self.device)


def train_tokenizer(recipe: TokenizerRecipe, run_dir: str | Path, *, device: str = "auto", resume: bool = True,
                    live: bool | None = True, time_limit_s: float | None = None) -> TrainResult:
    """Build the tokenizer stage for `recipe` and run the generic loop (seeded by train.seed, so a
    random-init teacher and model are the same on every rank and on resume)."""

    seed_everything(recipe.train.seed)
    stage = TokenizerStage(recipe)
    return train(stage, recipe.train, run_dir, recipe=recipe, device=device, resume=resume, live=live,
                 time_limit_s=time_limit_s)
