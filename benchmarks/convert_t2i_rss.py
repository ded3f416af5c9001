"""Peak memory of `tokenflow convert` on a full-size TokenFlow-t2i folder (7.03B parameters,
the 361 keys and shapes of tests/data/tokenflow_t2i_llama2_7b_keys.tsv, bf16).

The folder is fabricated without holding the model anywhere: each safetensors shard is a header
plus a sparse file of zeros (`truncate`), so fabricating costs neither RAM nor disk; reading it
pages the zeros in like real data. The text tokenizer is a word-level tokenizer.json with the
official ids (32000 text ids, `[PAD]` 32000, `<vq_token_i>` 32001 + i, `<img>` -> 3 text ids); the
image tokenizer is the tiny recipe with the clipb-256 code space (9 scales, K 32768, 40 dims):
the converter reads only its code space. The conversion runs as a child process; its peak RSS
(getrusage) is the figure. Everything is deleted afterwards (the output is ~13.5 GB).

    python benchmarks/convert_t2i_rss.py [--format safetensors|bin] [--dir /tmp/t2i-rss] [--shard-gb 10]
                                         [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tokenflow_cli.checkpoint import WEIGHTS_NAME, save_model
from tokenflow_cli.config import load_recipe
from tokenflow_cli.generation.safetensors_stream import SAFETENSORS_DTYPE_NAMES
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import build_tokenizer

H, LAYERS, FFN, HEAD_DIM, TEXT, K, TOKENS, LEVELS = 4096, 32, 11008, 128, 32000, 32768, 817, 10
VOCAB = TEXT + 1 + K


def official_keys() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    bf16 = torch.bfloat16
    shapes = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,), "lm_head.weight": (VOCAB, H),
              "model.pos_1LC": (TOKENS, H), "model.lvl_embed.weight": (LEVELS, H),
              "model.mm_projector.0.weight": (H, 40), "model.mm_projector.0.bias": (H,),
              "model.mm_projector.2.weight": (H, H), "model.mm_projector.2.bias": (H,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"}
        shapes |= {p + f"self_attn.qknorm.{n}_norm.weight": (HEAD_DIM,) for n in ("query", "key")}
        shapes |= {p + "mlp.gate_proj.weight": (FFN, H), p + "mlp.up_proj.weight": (FFN, H),
                   p + "mlp.down_proj.weight": (H, FFN), p + "input_layernorm.weight": (H,),
                   p + "post_attention_layernorm.weight": (H,)}
    keys = {name: (shape, bf16) for name, shape in shapes.items()}
    return keys | {"model.image_token_start": ((), torch.int64), "model.image_token_end": ((), torch.int64)}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _sparse_shard(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], ints: dict[str, int]) -> None:
    """A safetensors file whose data is a hole of zeros, except the int buffers' values."""
    header, offset, places = {"__metadata__": {"format": "pt"}}, 0, {}
    for name, (shape, dtype) in specs.items():
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        places[name] = offset
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        fh.truncate(8 + len(blob) + offset)
        for name, value in ints.items():
            if name in places:
                fh.seek(8 + len(blob) + places[name])
                fh.write(int(value).to_bytes(8, "little", signed=True))


def _bin_shard(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], ints: dict[str, int]) -> None:
    """A torch.save shard whose tensors are views of one memory-mapped sparse file of zeros
    (torch.save streams it to disk page by page; nothing is held in anonymous memory)."""
    floats = {n: s for n, (s, d) in specs.items() if d == torch.bfloat16}
    total = sum(torch.Size(s).numel() for s in floats.values())
    backing = path.with_suffix(".zeros")
    with open(backing, "wb") as fh:
        fh.truncate(total * 2)
    flat = torch.from_file(str(backing), shared=True, size=total, dtype=torch.bfloat16)
    state, offset = {}, 0
    for name, shape in floats.items():
        n = torch.Size(shape).numel()
        state[name] = flat[offset : offset + n].view(shape)
        offset += n
    state |= {n: torch.tensor(v) for n, v in ints.items() if n in specs}
    torch.save(state, path)
    del state, flat
    backing.unlink()


