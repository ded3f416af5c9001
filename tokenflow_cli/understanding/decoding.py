"""How an understanding model decodes its answers, and the release's evaluation settings.

The official evaluation runs lmms-eval's `llava` model: `generate(..., do_sample=temperature > 0,
temperature=0, top_p=None, num_beams=1, max_new_tokens=...)` with no `repetition_penalty`, so
transformers takes it, and the end-of-answer ids, from the model folder's
`generation_config.json`. The prompt goes in as `inputs_embeds` (`llava_qwen.py` `generate`), so
the penalty sees only the generated tokens. `DecodingSettings.from_folder` reads those values;
`LlavaModel.generate_ids` applies them (greedy at temperature 0, as `do_sample=False`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class DecodingSettings:
    repetition_penalty: float = 1.0  # transformers' rule on the generated ids; 1.0 = off
    eos_token_ids: tuple[int, ...] = ()  # ids that also end an answer (generation_config eos_token_id)
    source: str = "defaults"  # where the values came from (printed with every answer)

    @classmethod
    def from_folder(cls, folder: str | Path) -> DecodingSettings:
        """The folder's generation_config.json values (the defaults when it has none)."""
        path = Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        eos = config.get("eos_token_id")
        eos_ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return cls(float(config.get("repetition_penalty", 1.0)), eos_ids, str(path.name))

    def override(self, repetition_penalty: float | None = None) -> DecodingSettings:
        """These settings with the values given (None keeps a value); the source says so."""
        if repetition_penalty is None or repetition_penalty == self.repetition_penalty:
            return self
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        return dataclasses.replace(self, repetition_penalty=repetition_penalty,
                                   source=f"{self.source}; repetition_penalty given")

    def describe(self) -> dict:
        return {"decoding": "greedy (lmms-eval: do_sample False)", "repetition_penalty": self.repetition_penalty,
                "eos_token_ids": list(self.eos_token_ids), "decoding_source": self.source}


def apply_repetition_penalty(logits_BV: torch.Tensor, generated_BT: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: every id already generated has its logit
    divided by `penalty` when positive, multiplied when negative."""
    if penalty == 1.0 or generated_BT.shape[1] == 0:
        return logits_BV
    seen_BT = logits_BV.gather(1, generated_BT)
    seen_BT = torch.where(seen_BT < 0, seen_BT * penalty, seen_BT / penalty)
    return logits_BV.scatter(1, generated_BT, seen_BT)
