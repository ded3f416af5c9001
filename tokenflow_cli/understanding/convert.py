"""The released official LLaVA folder -> our understanding model folder, streamed shard by shard.

    convert_llava(src_dir, tokenizer_checkpoint, out_dir, dtype=None, *, tokenizer_config=None,
                  override_tokenizer=False) -> LlavaConversionReport
    is_llava_folder(path) -> bool          # config.json names an official LLaVA model_type

`src_dir` is the hub folder as downloaded (`ByteFlow-AI/Tokenflow-llava-qwen2.5-14B-finetuning`:
config.json, `model-*.safetensors` + index or `pytorch_model-*.bin` + index, tokenizer files).
The image tokenizer is the copy the folder embeds (`model.vision_tower.vision_tower.*`), the one
the official loader runs, written in its stored dtype (`embedded_tokenizer.py`);
`tokenizer_config` describes its architecture when it is not a release variant.
`tokenizer_checkpoint` (optional: an official `.pt`, or ours) is compared with that copy and the
difference reported; `override_tokenizer` uses it instead (a warning in the report). A folder
without a copy needs it. `dtype` None keeps the LM's stored dtype (bf16 for the release), else
"fp32" | "bf16" | "fp16" (or "float32" | "bfloat16" | "float16").
`report.summary_lines()` is what `tokenflow convert` prints.

Every key is mapped (`official.classify_key`) or listed as not carried, every shape is checked
against the LM built from config.json on the meta device and against the projector, before a
byte is written. The LM is then copied one input shard at a time (peak memory about one shard)
into `out_dir` in transformers' sharded layout, next to `projector.safetensors`, the text
tokenizer (with `<image>` added) and `llava.json`: the folder `LlavaModel.from_pretrained`,
`tokenflow ask`, `eval vqa` and `finetune-llava --init` read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from tokenflow_cli.checkpoint import read_metadata, resolve_weights_path, save_weights
from tokenflow_cli.config import to_dict
from tokenflow_cli.data.text_tokenizer import add_special_tokens
from tokenflow_cli.device import dtype_of
from tokenflow_cli.fileio import file_sha256, replace_folder
from tokenflow_cli.hub import HubFolder, iter_shards, open_hub_folder
from tokenflow_cli.tokenizer.config import ModelConfig
from tokenflow_cli.tokenizer.convert import ConversionError, convert_checkpoint
from tokenflow_cli.understanding.config import LlavaModelConfig
from tokenflow_cli.understanding.embedded_tokenizer import (
    compare_tokenizers,
    require_same_tokenizer,
    stored_dtype,
    write_embedded,
)
from tokenflow_cli.understanding.model import FORMAT, LLAVA_JSON, PROJECTOR_NAME
from tokenflow_cli.understanding.official import (
    OFFICIAL_LLM_TYPES,
    QWEN_SYSTEM_PROMPT,
    QWEN_TEMPLATE,
    TOWER_COPY_PREFIX,
    ConversionPlan,
    embedded_code_dim,
    lm_config_dict,
    plan_conversion,
)
from tokenflow_cli.version import __version__

IMAGE_TOKENIZER_NAME = "image_tokenizer.safetensors"  # the tokenizer the model runs, inside the folder
GIVEN_TOKENIZER_NAME = "given_tokenizer.safetensors"  # an official .pt given, converted (kept when it overrides)
GENERATION_CONFIG = "generation_config.json"  # the release's generation defaults, copied as they are
OFFICIAL_TOKENIZER_SUFFIXES = (".pt", ".pth", ".ckpt")
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")  # the qwen_2_5 template needs both
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # cut to the tokenizer's ids (_official_rows)


@dataclass
class LlavaConversionReport:
    source: str
    out_dir: str
    model_type: str  # official config.json model_type
    llm_type: str  # the LM it becomes (qwen2)
    weights_format: str  # "safetensors" | "bin"
    shards_read: int
    shards_written: int
    dtype: str  # of the written LM and projector
    lm_keys: int
    projector_keys: int
    parameters: int  # elements written
    visual_tokens: str  # "27x27 = 729 of 40 channels"
    not_carried: dict[str, tuple[int, str]] = field(default_factory=dict)  # prefix -> (keys, reason)
    ids: dict[str, int] = field(default_factory=dict)  # token ids read from the files
    llava_config: dict[str, Any] = field(default_factory=dict)  # the official mm_* fields
    notes: list[str] = field(default_factory=list)
    image_tokenizer: str = ""  # where the features come from

    def summary_lines(self) -> list[str]:
        lines = [
            f"read {self.source}: {self.model_type} ({self.weights_format}, {self.shards_read} shards)",
            f"LM {self.llm_type}: {self.lm_keys} keys, projector: {self.projector_keys} keys, "
            f"{self.parameters:,} elements as {self.dtype} in {self.shards_written} shards",
            f"visual tokens: {self.visual_tokens}; template {QWEN_TEMPLATE}",
            f"image tokenizer: {self.image_tokenizer}",
        ]
        lines += [f"  not carried: {prefix}* ({n} keys): {why}" for prefix, (n, why) in self.not_carried.items()]
        lines.append("  ids: " + ", ".join(f"{name} {tid}" for name, tid in self.ids.items()))
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"wrote {self.out_dir}")
        return lines


def is_llava_folder(path: str | Path) -> bool:
    """A hub folder whose config.json names an official LLaVA model_type (`tokenflow convert`
    dispatches such folders here)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") in OFFICIAL_LLM_TYPES
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def convert_llava(
    src_dir: str | Path,
    tokenizer_checkpoint: str | Path | None,
    out_dir: str | Path,
    dtype: str | None = None,
    *,
    tokenizer_config: ModelConfig | None = None,
    override_tokenizer: bool = False,
) -> LlavaConversionReport:
    """See the module docstring. Raises ConversionError (one message listing every problem) or
    HubFolderError (an unreadable file, named); writes nothing then."""
    folder = open_hub_folder(src_dir)
    model_type = folder.config.get("model_type", "")
    if model_type not in OFFICIAL_LLM_TYPES:
        raise ConversionError(
            f"{folder.root / 'config.json'}: model_type {model_type!r} is not an official LLaVA model "
            f"(expected one of {sorted(OFFICIAL_LLM_TYPES)})"
        )
    out_dtype = _out_dtype(dtype)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        report = _convert_into(folder, tokenizer_checkpoint, tmp, out_dtype, tokenizer_config, override_tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, out_dir)
    report.out_dir = str(out_dir)
    return report


