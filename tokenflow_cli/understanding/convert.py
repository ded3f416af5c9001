"""The released official LLaVA folder -> our understanding model folder, streamed shard by shard.

    convert_llava(src_dir, tokenizer_checkpoint, out_dir, dtype=None) -> LlavaConversionReport
    is_llava_folder(path) -> bool          # config.json names an official LLaVA model_type

`src_dir` is the hub folder as downloaded (`ByteFlow-AI/Tokenflow-llava-qwen2.5-14B-finetuning`:
config.json, `model-*.safetensors` + index or `pytorch_model-*.bin` + index, tokenizer files);
`tokenizer_checkpoint` our converted image tokenizer (a `.safetensors` file or run folder, from
`tokenflow convert tokenflow_siglip_32k.pt`); `dtype` None keeps the stored dtype (bf16 for the
release), else "fp32" | "bf16" | "fp16" (or "float32" | "bfloat16" | "float16").
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
from safetensors.torch import safe_open, save_file
from transformers import AutoConfig, AutoTokenizer

from tokenflow_cli import __version__
from tokenflow_cli.checkpoint import read_metadata, resolve_weights_path, save_weights
from tokenflow_cli.config import to_dict
from tokenflow_cli.data.text_tokenizer import add_special_tokens
from tokenflow_cli.device import dtype_of
from tokenflow_cli.fileio import file_sha256, replace_folder
from tokenflow_cli.hub import HubFolder, iter_shards, open_hub_folder, read_tensor
from tokenflow_cli.tokenizer.convert import ConversionError, convert_checkpoint
from tokenflow_cli.understanding.config import LlavaModelConfig
from tokenflow_cli.understanding.model import FORMAT, LLAVA_JSON, PROJECTOR_NAME
from tokenflow_cli.understanding.official import (
    OFFICIAL_LLM_TYPES,
    QWEN_SYSTEM_PROMPT,
    QWEN_TEMPLATE,
    TOWER_COPY_PREFIX,
    ConversionPlan,
    lm_config_dict,
    plan_conversion,
)

IMAGE_TOKENIZER_NAME = "image_tokenizer.safetensors"  # an official .pt given, converted into the folder
OFFICIAL_TOKENIZER_SUFFIXES = (".pt", ".pth", ".ckpt")
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")  # the qwen_2_5 template needs both
# the folder's tokenizer copy -> our tokenizer's codebooks, compared to catch a wrong tokenizer
CODEBOOK_PAIRS = {
    TOWER_COPY_PREFIX + "quantize.embedding_vqkd.weight": "quantizer.semantic_codebook.weight",
    TOWER_COPY_PREFIX + "quantize.embedding_vqgan.weight": "quantizer.pixel_codebook.weight",
}


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

    def summary_lines(self) -> list[str]:
        lines = [
            f"read {self.source}: {self.model_type} ({self.weights_format}, {self.shards_read} shards)",
            f"LM {self.llm_type}: {self.lm_keys} keys, projector: {self.projector_keys} keys, "
            f"{self.parameters:,} elements as {self.dtype} in {self.shards_written} shards",
            f"visual tokens: {self.visual_tokens}; template {QWEN_TEMPLATE}",
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
    src_dir: str | Path, tokenizer_checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None
) -> LlavaConversionReport:
    """See the module docstring. Raises ConversionError (one message listing every problem) or
    HubFolderError (an unreadable file, named); writes nothing then. An official tokenizer
    `.pt` is converted into the folder (`image_tokenizer.safetensors`) first."""
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
        report = _convert_into(folder, tokenizer_checkpoint, tmp, out_dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, out_dir)
    report.out_dir = str(out_dir)
    return report


def _convert_into(
    folder: HubFolder, tokenizer_checkpoint: str | Path, tmp: Path, out_dtype: torch.dtype | None
) -> LlavaConversionReport:
    lm_config, llava_fields = lm_config_dict(folder.config)
    tokenizer_path, tokenizer_source = _image_tokenizer(tokenizer_checkpoint, tmp)
    code_dim, grid = _tokenizer_geometry(tokenizer_path)
    plan = plan_conversion(folder, lm_config, llava_fields, code_dim)
    notes = [_compare_codebooks(folder, tokenizer_path)]
    written, params, projector = _copy_lm(folder, plan, tmp, out_dtype)
    ids = _text_tokenizer(folder, tmp, lm_config)
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
        notes=[n for n in notes if n],
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


def _image_tokenizer(checkpoint: str | Path, out: Path) -> tuple[Path, str]:
    """(weights file, how llava.json names it) of our image tokenizer; an official `.pt` is
    converted into `out` first (then named relative to the folder)."""
    path = Path(checkpoint)
    if path.suffix in OFFICIAL_TOKENIZER_SUFFIXES:
        convert_checkpoint(path, out / IMAGE_TOKENIZER_NAME)
        return out / IMAGE_TOKENIZER_NAME, IMAGE_TOKENIZER_NAME
    try:
        path = resolve_weights_path(path).resolve()
    except FileNotFoundError as err:
        raise ConversionError(f"image tokenizer: {err} (or give the official tokenflow_siglip_32k.pt)") from None
    return path, str(path)


def _tokenizer_geometry(path: Path) -> tuple[int, int]:
    """(code dim, final grid side) from our tokenizer checkpoint's metadata (no weights read)."""
    meta = read_metadata(path)
    if meta.get("format") != "tokenflow-cli/tokenizer" or "config" not in meta:
        raise ConversionError(f"{path} is not a tokenflow-cli tokenizer checkpoint (format {meta.get('format')!r})")
    quantizer = meta["config"]["quantizer"]
    return int(quantizer["semantic_dim"]) + int(quantizer["pixel_dim"]), int(quantizer["scales"][-1])


