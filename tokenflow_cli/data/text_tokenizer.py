"""Small offline text tokenizers: a byte-level BPE trained on our own texts.

Tiny language models (the understanding LLM, the generator's caption encoder) need a tokenizer
and none can be downloaded here, so we train one on the training texts with the `tokenizers`
package and wrap it in transformers' `PreTrainedTokenizerFast`, which `save_pretrained` /
`AutoTokenizer.from_pretrained` handle like any other. Byte-level means every string encodes
(no unknown characters) and decoding restores spaces exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = (),
    *,
    min_frequency: int = 1,
    add_bos: bool = False,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`.

    `<pad>`, `<s>`, `</s>`, `<unk>` are always present (ids 0-3) and registered as the
    pad/bos/eos/unk tokens; `special_tokens` (e.g. `<image>`) follow them, are never split and
    are kept by `skip_special_tokens` decoding rules like the others. `add_bos` makes plain
    `tokenizer(text)` calls prepend `<s>`. The vocabulary can end up smaller than `vocab_size`
    when the texts are too few to learn that many merges.
    """

    base = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    extra = [t for t in dict.fromkeys(special_tokens) if t not in base]
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=base + extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    if add_bos:
        bos_id = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
    )
    if extra:
        add_special_tokens(tokenizer, extra)
    return tokenizer


def add_special_tokens(tokenizer: PreTrainedTokenizerFast, tokens: Sequence[str]) -> list[int]:
    """Register `tokens` as special (never split, skipped when decoding with
    `skip_special_tokens=True`) and return their ids; existing tokens keep their ids, so the
    caller only resizes the LM's embeddings when `len(tokenizer)` grew."""

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]