def fabricate(root: Path, shard_bytes: int, fmt: str = "safetensors") -> Path:
    hub = root / "TokenFlow-t2i"
    hub.mkdir(parents=True)
    keys, shards, current, size = official_keys(), [], {}, 0
    for name, spec in keys.items():
        if current and size + _nbytes(*spec) > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = spec
        size += _nbytes(*spec)
    shards.append(current)
    weight_map = {}
    ints = {"model.image_token_start": TEXT + 1, "model.image_token_end": VOCAB - 1}
    for i, part in enumerate(shards):
        if fmt == "safetensors":
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _sparse_shard(hub / file, part, ints)
        else:
            file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            _bin_shard(hub / file, part, ints)
        weight_map |= dict.fromkeys(part, file)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (hub / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llava_llama", "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": 32,
              "num_key_value_heads": 32, "intermediate_size": FFN, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "vocab_size": VOCAB, "torch_dtype": "bfloat16", "mm_hidden_size": 40}
    (hub / "config.json").write_text(json.dumps(config))
    named = {0: "<unk>", 1: "<s>", 2: "</s>", 100: "<", 101: "img", 102: ">"}  # `<img>` -> 3 text ids
    vocab = {named.get(i, f"t{i}"): i for i in range(TEXT)} | {"[PAD]": TEXT}
    vocab |= {f"<vq_token_{i}>": TEXT + 1 + i for i in range(K)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hub / "tokenizer.json"))
    (hub / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "[PAD]"}))
    return hub


def image_tokenizer(root: Path) -> Path:
    recipe = load_recipe("tiny", TokenizerRecipe, ["model.quantizer.scales=[1,2,4,6,8,10,12,14,16]",
                                                   f"model.quantizer.codebook_size={K}"])
    tok = build_tokenizer(recipe.model)
    save_model(tok, root / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    return root / "tok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/t2i-rss"))
    parser.add_argument("--shard-gb", type=float, default=10.0, help="shard size (Llama-2-7b-hf: 10 GB)")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                        help="bin: torch.save shards (written to disk for real: about 13 GB more)")
    parser.add_argument("--keep", action="store_true", help="keep the fabricated folder and the output")
    parser.add_argument("--json", type=Path, default=None,
                        help="default benchmarks/results/convert_t2i_rss_FORMAT.json")
    args = parser.parse_args()
    if args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    try:
        hub = fabricate(args.dir, int(args.shard_gb * 1e9), args.format)
        tok = image_tokenizer(args.dir)
        out = args.dir / "converted"
        shards = sorted(hub.glob("*.safetensors" if args.format == "safetensors" else "*.bin"))
        print(f"fabricated {hub}: {len(shards)} shards, {sum(p.stat().st_size for p in shards) / 2**30:.2f} GiB "
              f"({sum(p.stat().st_blocks for p in shards) * 512 / 2**20:.1f} MiB on disk)", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "tokenflow_cli", "convert", str(hub), "--tokenizer", str(tok),
                               "-o", str(out)], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        if proc.returncode != 0:
            raise SystemExit(f"convert failed ({proc.returncode})")
        written = (out / WEIGHTS_NAME).stat().st_size / 2**30
        parameters = sum(torch.Size(s).numel() for s, _ in official_keys().values())
        row = {"format": args.format, "parameters": parameters, "shards": len(shards),
               "shard_gb": args.shard_gb, "input_gib": sum(p.stat().st_size for p in shards) / 2**30,
               "output_gib": written, "peak_rss_gib": round(peak_gib, 2), "seconds": round(seconds, 1)}
        print(f"peak RSS {peak_gib:.2f} GiB converting {row['parameters'] / 1e9:.2f}B parameters "
              f"({row['input_gib']:.2f} GiB in {len(shards)} shards -> {written:.2f} GiB) in {seconds:.0f} s")
        out_json = args.json or Path(f"benchmarks/results/convert_t2i_rss_{args.format}.json")
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(row, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
