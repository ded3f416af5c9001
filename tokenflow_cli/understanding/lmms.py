"""The understanding models as an lmms-eval model: `lmms-eval --model tokenflow --model_args
pretrained=RUN --tasks mme` (install with `pip install "tokenflow-toolkit[lmms]"`).

Registered through lmms-eval's entry-point group `lmms_eval.models` (pyproject.toml), so no fork
of lmms-eval and no LMMS_EVAL_PLUGINS variable is needed. `pretrained` is anything
`Understanding.from_pretrained` takes: a finetune run folder, a converted release folder, a
built-in name, or nothing for the default model.

What the official evaluation did (lmms-eval `llava`, conv template `qwen_2_5`) and what this
model does the same way: the model folder's own prompt template (the converted release records
`qwen_2_5`), `<image>\\n` before the question when the task does not place it, greedy decoding at
temperature 0 (`do_sample=False`), the folder's generation_config.json repetition penalty and end
ids (understanding/decoding.py), the task's `max_new_tokens` and `until` strings. One image per
question (TokenFlow's LLaVA is single-image, `pad` aspect mode): a document with several images
uses the first, and the result says so in the log. `num_beams > 1` is refused.

`loglikelihood` returns the summed log-probability of the continuation's tokens after the
prompt (lm-eval's definition), and whether greedy decoding would produce them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from tokenflow_cli.understanding.pipeline import Understanding

MODEL_ID = "tokenflow"
log = logging.getLogger(__name__)


def manifests():
    """The entry point's payload: lmms-eval's model manifest for `--model tokenflow`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokenFlowLmms")]


def _device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():  # one process per GPU under accelerate/torchrun
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _first_image(visuals: Sequence | None) -> Image.Image | None:
    images = [v for v in (visuals or []) if isinstance(v, Image.Image)]
    if len(images) > 1:
        log.warning("tokenflow: %d images in one document; the model reads the first", len(images))
    return images[0].convert("RGB") if images else None


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class TokenFlowLmms(lmms):
    """lmms-eval's simple-model interface over `Understanding`."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str = "auto", dtype: str = "auto",
                 tokenizer: str | None = None, batch_size: int | str = 1, repetition_penalty: float | None = None,
                 **unused: object) -> None:
        super().__init__()
        if unused:
            log.warning("tokenflow: ignoring model_args %s", sorted(unused))
        self._device = _device(device)
        self.pipe = Understanding.from_pretrained(pretrained, device=self._device, dtype=dtype, tokenizer=tokenizer)
        model = self.pipe.model
        model.decoding = model.decoding.override(repetition_penalty)
        self.batch_size_per_gpu = int(batch_size)
        for warning in self.pipe.warnings:
            log.warning("tokenflow: %s", warning)

    @property
    def device(self) -> torch.device:
        return self._device

    def _doc_image(self, doc_to_visual, doc_id: int, task: str, split: str) -> Image.Image | None:
        return _first_image(doc_to_visual(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched by identical generation settings and image presence."""
        args = [r.args for r in requests]
        keyed: dict[tuple, list[int]] = {}
        images = [self._doc_image(a[2], a[3], a[4], a[5]) for a in args]
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            key = (repr(sorted(gen_kwargs.items())), images[i] is None)
            keyed.setdefault(key, []).append(i)
        answers: dict[int, str] = {}
        for members in keyed.values():
            gen = dict(args[members[0]][1])
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if int(gen.get("num_beams", 1) or 1) > 1:
                raise ValueError("tokenflow: beam search is not supported (the release is evaluated greedily)")
            temperature = float(gen.get("temperature", 0) or 0) if gen.get("do_sample", False) else 0.0
            for first in range(0, len(members), self.batch_size_per_gpu):
                batch = members[first : first + self.batch_size_per_gpu]
                has_image = images[batch[0]] is not None
                visual = self.pipe.visual_tokens([images[i] for i in batch]) if has_image else None
                texts = self.pipe.model.answer(visual, [args[i][0] for i in batch],
                                               int(gen.get("max_new_tokens", 128)), temperature)
                answers.update({i: _cut(t, until) for i, t in zip(batch, texts, strict=True)})
        return [answers[i] for i in range(len(requests))]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        model = self.pipe.model
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            image = _first_image(doc_to_visual(doc))
            visual = self.pipe.visual_tokens([image]) if image is not None else None
            prompt_BT, _ = model.prompt_batch([context], [image is not None])
            cont = model.text_tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids_BT = torch.cat([prompt_BT, torch.tensor([cont], device=prompt_BT.device)], dim=1)
            logits_BTV = model(ids_BT, visual_features=visual).logits.float()
            start = prompt_BT.shape[1]
            logp_TV = torch.log_softmax(logits_BTV[0, start - 1 : -1], dim=-1)
            target_T = ids_BT[0, start:]
            total = float(logp_TV.gather(1, target_T[:, None]).sum())
            out.append((total, bool((logp_TV.argmax(-1) == target_T).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tokenflow: multi-round generation is not supported")
