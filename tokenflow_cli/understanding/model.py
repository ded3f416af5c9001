"""LLaVA-1.5-style understanding model on TokenFlow features (paper section 4.2).

    image -> frozen feature source -> (B, N, C) -> projector (Linear, GELU, Linear) -> (B, N, D)
          -> written over the N `<image>` placeholder ids of the conversation in inputs_embeds
          -> any transformers causal LM -> answer

The feature source is any callable images -> (B, N, C); `TokenizerFeatures` (features.py-like,
below) builds the paper's four choices from a frozen TokenFlow tokenizer. The model itself only
sees features, so training can cache them and tests can fake them.

Saved layout (`save_pretrained(dir)`): the LLM and its tokenizer in transformers' format at the
top of `dir` (so `AutoModelForCausalLM.from_pretrained(dir)` works), plus `projector.safetensors`
and `llava.json` (our config, feature size, number of visual tokens, tokenizer reference).
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tokenflow_cli.checkpoint import load_state, save_weights
from tokenflow_cli.config import from_dict, to_dict
from tokenflow_cli.fileio import replace_folder
from tokenflow_cli.understanding.config import LlavaModelConfig
from tokenflow_cli.understanding.conversation import ConversationFormatter
from tokenflow_cli.understanding.decoding import DecodingSettings, apply_repetition_penalty

PROJECTOR_NAME = "projector.safetensors"
LLAVA_JSON = "llava.json"
FORMAT = "tokenflow-cli/llava"


class Projector(nn.Sequential):
    """LLaVA-1.5's mlp2x_gelu: visual features (C) -> LLM hidden size (D)."""

    def __init__(self, feature_dim: int, hidden_dim: int, lm_dim: int) -> None:
        super().__init__(nn.Linear(feature_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, lm_dim))