def _compare_codebooks(folder: HubFolder, tokenizer_path: Path) -> str:
    """Check that the folder's frozen tokenizer copy has the codebooks of the tokenizer given."""
    worst = 0.0
    with safe_open(str(tokenizer_path), framework="pt") as ours_fh:
        for their_key, our_key in CODEBOOK_PAIRS.items():
            theirs = read_tensor(folder, their_key)
            if theirs is None:
                return "the folder holds no copy of the image tokenizer's codebooks to check the given one against"
            ours = ours_fh.get_tensor(our_key).float()
            if ours.shape != theirs.shape:
                raise ConversionError(
                    f"{tokenizer_path}: codebook {list(ours.shape)} but the LLaVA folder's tokenizer copy has "
                    f"{their_key} {list(theirs.shape)}: give the image tokenizer this model was trained with"
                )
            # relative to each entry: the copy may be stored in bf16 (2^-9 relative rounding)
            relative = (ours - theirs.float()).abs() / (ours.abs() + 1e-3)
            worst = max(worst, float(relative.max()))
    if worst > 1e-2:
        raise ConversionError(
            f"{tokenizer_path}: its codebooks differ from the LLaVA folder's tokenizer copy by up to {worst:.3g} "
            "(relative): give the image tokenizer this model was trained with"
        )
    return f"image tokenizer codebooks match the folder's copy (max relative difference {worst:.2g})"


def _copy_lm(
    folder: HubFolder, plan: ConversionPlan, out: Path, dtype: torch.dtype | None
) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Write the LM shard by shard (transformers' sharded layout); returns (shards written,
    elements written, the projector state)."""
    lm_shards = [
        s for s in folder.shards if folder.weight_map is None or any(folder.weight_map[k] == s.name for k in plan.lm)
    ]
    total = len(lm_shards)
    weight_map: dict[str, str] = {}
    projector: dict[str, torch.Tensor] = {}
    size = params = written = 0
    for _, tensors in iter_shards(folder):
        part: dict[str, torch.Tensor] = {}
        for key, tensor in tensors:
            target = plan.lm.get(key)
            if target is None and key not in plan.projector:
                continue
            tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
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
    return written, params + sum(t.numel() for t in projector.values()), projector


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


