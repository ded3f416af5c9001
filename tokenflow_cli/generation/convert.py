"""The released TokenFlow-t2i model (a Hugging Face folder) -> our generator run folder.

What maps to what is official/T2I.md "Key map" and docs/CONVERT.md: the official Llama layers
go into our `llama-qknorm-postnorm` LM (their `input_layernorm` is applied after attention, so
it is our `post_attention_layernorm`; their `post_attention_layernorm` follows the MLP, our
`post_feedforward_layernorm`), `lvl_embed` rows 0, 2.. N become the scale embeddings (text
positions add row 0), the embedding of the last `<img>` id becomes the start token, and the
image rows of the shared `lm_head` the image head. The ids this depends on (`[PAD]`, the
first image id, the `<img>` pieces) are read from the folder's tokenizer and buffers.

Reads shard by shard (generation/../hub.py) and writes our safetensors tensor by tensor
(generation/safetensors_stream.py), in the stored dtype unless told otherwise, so peak memory
is about the largest tensor plus what the OS maps of the current shard.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from tokenflow_cli.checkpoint import WEIGHTS_NAME, resolve_weights_path
from tokenflow_cli.config import save_resolved, to_dict
from tokenflow_cli.device import dtype_of
from tokenflow_cli.generation.config import GeneratorModelConfig, GeneratorRecipe
from tokenflow_cli.generation.model import build_generator
from tokenflow_cli.generation.run_folder import IMAGE_TOKENIZER_NAME, KIND, write_run_files
from tokenflow_cli.generation.safetensors_stream import stream_writer
from tokenflow_cli.hub import HubFolder, iter_shards, open_hub_folder, read_tensor, tensor_shapes
from tokenflow_cli.tokenizer.convert import ConversionError, convert_checkpoint
from tokenflow_cli.tokenizer.model import load_tokenizer
from tokenflow_cli.version import __version__

__all__ = ["OFFICIAL_PROMPT_TOKENS", "T2IConversionReport", "convert_t2i", "is_t2i_folder"]

T2I_MODEL_TYPE = "llava_llama"
OFFICIAL_PROMPT_TOKENS = 128  # max_text_token_num of the official sampler (run_llava_samples.py)
IMAGE_MARKER, PAD_TOKEN, FIRST_IMAGE_TOKEN = "<img>", "[PAD]", "<vq_token_0>"
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # --dtype spellings -> precision names
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
LAYER_KEYS = {  # official name inside a layer -> ours (Exaone4-style names of the same block)
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "self_attn.qknorm.query_norm.weight": "self_attn.q_norm.weight",
    "self_attn.qknorm.key_norm.weight": "self_attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "input_layernorm.weight": "post_attention_layernorm.weight",  # applied to the attention output
    "post_attention_layernorm.weight": "post_feedforward_layernorm.weight",  # applied to the MLP output
}
NOT_CARRIED_PREFIXES = {
    "model.vision_tower.": "the image tokenizer comes from its own checkpoint",
}
NOT_CARRIED_SUFFIXES = {"rotary_emb.inv_freq": "RoPE frequencies are recomputed"}
# The id buffers: the official trainer registers them on the causal-LM module itself
# (`llava_arch.py:414-415`), so a saved folder holds them at top level (the 7B key table);
# the prefixed names are accepted too, should a copy have them.
ID_BUFFERS = {
    "image_token_start": ("image_token_start", "model.image_token_start"),
    "image_token_end": ("image_token_end", "model.image_token_end"),
}
BUFFER_NAMES = {name: kind for kind, names in ID_BUFFERS.items() for name in names}


@dataclass
class T2IConversionReport:
    source: str
    output: str
    weight_format: str  # "safetensors" or "bin"
    shards: int
    stored_dtypes: list[str]
    dtype: str  # what was written
    official_keys: int
    written_keys: int
    parameters: int
    ids: dict[str, object]  # the ids the conversion depends on, as read from the files
    not_carried: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    image_tokenizer: str = ""
    config: dict = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        cfg = self.config
        lines = [
            f"read {self.source}: TokenFlow-t2i ({self.weight_format}, {self.shards} shards, "
            f"stored {'/'.join(self.stored_dtypes)})",
            f"mapped {self.official_keys} official keys -> {self.written_keys} of ours, "
            f"{self.parameters:,} elements as {self.dtype}",
            f"LM {cfg['lm_arch']}: {cfg['num_layers']} layers x {cfg['hidden_size']}, next-scale inputs "
            f"{cfg['next_scale_input']}, multi-step {cfg['multi_step']}, scales {tuple(cfg['scales'])}, "
            f"K {cfg['codebook_size']}",
            "  ids: " + ", ".join(f"{k} {v}" for k, v in self.ids.items()),
        ]
        lines += [f"  not carried: {key}: {why}" for key, why in self.not_carried.items()]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"image tokenizer: {self.image_tokenizer}")
        lines.append(f"wrote {self.output}")
        return lines


def is_t2i_folder(path: str | Path) -> bool:
    """A hub folder whose config.json names the official t2i model type (`llava_llama`)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == T2I_MODEL_TYPE
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------
# Ids and config
# --------------------------------------------------------------------------------------------


