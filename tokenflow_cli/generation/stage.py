"""Training stage of the text-to-image generator (`tokenflow train-generator`).

Teacher forcing over all scales in one pass: the frozen image tokenizer's codes become
next-scale inputs (under `model.next_scale_input`), the generator predicts every scale's codes,
and the loss is the mean cross-entropy over all image tokens (VAR's uniform token weighting).
With `model.multi_step: refine`, on a share of steps (`model.refine_prob`, decided per step
from (seed, step) so every rank agrees) one refine block is added for a random scale, its
draft being the ground truth with codes replaced at random at a rate ~ U(0,
`model.refine_noise`); its cross-entropy joins the loss (the official `inplace` mode is
untrained). Caption dropout happens
in the dataset (gen_data.CaptionedCodes).

The progress shows the codebook accuracy per scale (`acc@S`, S the scale's side) and the refine
loss, averaged over the log window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.errors import UserError
from tokenflow_cli.eval.visual import save_png, tile, to_uint8
from tokenflow_cli.generation.config import GeneratorRecipe, attach_code_space
from tokenflow_cli.generation.data import (
    CaptionedCodes,
    codes_files,
    load_training_codes,
    make_collate,
    read_caption_table,
)
from tokenflow_cli.generation.model import RefineBlock, TextBatch, build_generator
from tokenflow_cli.generation.prompts import PromptEncoder, load_text_tokenizer
from tokenflow_cli.generation.run_folder import TEXT_TOKENIZER_DIR, write_run_files
from tokenflow_cli.generation.sampling import get_schedule
from tokenflow_cli.tokenizer.codes import read_codes_meta
from tokenflow_cli.tokenizer.identity import check_codes_tokenizer, resolve_tokenizer_for_codes
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.train.fsdp import transformer_blocks
from tokenflow_cli.train.loop import Stage, TrainData, TrainResult, train

EVAL_PROMPTS = 8  # captions drawn into RUN_DIR/samples/step-N.png at every eval


class GeneratorDataError(UserError, ValueError):
    """A generator recipe that names no captions or no codes/images to train on."""


def _text_tokenizer(recipe: GeneratorRecipe, run_dir: Path):
    """The run's own saved tokenizer on resume, else the configured one, else a byte-level BPE
    trained on the captions (deterministic, so every DDP rank trains the same one)."""

    saved = run_dir / TEXT_TOKENIZER_DIR
    if saved.is_dir():
        return load_text_tokenizer(saved)
    if recipe.data.text_tokenizer:
        return load_text_tokenizer(recipe.data.text_tokenizer)
    table = read_caption_table(recipe.data.captions, recipe.data.caption_fields)
    texts = sorted({t for texts in table.values() for t in texts} | set(recipe.data.negative_prompts))
    return train_bpe_tokenizer(texts, vocab_size=recipe.data.text_vocab_size)


class GeneratorStage(Stage):
    kind = "generator"
    find_unused_parameters = True  # the draft projector (multi_step refine) only works on refine steps

    def __init__(self, recipe: GeneratorRecipe, run_dir: str | Path) -> None:
        self.recipe = recipe
        self._notes: list[str] = []
        data = recipe.data
        if data.codes and not data.tokenizer:  # the tokenizer that made the codes
            first = codes_files(data.codes)[0]
            image_tokenizer = resolve_tokenizer_for_codes(read_codes_meta(first), None, torch.device("cpu"), first)
        else:
            image_tokenizer = resolve_tokenizer(data.tokenizer or None, torch.device("cpu"))
        if image_tokenizer.random_init:
            self._notes.append(f"image tokenizer is {image_tokenizer.source}: the generator learns meaningless codes")
        self.image_tokenizer = image_tokenizer.eval().requires_grad_(False)
        self.image_tokenizer_source = None if image_tokenizer.random_init else image_tokenizer.source
        if not data.captions or not (data.codes or data.images):  # before the text tokenizer or model
            raise GeneratorDataError(
                "train-generator needs captioned data: --set data.captions=CAPTIONS.jsonl (\"image\" + caption "
                "fields, e.g. `tokenflow data shapes -o data/shapes` writes data/shapes/captions.jsonl) and "
                "--set data.codes=CODES.npz (from `tokenflow tokenize`) or --set data.images=IMAGES")
        self.text_tokenizer = _text_tokenizer(recipe, Path(run_dir))
        cfg = recipe.model
        if not cfg.lm_path:
            cfg = dataclasses.replace(cfg, text_vocab_size=len(self.text_tokenizer))
        tok = self.image_tokenizer
        cfg = attach_code_space(cfg, tok.scales, tok.codebook_size, tok.code_dim)
        with torch.random.fork_rng(devices=[]):  # the same fresh model in every run and on every rank
            torch.manual_seed(recipe.train.seed)
            self.model = build_generator(cfg)
        self.model_config = cfg
        self.prompts = PromptEncoder.for_model(self.text_tokenizer, cfg)
        self._window = self._empty_window()

    def setup(self) -> None:
        self.image_tokenizer.to(self.device)
        if self.dist.is_main:
            write_run_files(self.run_dir, self.model, self.text_tokenizer, self.image_tokenizer_source)
        codes, self.captions, self.data_info = load_training_codes(self.recipe.data, self.image_tokenizer)
        if self.data_info["codes_meta"] is not None:
            check_codes_tokenizer(self.data_info["codes_meta"], self.image_tokenizer, self.recipe.data.codes,
                                  self.data_info["scales"])
        if self.data_info["scales"] != tuple(self.model.scales):
            raise ValueError(f"codes have scales {self.data_info['scales']}, the generator {self.model.scales}")
        self.codes = codes

    def notes(self) -> list[str]:
        return [*self._notes, f"data: {self.data_info['source']}, {self.data_info['rows']} captioned rows "
                f"({self.data_info['unmatched']} without captions)"]

    def train_data(self) -> TrainData:
        data = self.recipe.data
        dataset = CaptionedCodes(self.codes, self.captions, data.caption_dropout, data.negative_prompts)
        return TrainData(dataset, make_collate(self.prompts), data.num_workers)

    def num_samples(self, batch: dict[str, Any]) -> int:
        return batch["codes"].shape[0]

    def fsdp_units(self) -> list[torch.nn.Module]:
        return transformer_blocks(self.model.lm)  # the image tokenizer stays whole (frozen, not in modules())

    # ---- the step -------------------------------------------------------------------------

    def _refine_block(self, idx_BL: torch.Tensor, step: int) -> tuple[RefineBlock, torch.Tensor] | None:
        cfg = self.model_config
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        if not self.model.multi_step.trained or cfg.refine_prob <= 0:
            return None
        if float(torch.rand((), generator=g)) >= cfg.refine_prob:
            return None
        si = int(torch.randint(len(cfg.scales), (), generator=g))
        target = idx_BL[:, self.model.scale_slice(si)]
        # this rank's own corruption (global RNG, seeded per rank by the loop)
        rate_B1 = torch.rand(target.shape[0], 1, device=target.device) * cfg.refine_noise
        replace = torch.rand(target.shape, device=target.device) < rate_B1
        noise = torch.randint_like(target, cfg.codebook_size)
        draft = torch.where(replace, noise, target)
        return RefineBlock(si, self.image_tokenizer.lookup_codes(draft)), target

    def step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        idx_BL = batch["codes"].to(self.device)
        text = batch["text"]
        text = TextBatch(text.ids_BT.to(self.device), text.mask_BT.to(self.device))
        with torch.no_grad():
            scale_inputs = self.model.scale_inputs(self.image_tokenizer, idx_BL)
            refine = self._refine_block(idx_BL, step)
        out = self.wrapped["model"](text, scale_inputs, refine[0] if refine else None)
        nll = F.cross_entropy(out.logits_BLK.flatten(0, 1).float(), idx_BL.flatten())
        loss = nll
        if refine is not None:
            refine_nll = F.cross_entropy(out.refine_logits_BlK.flatten(0, 1).float(), refine[1].flatten())
            loss = loss + refine_nll
            self._window["refine_nll"] += refine_nll.detach()
            self._window["refine_steps"] += 1
        self._count_hits(out.logits_BLK.detach(), idx_BL)
        return {"loss": loss, "nll": nll}

    # ---- progress -------------------------------------------------------------------------

    def _empty_window(self) -> dict[str, torch.Tensor]:
        n = len(self.model.scales)
        return {"hits": torch.zeros(n), "tokens": torch.zeros(n), "refine_nll": torch.zeros(()),
                "refine_steps": torch.zeros(())}

    def _count_hits(self, logits_BLK: torch.Tensor, idx_BL: torch.Tensor) -> None:
        correct_BL = (logits_BLK.argmax(-1) == idx_BL).float()
        for si in range(len(self.model.scales)):
            part = correct_BL[:, self.model.scale_slice(si)]
            self._window["hits"][si] += part.sum().cpu()
            self._window["tokens"][si] += part.numel()

    def metrics(self, step: int) -> dict[str, float]:
        window, self._window = self._window, self._empty_window()
        packed = torch.cat([window["hits"], window["tokens"], window["refine_nll"].cpu()[None],
                            window["refine_steps"][None]])
        if self.dist.enabled:
            device = self.device if self.device.type == "cuda" else torch.device("cpu")
            packed = packed.to(device)
            dist.all_reduce(packed)
            packed = packed.cpu()
        n = len(self.model.scales)
        hits, tokens, refine_nll, refine_steps = packed[:n], packed[n : 2 * n], packed[-2], packed[-1]
        out = {"acc": float(hits.sum() / tokens.sum().clamp(min=1))}
        for si, side in enumerate(self.model.scales):
            out[f"acc@{side}"] = float(hits[si] / tokens[si].clamp(min=1))
        if refine_steps > 0:
            out["refine_nll"] = float(refine_nll / refine_steps)
        return out

    def evaluate(self, step: int) -> dict[str, float]:
        """A sample grid from the first captions (RUN_DIR/samples/step-N.png)."""

        ev = self.recipe.eval
        prompts = list(dict.fromkeys(c[0] for c in self.captions))[:EVAL_PROMPTS]
        text = self.prompts(prompts, self.device)
        negative = self.prompts([""] * len(prompts), self.device)
        generator = torch.Generator(device=self.device).manual_seed(ev.seed)
        idx = self.model.generate(self.image_tokenizer, text, negative, get_schedule(ev.schedule), ev.cfg,
                                  ev.temperature, generator)
        images = to_uint8(self.image_tokenizer.codes_to_img(idx))
        save_png(tile(images, ncols=len(prompts)), self.run_dir / "samples" / f"step-{step:08d}.png")
        return {"samples": float(len(prompts))}


def train_generator(recipe: GeneratorRecipe, run_dir: str | Path, *, device: str = "auto", resume: bool = True,
                    live: bool | None = True, time_limit_s: float | None = None) -> TrainResult:
    """Build the generator stage for `recipe` and run the generic loop: the run folder
    (generation/run_folder.py) loads with `TextToImage.from_pretrained(run_dir)`."""
    return train(GeneratorStage(recipe, run_dir), recipe.train, run_dir, recipe=recipe, device=device,
                 resume=resume, live=live, time_limit_s=time_limit_s)
