"""Training data of the text-to-image generator: image codes paired with captions.

Codes come from a codes file written by `tokenflow tokenize` (images encoded once), or from an
image folder encoded here once at start-up. Captions come from a .jsonl with "image" plus one or
more text fields (`data.caption_fields`); a record's image path is relative to the .jsonl and
is matched to the codes file's paths by resolved path, else by file name.

Each item draws, under the loop's per-item seed, one of its caption fields and, with
probability `caption_dropout`, replaces it by "" or one of `negative_prompts` (the
unconditional branch of classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenflow_cli.data.captions import read_jsonl
from tokenflow_cli.data.images import list_images
from tokenflow_cli.generation.config import GeneratorDataConfig
from tokenflow_cli.generation.model import TextBatch
from tokenflow_cli.tokenizer.codes import list_codes_files, read_codes
from tokenflow_cli.tokenizer.encode import encode_images


def read_caption_table(path: str | Path, fields: tuple[str, ...]) -> dict[Path, list[str]]:
    """Resolved image path -> its captions (one per field present)."""
    base = Path(path).parent
    table: dict[Path, list[str]] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        texts = [str(record[f]) for f in fields if record.get(f)]
        if "image" not in record or not texts:
            raise ValueError(f"{path}: record {number} needs \"image\" and one of {list(fields)}")
        table[(base / record["image"]).resolve()] = texts
    return table


def match_captions(paths: list[str], table: dict[Path, list[str]]) -> tuple[list[int], list[list[str]]]:
    """Rows of `paths` that have captions, and those captions (by resolved path, else by name
    when the name is unique among the captioned images)."""
    by_name: dict[str, list[Path]] = {}
    for key in table:
        by_name.setdefault(key.name, []).append(key)
    rows, captions = [], []
    for row, raw in enumerate(paths):
        path = Path(raw).resolve()
        key = path if path in table else None
        if key is None and len(by_name.get(path.name, [])) == 1:
            key = by_name[path.name][0]
        if key is not None:
            rows.append(row)
            captions.append(table[key])
    return rows, captions


class CaptionedCodes(torch.utils.data.Dataset):
    """Items {"codes": (L,) int64, "caption": str}."""

    def __init__(self, codes_NL: np.ndarray, captions: list[list[str]], caption_dropout: float = 0.0,
                 negative_prompts: tuple[str, ...] = ()) -> None:
        if len(codes_NL) != len(captions):
            raise ValueError(f"{len(codes_NL)} code rows but {len(captions)} caption lists")
        self.codes_NL = codes_NL
        self.captions = captions
        self.caption_dropout = caption_dropout
        self.negative_prompts = negative_prompts

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        options = self.captions[index]
        caption = options[int(torch.randint(len(options), ()))]
        if self.caption_dropout > 0 and float(torch.rand(())) < self.caption_dropout:
            negatives = self.negative_prompts
            caption = negatives[int(torch.randint(len(negatives), ()))] if negatives else ""
        return {"codes": torch.from_numpy(self.codes_NL[index].astype(np.int64)), "caption": caption}


def make_collate(encode: Callable[[list[str]], TextBatch]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Batch items: stacked codes (B, L) and the captions as a left-padded TextBatch."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [item["caption"] for item in items]
        return {"codes": torch.stack([item["codes"] for item in items]), "text": encode(captions),
                "caption": captions}

    return collate


def load_training_codes(data: GeneratorDataConfig, tokenizer=None, batch_size: int = 32,
                        ) -> tuple[np.ndarray, list[list[str]], dict[str, Any]]:
    """(codes (N, L), captions per row, info) from `data.codes` or, failing that, `data.images`
    encoded with `tokenizer`. Raises ValueError when nothing pairs up."""
    if not data.captions:
        raise ValueError("data.captions is required: a .jsonl with \"image\" and caption fields")
    table = read_caption_table(data.captions, data.caption_fields)
    metas = []
    if data.codes:
        files = [read_codes(p) for p in codes_files(data.codes)]
        metas = [f.meta for f in files]
        if len({m.get("tokenizer_sha256") for m in metas}) > 1:
            raise ValueError(f"the shards of {data.codes} were made by different tokenizers")
        codes = np.concatenate([f.indices for f in files])
        paths = [str(p) for f in files for p in f.image_paths()]
        scales = files[0].scales
        source = f"codes {data.codes}"
    elif data.images:
        batches = list(encode_images(tokenizer, list_images(data.images), batch_size, strict=True))
        codes, paths = np.concatenate([b.indices for b in batches]), [key for b in batches for key in b.keys]
        scales = tuple(tokenizer.scales)
        source = f"images {data.images} (encoded at start-up)"
    else:
        raise ValueError("set data.codes (from `tokenflow tokenize`) or data.images")
    rows, captions = match_captions(paths, table)
    if not rows:
        raise ValueError(f"no {source} row matches an image of {data.captions}")
    info = {"source": source, "rows": len(rows), "unmatched": len(paths) - len(rows), "scales": tuple(scales),
            "codes_meta": metas[0] if metas else None}
    return codes[rows], captions, info


def codes_files(codes: str | Path) -> list[Path]:
    """`data.codes`: one codes file, a sharded codes folder, or the base name of torchrun shards."""
    try:
        return list_codes_files(codes)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.codes: {err}") from None