def _text_tokenizer(folder: HubFolder):
    """The folder's tokenizer with `[PAD]` as its pad token."""
    if not folder.tokenizer_files:
        raise ConversionError(f"{folder.root}: no tokenizer files (tokenizer.model / tokenizer.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder.root), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{folder.root}: the text tokenizer does not load: {err}") from None
    if tok.convert_tokens_to_ids(PAD_TOKEN) in (None, tok.unk_token_id):
        raise ConversionError(f"{folder.root}: the tokenizer has no {PAD_TOKEN} token (the official pad)")
    tok.pad_token = PAD_TOKEN  # saved into the run folder by write_run_files
    return tok


def _ids(folder: HubFolder, tok, codebook_size: int) -> dict[str, object]:
    """[PAD], the first image id, `<img>`'s pieces, BOS: read from the tokenizer and checked
    against the model's own `image_token_start` buffer and vocabulary size."""
    pad = tok.convert_tokens_to_ids(PAD_TOKEN)
    start = tok.convert_tokens_to_ids(FIRST_IMAGE_TOKEN)
    start = None if start in (None, tok.unk_token_id) else int(start)
    buffer = _read_buffer(folder, "image_token_start") if start is None else None
    if start is None and buffer is None:
        raise ConversionError(f"{folder.root}: neither the tokenizer ({FIRST_IMAGE_TOKEN}) nor the weights "
                              f"({' / '.join(ID_BUFFERS['image_token_start'])}) give the first image id")
    start = int(buffer) if start is None else start
    marker = tok(IMAGE_MARKER, add_special_tokens=False)["input_ids"]
    if not marker or max(marker) >= start:
        raise ConversionError(f"{IMAGE_MARKER!r} tokenizes to {marker}, not text ids below {start}")
    stated = int(folder.config.get("vq_codebook_size") or 0)  # the official trainer records K here
    if stated > 0 and stated != codebook_size:
        raise ConversionError(f"config.json vq_codebook_size {stated} but the image tokenizer has K {codebook_size}: "
                              "give the image tokenizer this model was trained with")
    vocab = int(folder.config.get("vocab_size", 0))
    if vocab and vocab != start + codebook_size:
        raise ConversionError(f"config vocab_size {vocab} != image_token_start {start} + K {codebook_size} "
                              "(image tokenizer and model disagree)")
    return {"pad": int(pad), "image_token_start": start, "image_marker": [int(i) for i in marker],
            "image_marker_pieces": tok.convert_ids_to_tokens(marker), "bos": tok.bos_token_id,
            "vocab_size": start + codebook_size}


def _read_buffer(folder: HubFolder, kind: str) -> torch.Tensor | None:
    """An id buffer under the first of its names the folder holds."""
    for name in ID_BUFFERS[kind]:
        value = read_tensor(folder, name)
        if value is not None:
            return value
    return None


def _sentencepiece_note(folder: HubFolder, marker: list[int]) -> list[str]:
    """The official sampler tokenizes with the slow sentencepiece tokenizer: say whether it
    splits `<img>` as the tokenizer we load does."""
    model_file = folder.tokenizer_files.get("tokenizer.model")
    if model_file is None:
        return []
    pieces = spm.SentencePieceProcessor(model_file=str(model_file)).encode(IMAGE_MARKER)
    if pieces == marker:
        return [f"sentencepiece splits {IMAGE_MARKER} the same way ({pieces})"]
    return [f"WARNING: sentencepiece splits {IMAGE_MARKER} into {pieces}, the loaded tokenizer into {marker}; "
            "set model.image_marker_ids in the run's model config if the official split differs"]


