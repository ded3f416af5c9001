"""LLaVA conversations -> token ids with exact label masks.

A record is LLaVA's `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`.
The text is built as a list of segments, each tokenised on its own and marked trainable or
not, so the label mask is exact by construction (no offset mapping, no re-search of the answer
in the tokenised prompt). Inference tokenises the prompt segments the same way, so the model is
asked for exactly the continuation it was trained to produce.

Three templates:
- the LM tokenizer's chat template (when it has one and `kind="auto"`): the prompt before
  each answer is rendered with `add_generation_prompt=True`, the answer segment is the rest of
  the rendering with that answer included (its end-of-turn marker is trained too);
- "plain" (Vicuna v1 style): `<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...`;
- "qwen_2_5", the official TokenFlow-LLaVA template (ChatML, whatever the tokenizer's own
  template says, which would insert Qwen's default system prompt):
  `<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\n{q}<|im_end|>\n`
  `<|im_start|>assistant\n{a}<|im_end|>\n`, with `<image>` moved to the front of its turn as
  the official training and evaluation do. The answer and its `<|im_end|>\n` are trained (the
  official trainer also trains the assistant header and every `\n`/`<|im_start|>`/`<|im_end|>`).

`<image>` in a human turn becomes `num_image_tokens` copies of the image token id, later
replaced by visual features in the model's input embeddings; they are never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # label of every position the loss skips (prompt, visual tokens, padding)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on answer tokens (and their end-of-turn marker)


def to_messages(
    turns: list[dict[str, str]], image_token: str = "<image>", has_image: bool = False
) -> list[dict]:
    """LLaVA turns (`from`/`value`) -> chat messages (`role`/`content`).

    With an image but no placeholder anywhere, LLaVA's convention puts `<image>\\n` before the
    first human turn."""
    messages = []
    for i, turn in enumerate(turns):
        role = ROLES.get(turn.get("from", turn.get("role", "")))
        if role is None:
            raise ValueError(f"turn {i}: unknown speaker {turn!r}; expected from = human | gpt")
        messages.append({"role": role, "content": str(turn.get("value", turn.get("content", "")))})
    if has_image and not any(image_token in m["content"] for m in messages):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("a record with an image needs a human turn to hold the <image> placeholder")
        first_user["content"] = f"{image_token}\n{first_user['content']}"
    return messages


class ConversationFormatter:
    """Formats and tokenises conversations for one LM tokenizer."""

    def __init__(
        self, tokenizer: Any, kind: str = "auto", system_prompt: str = "", image_token: str = "<image>"
    ) -> None:
        if kind not in ("auto", "plain", "qwen_2_5"):
            raise ValueError(f"template kind {kind!r}; use 'auto', 'plain' or 'qwen_2_5'")
        self.tokenizer = tokenizer
        self.use_chat_template = kind == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.template = "chat_template" if self.use_chat_template else ("plain" if kind == "auto" else kind)
        self.system_prompt = system_prompt
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"{image_token!r} is not a token of the LM tokenizer; add it as a special token first"
            )

    # -- public ------------------------------------------------------------------------------

    def tokenize(
        self, turns: list[dict], num_image_tokens: int, has_image: bool = True
    ) -> TokenizedConversation:
        """A training record's conversation -> ids and labels (loss on the gpt turns only)."""
        messages = to_messages(turns, self.image_token, has_image)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("a training conversation needs at least one gpt turn")
        return self._encode(self._segments(messages, add_generation_prompt=False), num_image_tokens)

    def prompt(self, turns: list[dict], num_image_tokens: int, has_image: bool = True) -> list[int]:
        """Ids asking for the next answer: `turns` end with the human question."""
        messages = to_messages(turns, self.image_token, has_image)
        if messages[-1]["role"] != "user":
            raise ValueError("a prompt must end with a human turn")
        return self._encode(self._segments(messages, add_generation_prompt=True), num_image_tokens).input_ids

    def render(self, turns: list[dict], has_image: bool = True) -> str:
        """The formatted text (for display and debugging)."""
        messages = to_messages(turns, self.image_token, has_image)
        add_prompt = messages[-1]["role"] == "user"
        parts = self._segments(messages, add_generation_prompt=add_prompt)
        return "".join(p if isinstance(p, str) else self.tokenizer.convert_ids_to_tokens(p) for p, _ in parts)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an answer: eos, plus the chat template's end-of-turn marker when known."""
        ids = {self.tokenizer.eos_token_id}
        for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid < len(self.tokenizer):
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    # -- segments ------------------------------------------------------------------------------

    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str | int, bool]]:
        builders = {
            "chat_template": self._chat_template_segments,
            "plain": self._plain_segments,
            "qwen_2_5": self._chatml_segments,
        }
        return builders[self.template](messages, add_generation_prompt)

    def _chatml_segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str | int, bool]]:
        """The official `qwen_2_5` template (conv_qwen, SeparatorStyle.CHATML)."""
        system = " ".join(m["content"] for m in messages if m["role"] == "system") or self.system_prompt
        segments: list[tuple[str | int, bool]] = []
        if system:
            segments.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for m in messages:
            content = m["content"]
            if self.image_token in content:  # official: `<image>` moves to the front of its turn
                content = f"{self.image_token}\n{content.replace(self.image_token, '').strip()}"
            if m["role"] == "user":
                segments.append((f"<|im_start|>user\n{content}<|im_end|>\n", False))
            elif m["role"] == "assistant":
                segments += [("<|im_start|>assistant\n", False), (f"{content}<|im_end|>\n", True)]
        if add_generation_prompt:
            segments.append(("<|im_start|>assistant\n", False))
        else:
            while segments and not segments[-1][1]:
                segments.pop()  # a trailing unanswered question teaches nothing
        return segments

    def _plain_segments(
        self, messages: list[dict], add_generation_prompt: bool
    ) -> list[tuple[str | int, bool]]:
        tok = self.tokenizer
        segments: list[tuple[str | int, bool]] = []
        if tok.bos_token_id is not None:
            segments.append((tok.bos_token_id, False))
        system = " ".join(m["content"] for m in messages if m["role"] == "system") or self.system_prompt
        prefix = f"{system} " if system else ""
        for m in messages:
            if m["role"] == "user":
                segments.append((f"{prefix}USER: {m['content']} ASSISTANT:", False))
                prefix = ""
            elif m["role"] == "assistant":
                segments.append((f" {m['content']}", True))
                segments.append((tok.eos_token_id, True))  # learn to stop
        if not add_generation_prompt:
            while segments and not segments[-1][1] and isinstance(segments[-1][0], str):
                segments.pop()  # a trailing unanswered question teaches nothing
        return segments

    def _chat_template_segments(
        self, messages: list[dict], add_generation_prompt: bool
    ) -> list[tuple[str | int, bool]]:
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        render = self.tokenizer.apply_chat_template
        segments: list[tuple[str | int, bool]] = []
        done = ""  # text already covered by segments
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:k], tokenize=False, add_generation_prompt=True)
            full = render(messages[: k + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    "the LM's chat template does not render conversations as growing prefixes, so answer "
                    "masks cannot be exact; set model.chat_template: plain"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        if add_generation_prompt:
            prompt = render(messages, tokenize=False, add_generation_prompt=True)
            if not prompt.startswith(done):
                raise ValueError(
                    "the LM's chat template rewrites earlier turns; set model.chat_template: plain"
                )
            segments.append((prompt[len(done) :], False))
        return [s for s in segments if s[0] != ""]

    # -- ids -------------------------------------------------------------------------------------

    def _encode(self, segments: list[tuple[str | int, bool]], num_image_tokens: int) -> TokenizedConversation:
        input_ids: list[int] = []
        labels: list[int] = []
        for piece, trainable in segments:
            ids = (
                [piece] if isinstance(piece, int) else self.tokenizer.encode(piece, add_special_tokens=False)
            )
            for tid in ids:
                if tid == self.image_token_id:
                    input_ids += [tid] * num_image_tokens
                    labels += [IGNORE_INDEX] * num_image_tokens
                else:
                    input_ids.append(tid)
                    labels.append(tid if trainable else IGNORE_INDEX)
        return TokenizedConversation(input_ids, labels)