def _cache_kw(lm: nn.Module) -> str:
    """transformers 5 names the KV cache argument `cache`; 4.x called it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class LlavaModel(nn.Module):
    """Projector + causal LM + its text tokenizer and conversation formatter."""

    def __init__(
        self,
        lm: nn.Module,
        text_tokenizer: Any,
        config: LlavaModelConfig,
        feature_dim: int,
        num_visual_tokens: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = feature_dim
        self.num_visual_tokens = num_visual_tokens
        self.extra = dict(extra or {})  # provenance saved in llava.json (tokenizer hash, data, ...)
        self.lm = lm
        lm_dim = lm.get_input_embeddings().embedding_dim
        self.projector = Projector(feature_dim, config.projector_hidden or lm_dim, lm_dim)
        self.text_tokenizer = text_tokenizer
        self.formatter = ConversationFormatter(
            text_tokenizer, config.chat_template, config.system_prompt, config.image_token
        )
        self.image_token_id: int = self.formatter.image_token_id
        self.decoding = DecodingSettings()  # from_pretrained: the folder's generation_config.json
        self._cache_kw = _cache_kw(lm)

    # -- training forward --------------------------------------------------------------------

    def embed_inputs(self, input_ids_BT: torch.Tensor, visual_BNC: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the projected visual tokens written over the image placeholders.

        `visual_BNC` holds one (N, C) map per image, in the order the images' placeholder runs
        appear in the batch (row-major), so samples without an image simply contribute none."""
        is_image_BT = input_ids_BT == self.image_token_id
        # placeholders are overwritten below; looking them up as 0 lets `<image>` lie past the
        # embedding rows (a converted model keeps its LM's vocabulary untouched)
        emb_BTD = self.lm.get_input_embeddings()(input_ids_BT.masked_fill(is_image_BT, 0))
        n_slots = int(is_image_BT.sum())
        if visual_BNC is None or visual_BNC.numel() == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image placeholder tokens but no visual features given")
            return emb_BTD
        if visual_BNC.shape[-1] != self.feature_dim:
            raise ValueError(
                f"visual features have {visual_BNC.shape[-1]} channels, the projector expects "
                f"{self.feature_dim} (was the model trained on another feature choice?)"
            )
        if n_slots != visual_BNC.shape[0] * visual_BNC.shape[1]:
            raise ValueError(
                f"{n_slots} image placeholder tokens for {visual_BNC.shape[0]} images x "
                f"{visual_BNC.shape[1]} visual tokens"
            )
        proj_dtype = self.projector[0].weight.dtype
        vis_BND = self.projector(visual_BNC.to(proj_dtype)).to(emb_BTD.dtype)
        return emb_BTD.masked_scatter(is_image_BT.unsqueeze(-1), vis_BND)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """Causal-LM output (`.loss` is the mean next-token loss over label != -100)."""
        emb_BTD = self.embed_inputs(input_ids, visual_features)
        return self.lm(inputs_embeds=emb_BTD, attention_mask=attention_mask, labels=labels, use_cache=False)

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor,
        visual_BNC: torch.Tensor | None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields the next token of every sample, step by step, using the KV cache.

        Prompts are left-padded; positions count only real tokens, so a padded prompt gives the
        same answer as the unpadded one. temperature 0 = greedy. Finished samples yield pad.
        `self.decoding` adds its repetition penalty (over the generated ids) and stop ids."""
        stop_ids = sorted({*self.formatter.stop_token_ids, *self.decoding.eos_token_ids})
        stops = torch.tensor(stop_ids, device=input_ids_BT.device)
        generated_BT = input_ids_BT.new_empty((input_ids_BT.shape[0], 0))
        pad_id = self.text_tokenizer.pad_token_id
        mask_BT = attention_mask_BT.long()
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(
            inputs_embeds=self.embed_inputs(input_ids_BT, visual_BNC),
            attention_mask=mask_BT,
            position_ids=pos_BT,
            use_cache=True,
            logits_to_keep=1,
        )
        done_B = torch.zeros(input_ids_BT.shape[0], dtype=torch.bool, device=input_ids_BT.device)
        for step in range(max_new_tokens):
            logits_BV = apply_repetition_penalty(out.logits[:, -1].float(), generated_BT,
                                                 self.decoding.repetition_penalty)
            next_B = sample_next(logits_BV, temperature, generator)
            next_B = next_B.masked_fill(done_B, pad_id)
            generated_BT = torch.cat([generated_BT, next_B[:, None]], dim=1)
            yield next_B
            done_B |= torch.isin(next_B, stops)
            if bool(done_B.all()) or step == max_new_tokens - 1:
                return
            mask_BT = torch.cat([mask_BT, torch.ones_like(mask_BT[:, :1])], dim=1)
            pos_BT = pos_BT[:, -1:] + 1
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            out = self.lm(
                input_ids=next_B[:, None],
                attention_mask=mask_BT,
                position_ids=pos_BT,
                use_cache=True,
                **{self._cache_kw: cache},
            )

    def prompt_batch(
        self,
        questions: Sequence[str | list[dict]],
        has_image: Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask for questions (a string, or LLaVA turns
        ending with the human question), on the model's device."""
        has_image = list(has_image) if has_image is not None else [True] * len(questions)
        rows = []
        for q, img in zip(questions, has_image, strict=True):
            turns = [{"from": "human", "value": q}] if isinstance(q, str) else q
            rows.append(self.formatter.prompt(turns, self.num_visual_tokens, has_image=img))
        width = max(len(r) for r in rows)
        pad_id = self.text_tokenizer.pad_token_id
        device = self.projector[0].weight.device
        ids_BT = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask_BT = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        return ids_BT, mask_BT

    def answer(
        self,
        visual_BNC: torch.Tensor | None,
        questions: Sequence[str | list[dict]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Batched answers, one image per question (or none when `visual_BNC` is None)."""
        has_image = [visual_BNC is not None] * len(questions)
        ids_BT, mask_BT = self.prompt_batch(questions, has_image)
        steps = list(self.generate_ids(ids_BT, mask_BT, visual_BNC, max_new_tokens, temperature, generator))
        if not steps:
            return [""] * len(questions)
        new_BT = torch.stack(steps, dim=1).tolist()
        return [self.text_tokenizer.decode(self._until_stop(row), skip_special_tokens=True).strip() for row in new_BT]

    def stream_answer(
        self,
        visual_1NC: torch.Tensor | None,
        question: str | list[dict],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """Text pieces of one answer as they are generated (joined: the `answer` text)."""
        ids_BT, mask_BT = self.prompt_batch([question], [visual_1NC is not None])
        new_ids: list[int] = []
        shown = ""
        for next_B in self.generate_ids(ids_BT, mask_BT, visual_1NC, max_new_tokens, temperature, generator):
            new_ids.append(int(next_B[0]))
            text = self.text_tokenizer.decode(self._until_stop(new_ids), skip_special_tokens=True).lstrip()
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole UTF-8 chars
                yield text[len(shown) :]
                shown = text
        final = self.text_tokenizer.decode(self._until_stop(new_ids), skip_special_tokens=True).strip()
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown) :]

    def _until_stop(self, ids: list[int]) -> list[int]:
        stops = {*self.formatter.stop_token_ids, *self.decoding.eos_token_ids}
        for i, tid in enumerate(ids):
            if tid in stops:
                return ids[:i]
        return ids

    # -- stages, save, load --------------------------------------------------------------------

    def set_stage(self, stage: int) -> list[nn.Parameter]:
        """Stage 1 trains the projector only (LLM frozen); stage 2 the LLM and the projector.
        Returns the trainable parameters."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.lm.requires_grad_(stage == 2)
        self.projector.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(
        self,
        out_dir: str | Path,
        extra: dict[str, Any] | None = None,
        atomic: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the model folder (see module docstring). `atomic` writes a sibling temp folder
        and swaps it in, so an interrupted save never leaves a half-written model (a caller that
        already writes into a temp folder passes False). `state_dict` replaces the module's own
        (a full state dict gathered from FSDP shards). The LLM goes into one model.safetensors."""
        out_dir = Path(out_dir)
        if not atomic:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._write(out_dir, extra, state_dict)
            return out_dir
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._write(tmp, extra, state_dict)
        replace_folder(tmp, out_dir)
        return out_dir

    def _info(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        fixed = {
            "format": FORMAT,
            "config": to_dict(self.config),
            "feature_dim": self.feature_dim,
            "num_visual_tokens": self.num_visual_tokens,
            "image_token_id": self.image_token_id,
        }
        return {**fixed, **self.extra, **(extra or {})}

    def _write(self, folder: Path, extra: dict[str, Any] | None, state_dict: dict[str, torch.Tensor] | None) -> None:
        state_dict = state_dict if state_dict is not None else self.state_dict()
        lm_state = {k[len("lm.") :]: v for k, v in state_dict.items() if k.startswith("lm.")}
        projector_state = {k[len("projector.") :]: v for k, v in state_dict.items() if k.startswith("projector.")}
        self.lm.save_pretrained(folder, state_dict=lm_state, max_shard_size="100000GB")
        self.text_tokenizer.save_pretrained(folder)
        info = self._info(extra)
        save_weights(
            projector_state,
            folder / PROJECTOR_NAME,
            info["config"],
            kind="llava-projector",
            extra={"feature_dim": str(self.feature_dim), "num_visual_tokens": str(self.num_visual_tokens)},
        )
        (folder / LLAVA_JSON).write_text(json.dumps(info, indent=2))

    def save_skeleton(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Everything but the weights (LM config, tokenizer, llava.json): with a full state dict
        (a training checkpoint's model.safetensors) it rebuilds the model, see `from_pretrained`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.config.save_pretrained(folder)
        self.text_tokenizer.save_pretrained(folder)
        (folder / LLAVA_JSON).write_text(json.dumps(self._info(extra), indent=2))

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, dtype: torch.dtype | None = None, weights: str | Path | None = None
    ) -> LlavaModel:
        """Load a folder written by `save_pretrained`, or a `save_skeleton` folder plus `weights`
        (a full state dict in safetensors, e.g. a training checkpoint). On the CPU; move with `.to`."""

        model_dir = Path(model_dir)
        info_path = model_dir / LLAVA_JSON
        if not info_path.is_file():
            raise FileNotFoundError(f"{model_dir} is not an understanding model folder (no {LLAVA_JSON})")
        info = json.loads(info_path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{info_path}: format {info.get('format')!r}, expected {FORMAT!r}")
        config = from_dict(LlavaModelConfig, info["config"], str(info_path))
        dtype = dtype or torch.float32
        if weights is None:
            lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        else:
            lm_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
            lm = AutoModelForCausalLM.from_config(lm_config, dtype=dtype)
        text_tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        fixed = ("format", "config", "feature_dim", "num_visual_tokens", "image_token_id")
        extra = {k: v for k, v in info.items() if k not in fixed}
        model = cls(lm, text_tokenizer, config, info["feature_dim"], info["num_visual_tokens"], extra)
        if weights is None:
            model.projector.load_state_dict(load_state(model_dir / PROJECTOR_NAME)[0])
        else:
            model.load_state_dict(load_state(weights)[0], strict=True)
        model.decoding = DecodingSettings.from_folder(model_dir)
        return model


def sample_next(logits_BV: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