def _model_config(folder: HubFolder, ids: dict, image_tok, dtype: torch.dtype) -> GeneratorModelConfig:
    c = folder.config
    rope = c.get("rope_parameters") or {}
    return GeneratorModelConfig(
        name=f"tokenflow-t2i ({folder.root.name})", lm_arch="llama-qknorm-postnorm",
        lm_dtype=DTYPE_ALIASES[str(dtype).removeprefix("torch.")],
        hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        text_vocab_size=int(ids["image_token_start"]), max_text_tokens=OFFICIAL_PROMPT_TOKENS,
        text_layout="official", image_marker_ids=tuple(ids["image_marker"]), next_scale_input="chained",
        multi_step="inplace", image_head="shared-vocabulary", sampler_defaults="official",
        scales=tuple(image_tok.scales), codebook_size=image_tok.codebook_size, code_dim=image_tok.code_dim,
    )


# --------------------------------------------------------------------------------------------
# Key map
# --------------------------------------------------------------------------------------------


class _Mapper:
    """Official (name, tensor) -> our [(name, tensor)], or the reason it is not carried."""

    def __init__(self, cfg: GeneratorModelConfig, ids: dict, expected: dict[str, tuple[int, ...]]) -> None:
        self.cfg, self.expected = cfg, expected
        self.text_rows, self.K, self.N = cfg.text_vocab_size, cfg.codebook_size, len(cfg.scales)
        self.start_id = int(ids["image_token_start"])
        self.last_marker = int(ids["image_marker"][-1])
        self.level_rows = 0

    def __call__(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | str:
        layer = LAYER.match(name)
        if layer and layer.group(2) in LAYER_KEYS:
            return [(f"lm.layers.{layer.group(1)}.{LAYER_KEYS[layer.group(2)]}", t)]
        if name == "model.embed_tokens.weight":
            return [("lm.embed_tokens.weight", t[: self.text_rows]),
                    ("start_token", t[self.last_marker].reshape(1, 1, -1))]
        if name == "lm_head.weight":
            return [("head.weight", t[self.start_id : self.start_id + self.K])]
        if name == "model.norm.weight":
            return [("lm.norm.weight", t)]
        if name.startswith("model.mm_projector."):
            return [("projector." + name.removeprefix("model.mm_projector."), t)]
        if name == "model.lvl_embed.weight":  # row 0: text and scale 0; row k + 1: scale k >= 1
            self.level_rows = t.shape[0]
            return [("scale_embed", torch.cat([t[:1], t[2 : self.N + 1]]))]
        if name == "model.pos_1LC":
            return [("pos_embed", t.reshape(-1, t.shape[-1]))]
        if name in BUFFER_NAMES:
            return "an id (checked against the tokenizer)"
        for prefix, reason in NOT_CARRIED_PREFIXES.items():
            if name.startswith(prefix):
                return reason
        for suffix, reason in NOT_CARRIED_SUFFIXES.items():
            if name.endswith(suffix):
                return reason
        raise ConversionError(f"unexpected official key {name!r} (shape {tuple(t.shape)}): no mapping for it")

    def summary(self) -> dict[str, str]:
        """The parts of mapped tensors that are not carried."""
        out = {
            "lm_head.weight[:image_token_start]": f"the {self.start_id} text rows: the official sampler sets "
                                                  "text logits to -inf",
            "model.embed_tokens.weight[image_token_start:]": f"the {self.K} image-id rows: image positions take "
                                                             "the projector's inputs instead",
            "model.lvl_embed.weight[1]": "never used by the official model",
        }
        if self.level_rows > self.N + 1:
            out[f"model.lvl_embed.weight[{self.N + 1}:]"] = "rows beyond the image tokenizer's scales"
        return out


def _check_ids(name: str, t: torch.Tensor, ids: dict) -> None:
    kind = BUFFER_NAMES.get(name)
    if kind == "image_token_start" and int(t) != ids["image_token_start"]:
        raise ConversionError(f"{name} is {int(t)} but the tokenizer puts "
                              f"{FIRST_IMAGE_TOKEN} at {ids['image_token_start']}")
    if kind == "image_token_end" and int(t) != ids["vocab_size"] - 1:
        raise ConversionError(f"{name} is {int(t)}, expected {ids['vocab_size'] - 1} "
                              "(image_token_start + K - 1)")


# --------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------


def _image_tokenizer(path: str | Path, out_dir: Path) -> Path:
    """Our tokenizer checkpoint; an official `.pt` is converted into the run folder first."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        convert_checkpoint(path, out_dir / IMAGE_TOKENIZER_NAME)
        return out_dir / IMAGE_TOKENIZER_NAME
    return resolve_weights_path(path)


def _stored_dtype(folder: HubFolder, infos: dict) -> tuple[torch.dtype, list[str]]:
    names = sorted({i.dtype for i in infos.values() if i.dtype in ("float32", "bfloat16", "float16")})
    if not names:
        raise ConversionError(f"{folder.root}: no floating tensors")
    main = infos.get("model.embed_tokens.weight")
    return getattr(torch, main.dtype if main else names[0]), names


def convert_t2i(src_dir: str | Path, image_tokenizer: str | Path, out_dir: str | Path,
                dtype: str | None = None) -> T2IConversionReport:
    """Convert a released t2i folder and its image tokenizer into our run folder `out_dir`
    (model.safetensors, generator.json, recipe.yaml, text_tokenizer/), atomically."""
    folder = open_hub_folder(src_dir)
    if folder.config.get("model_type") != T2I_MODEL_TYPE:
        raise ConversionError(f"{folder.root}: model_type {folder.config.get('model_type')!r}, "
                              f"not the t2i model's {T2I_MODEL_TYPE!r}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report = _convert_into(folder, image_tokenizer, tmp, out_dir, dtype)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


def _convert_into(folder: HubFolder, image_tokenizer: str | Path, tmp: Path, out_dir: Path,
                  dtype: str | None) -> T2IConversionReport:
    tok_path = _image_tokenizer(image_tokenizer, tmp)
    image_tok = load_tokenizer(str(tok_path))
    text_tok = _text_tokenizer(folder)
    ids = _ids(folder, text_tok, image_tok.codebook_size)
    infos = tensor_shapes(folder)
    stored, stored_names = _stored_dtype(folder, infos)
    out_dtype = dtype_of(DTYPE_ALIASES.get(dtype, dtype)) if dtype else stored
    cfg = _model_config(folder, ids, image_tok, out_dtype)
    with torch.device("meta"):
        meta_model = build_generator(cfg)
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    mapper, not_carried, parameters = _Mapper(cfg, ids, expected), {}, 0
    specs = {k: (shape, out_dtype) for k, shape in expected.items()}
    meta = {"format": f"tokenflow-cli/{KIND}", "version": __version__, "config": json.dumps(to_dict(cfg)),
            "converted_from": str(folder.root)}
    with stream_writer(tmp / WEIGHTS_NAME, specs, meta) as writer:
        for _, tensors in iter_shards(folder):
            for name, t in tensors:
                mapped = mapper(name, t)
                if isinstance(mapped, str):
                    _check_ids(name, t, ids)
                    not_carried[name] = mapped
                    continue
                for ours, value in mapped:
                    if ours not in expected or tuple(value.shape) != expected[ours]:
                        raise ConversionError(f"{name} -> {ours}: shape {tuple(value.shape)}, ours expects "
                                              f"{expected.get(ours)}")
                    writer.write(ours, value.to(out_dtype))
                    parameters += value.numel()
                del t, mapped
        missing = writer.missing()
        if missing:
            raise ConversionError(f"{len(missing)} of our tensors have no official source, first {missing[0]!r}")
    not_carried.update(mapper.summary())
    write_run_files(tmp, meta_model, text_tok, tok_path)
    _point_at_final(tmp, out_dir, tok_path)
    save_resolved(GeneratorRecipe(model=cfg), tmp / "recipe.yaml")
    return T2IConversionReport(
        source=str(folder.root), output=str(out_dir), weight_format=folder.format, shards=len(folder.shards),
        stored_dtypes=stored_names, dtype=str(out_dtype).removeprefix("torch."), official_keys=len(infos),
        written_keys=len(expected), parameters=parameters, ids=ids, not_carried=not_carried,
        image_tokenizer=str(tok_path if tok_path.parent != tmp else out_dir / tok_path.name), config=to_dict(cfg),
        notes=[f"prompts: {OFFICIAL_PROMPT_TOKENS} ids left-padded with [PAD] ({ids['pad']}), then "
               f"{IMAGE_MARKER} = {ids['image_marker_pieces']}", *_sentencepiece_note(folder, ids["image_marker"])],
    )


def _point_at_final(tmp: Path, out_dir: Path, tok_path: Path) -> None:
    """generator.json names the image tokenizer where it will be after the rename."""
    sidecar_path = tmp / "generator.json"
    sidecar = json.loads(sidecar_path.read_text())
    if tok_path.parent == tmp:
        sidecar["image_tokenizer"] = str((out_dir / tok_path.name).resolve())
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