def _convert_into(
    folder: HubFolder,
    tokenizer_checkpoint: str | Path | None,
    tmp: Path,
    out_dtype: torch.dtype | None,
    tokenizer_config: ModelConfig | None,
    override: bool,
) -> LlavaConversionReport:
    lm_config, llava_fields = lm_config_dict(folder.config)
    given = _given_tokenizer(tokenizer_checkpoint, tmp, tokenizer_config) if tokenizer_checkpoint else None
    code_dim = embedded_code_dim(folder)
    if code_dim is None and given is None:
        raise ConversionError(f"{folder.root} holds no copy of its image tokenizer ({TOWER_COPY_PREFIX}*): "
                              "give the tokenizer it was trained with (--tokenizer tokenflow_siglip_32k.pt)")
    code_dim = code_dim if code_dim is not None else _tokenizer_geometry(given[0])[0]
    plan = plan_conversion(folder, lm_config, llava_fields, code_dim)
    ids = _text_tokenizer(folder, tmp, lm_config)
    rows, vocab_note = _official_rows(ids, lm_config)
    written, params, projector, tower = _copy_lm(folder, plan, tmp, out_dtype, rows)
    tokenizer_path, tokenizer_source, origin, notes = _choose_tokenizer(plan, tower, given, tmp, tokenizer_config,
                                                                       override)
    del tower
    code_dim, grid = _tokenizer_geometry(tokenizer_path)
    notes += vocab_note
    if (folder.root / GENERATION_CONFIG).is_file():
        shutil.copyfile(folder.root / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
    dtype = out_dtype or _stored_dtype(plan)
    config = _llava_config(tokenizer_source, projector, lm_config, dtype, llava_fields)
    info = {
        "format": FORMAT,
        "config": to_dict(config),
        "feature_dim": code_dim,
        "num_visual_tokens": grid * grid,
        "image_token_id": ids["<image>"],
        "tokenizer_source": tokenizer_source,  # relative: inside this folder
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "tokenizer_origin": origin,
        "converted_from": str(folder.root),
        "official_config": llava_fields,
        "tool_version": __version__,
    }
    save_weights(
        projector,
        tmp / PROJECTOR_NAME,
        info["config"],
        kind="llava-projector",
        extra={"feature_dim": str(code_dim), "num_visual_tokens": str(grid * grid)},
    )
    (tmp / LLAVA_JSON).write_text(json.dumps(info, indent=2))
    _write_lm_config(lm_config, tmp, dtype)
    return LlavaConversionReport(
        source=str(folder.root),
        out_dir=str(tmp),
        model_type=folder.config["model_type"],
        llm_type=lm_config["model_type"],
        weights_format=folder.format,
        shards_read=len(folder.shards),
        shards_written=written,
        dtype=str(dtype).removeprefix("torch."),
        lm_keys=len(plan.lm),
        projector_keys=len(projector),
        parameters=params,
        visual_tokens=f"{grid}x{grid} = {grid * grid} of {code_dim} channels (the image tokenizer's final scale)",
        not_carried=plan.not_carried,
        ids=ids,
        llava_config=llava_fields,
        notes=notes,
        image_tokenizer=origin,
    )


def _out_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None or dtype in ("", "keep", "auto"):
        return None
    try:
        return dtype_of(DTYPE_ALIASES.get(dtype, dtype))
    except ValueError as err:
        raise ConversionError(f"--dtype: {err}") from None


def _stored_dtype(plan: ConversionPlan) -> torch.dtype:
    floating = sorted(d for d in plan.stored_dtypes if d.startswith(("float", "bfloat")))
    return getattr(torch, floating[0]) if len(floating) == 1 else torch.float32


def _given_tokenizer(checkpoint: str | Path, out: Path, config: ModelConfig | None) -> tuple[Path, str]:
    """(weights file, its name) of the tokenizer given; an official `.pt` is converted into
    `out` first (`config`: its architecture when not a release variant)."""
    path = Path(checkpoint)
    if path.suffix in OFFICIAL_TOKENIZER_SUFFIXES:
        convert_checkpoint(path, out / GIVEN_TOKENIZER_NAME, config=config)
        return out / GIVEN_TOKENIZER_NAME, path.name
    try:
        path = resolve_weights_path(path).resolve()
    except FileNotFoundError as err:
        raise ConversionError(f"image tokenizer: {err} (or give the official tokenflow_siglip_32k.pt)") from None
    return path, str(path)


def _choose_tokenizer(
    plan: ConversionPlan,
    tower: dict[str, torch.Tensor],
    given: tuple[Path, str] | None,
    out: Path,
    config: ModelConfig | None,
    override: bool,
) -> tuple[Path, str, str, list[str]]:
    """(weights file, how llava.json names it, where it came from, notes): the embedded copy,
    measured against the tokenizer given; the given one when the folder has no copy or when
    `override` says so."""
    if not tower:
        assert given is not None
        source = GIVEN_TOKENIZER_NAME if given[0].parent == out else str(given[0])
        return given[0], source, f"given: {given[1]} (the folder holds no copy)", []
    dtype = stored_dtype(plan.tokenizer_dtypes)
    report = write_embedded(tower, out / IMAGE_TOKENIZER_NAME, dtype, config)
    origin = f"the embedded copy ({len(tower)} keys, {report.variant}, {dtype})"
    notes = [f"embedded tokenizer: {note}" for note in report.notes]
    if given is None:
        return out / IMAGE_TOKENIZER_NAME, IMAGE_TOKENIZER_NAME, origin, notes
    difference = compare_tokenizers(out / IMAGE_TOKENIZER_NAME, given[0])
    notes.append(f"embedded copy vs {given[1]}: {difference.line()}")
    if not override:
        require_same_tokenizer(difference, given[0])
        if given[0].parent == out:
            given[0].unlink()
        return out / IMAGE_TOKENIZER_NAME, IMAGE_TOKENIZER_NAME, origin, notes
    notes.append(f"WARNING: features come from {given[1]}, not the embedded copy the official loader runs")
    source = GIVEN_TOKENIZER_NAME if given[0].parent == out else str(given[0])
    return given[0], source, f"given: {given[1]} (overrides {origin})", notes


def _tokenizer_geometry(path: Path) -> tuple[int, int]:
    """(code dim, final grid side) from our tokenizer checkpoint's metadata (no weights read)."""
    meta = read_metadata(path)
    if meta.get("format") != "tokenflow-cli/tokenizer" or "config" not in meta:
        raise ConversionError(f"{path} is not a tokenflow-cli tokenizer checkpoint (format {meta.get('format')!r})")
    quantizer = meta["config"]["quantizer"]
    return int(quantizer["semantic_dim"]) + int(quantizer["pixel_dim"]), int(quantizer["scales"][-1])


def _official_rows(ids: dict[str, int], lm_config: dict) -> tuple[int, list[str]]:
    """The vocabulary the official loader runs: `load_pretrained_model` calls
    `resize_token_embeddings(len(tokenizer))` (builder.py:177), cutting the padded rows of the
    embeddings and `lm_head` (152064 -> the tokenizer's 151665 ids for Qwen2.5), so no padded id
    is ever generated. `lm_config` is updated."""
    rows, stored = ids["<image>"], int(lm_config["vocab_size"])  # `<image>` is added after the saved ids
    if rows >= stored:
        return stored, []
    lm_config["vocab_size"] = ids["embedding_rows"] = rows
    return rows, [f"vocabulary cut from {stored} to the tokenizer's {rows} ids, as the official loader does"]


def _copy_lm(
    folder: HubFolder, plan: ConversionPlan, out: Path, dtype: torch.dtype | None, rows: int
) -> tuple[int, int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write the LM shard by shard (transformers' sharded layout), its embeddings and `lm_head`
    cut to `rows`; returns (shards written, elements written, the projector state, the embedded
    tokenizer under its own names, in its stored dtype)."""
    lm_shards = [
        s for s in folder.shards if folder.weight_map is None or any(folder.weight_map[k] == s.name for k in plan.lm)
    ]
    total = len(lm_shards)
    weight_map: dict[str, str] = {}
    projector: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    size = params = written = 0
    for _, tensors in iter_shards(folder):
        part: dict[str, torch.Tensor] = {}
        for key, tensor in tensors:
            if key in plan.tokenizer:
                tower[plan.tokenizer[key]] = tensor.clone()
                continue
            target = plan.lm.get(key)
            if target is None and key not in plan.projector:
                continue
            tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            if target in VOCAB_ROWS:
                tensor = tensor[:rows]
            if target is None:
                projector[plan.projector[key]] = tensor.clone()
                continue
            part[target] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
            params += tensor.numel()
        if not part:
            continue
        written += 1
        name = f"model-{written:05d}-of-{total:05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return written, params + sum(t.numel() for t in projector.values()), projector, tower


def _text_tokenizer(folder: HubFolder, out: Path, lm_config: dict) -> dict[str, int]:
    """Save the LM's tokenizer with `<image>` added (LLaVA adds it at training time only);
    returns the ids the model depends on."""
    if not folder.tokenizer_files:
        raise ConversionError(f"{folder.root} holds no tokenizer files (tokenizer.json, vocab.json + merges.txt, ...)")
    vocab_rows = int(lm_config["vocab_size"])
    config = AutoConfig.for_model(**lm_config)  # not config.json: its model_type is not the LM's
    tokenizer = AutoTokenizer.from_pretrained(folder.root, config=config, local_files_only=True)
    ids = {}
    for token in CHATML_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(tid, int) or tid == tokenizer.unk_token_id:
            raise ConversionError(f"{folder.root}: the tokenizer has no {token} (the qwen_2_5 template needs it)")
        ids[token] = tid
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_special_tokens(tokenizer, ["<image>"])
    ids.update({"<image>": tokenizer.convert_tokens_to_ids("<image>"), "eos": tokenizer.eos_token_id})
    ids.update({"pad": tokenizer.pad_token_id, "tokenizer_size": len(tokenizer), "embedding_rows": vocab_rows})
    if max(ids[t] for t in CHATML_TOKENS) >= vocab_rows:
        raise ConversionError(f"{folder.root}: tokenizer ids beyond the {vocab_rows} embedding rows of config.json")
    tokenizer.save_pretrained(out)
    return ids


def _llava_config(
    tokenizer_source: str, projector: dict, lm_config: dict, dtype: torch.dtype, fields: dict
) -> LlavaModelConfig:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return LlavaModelConfig(
        features="tokenflow",
        tokenizer=tokenizer_source,
        projector_hidden=int(projector["0.weight"].shape[0]),
        chat_template=QWEN_TEMPLATE,
        system_prompt=QWEN_SYSTEM_PROMPT,
        max_length=int(fields.get("tokenizer_model_max_length") or lm_config.get("max_position_embeddings", 2048)),
        llm_dtype=names.get(dtype, "fp32"),
    )


def _write_lm_config(lm_config: dict, out: Path, dtype: torch.dtype) -> None:
    config = AutoConfig.for_model(**lm_config)
    config.dtype = dtype
    config.save_pretrained(out)


