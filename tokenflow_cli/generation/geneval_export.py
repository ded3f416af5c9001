"""Images for GenEval's own evaluator (github.com/djghosh13/geneval), from its prompt file.

Input: the official `prompts/evaluation_metadata.jsonl` (553 prompts), one JSON object a line:
{"tag": ..., "include": [{"class", "count", ["color"], ["position": [relation, index]]}],
["exclude": [...]], "prompt": ...}. Output, the layout `evaluation/evaluate_images.py` reads:

    OUT/<index:05d>/metadata.jsonl    that prompt's line (the evaluator `json.load`s it)
    OUT/<index:05d>/samples/<j:04d>.png   samples_per_prompt images (GenEval: 4)
    OUT/<index:05d>/grid.png          the samples side by side (optional in GenEval's layout)
    OUT/settings.json                 model, sampler settings, seeds, the metadata file's sha256

The evaluator lists OUT, keeps folders whose name is all digits, and reads every
`samples/<digits>.png`; settings.json sits beside and is ignored by it.

Prompts are generated in groups of `batch_size // samples_per_prompt` prompts (one forward
pass), group g from its own torch.Generator seeded with `seed + g`: a prompt's images depend on
the settings only, not on how many ranks share the work (groups are dealt round robin) or on
where an earlier run stopped (a prompt folder is done when its metadata and every sample exist).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tokenflow_cli.errors import UserError
from tokenflow_cli.eval.visual import save_png, tile
from tokenflow_cli.fileio import atomic_write_text, file_sha256
from tokenflow_cli.generation.text_to_image import GenerationSettings, TextToImage, generate_images

SETTINGS = "settings.json"
SEED_RULE = "prompt group g (batch_size // samples_per_prompt prompts, in file order) uses seed + g"


class GenevalExportMismatch(UserError, ValueError):
    """The output folder holds a GenEval export made with other settings."""


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """The prompt lines of a GenEval metadata file, each checked for GenEval's required fields."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        problems = [f for f, kind in (("tag", str), ("prompt", str), ("include", list))
                    if not isinstance(record.get(f) if isinstance(record, dict) else None, kind)]
        if problems:
            raise ValueError(f"{path}:{number}: a GenEval line needs {', '.join(problems)} "
                             '({"tag": str, "include": [...], "prompt": str})')
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def prompt_folder(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{index:05d}"


def sample_path(out_dir: Path, index: int, sample: int) -> Path:
    return prompt_folder(out_dir, index) / "samples" / f"{sample:04d}.png"


def _done(out_dir: Path, index: int, metadata: dict, samples: int) -> bool:
    meta = prompt_folder(out_dir, index) / "metadata.jsonl"
    if not meta.is_file() or json.loads(meta.read_text()) != metadata:
        return False
    return all(sample_path(out_dir, index, j).is_file() for j in range(samples))


def export_record(pipe: TextToImage, metadata_path: Path, n_prompts: int, settings: GenerationSettings) -> dict:
    """What settings.json says; a resumed run must say the same."""
    return {"geneval_metadata": str(metadata_path), "metadata_sha256": file_sha256(metadata_path),
            "prompts": n_prompts, "samples_per_prompt": settings.samples_per_prompt,
            "prompts_per_group": prompts_per_group(settings), "seed_rule": SEED_RULE,
            "model": pipe.source, "tokenizer": pipe.tokenizer_source, "random_init": pipe.random_init,
            "dtype": str(pipe.dtype).removeprefix("torch."), "settings": settings.to_json()}


def open_export(out_dir: Path, record: dict) -> bool:
    """Write settings.json, or check an earlier one: True when resuming."""
    path = Path(out_dir) / SETTINGS
    if path.is_file():
        found = json.loads(path.read_text())
        if found != record:
            differ = sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))
            raise GenevalExportMismatch(f"{out_dir} holds a GenEval export with other settings ({', '.join(differ)} "
                                        "differ): use another --output")
        return True
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))
    return False


def prompts_per_group(settings: GenerationSettings) -> int:
    return max(1, settings.batch_size // settings.samples_per_prompt)


@dataclass
class GenevalExport:
    out_dir: Path
    prompts: int
    samples_per_prompt: int
    generated: int  # prompts generated by this rank in this run
    reused: int  # prompts of this rank found complete
    seconds: float


def export_geneval(pipe: TextToImage, metadata: list[dict], out_dir: str | Path, settings: GenerationSettings,
                   grid: bool = True, rank: int = 0, world_size: int = 1,
                   progress: Callable[[int], None] | None = None) -> GenevalExport:
    """This rank's share of the prompt groups, skipping prompts already complete."""
    out_dir, started = Path(out_dir), time.perf_counter()
    n, size = settings.samples_per_prompt, prompts_per_group(settings)
    generated = reused = 0
    for group, first in enumerate(range(0, len(metadata), size)):
        if group % world_size != rank:
            continue
        members = list(range(first, min(first + size, len(metadata))))
        if all(_done(out_dir, i, metadata[i], n) for i in members):
            reused += len(members)
            if progress:
                progress(len(members) * n)
            continue
        group_settings = dataclasses.replace(settings, seed=settings.seed + group)
        result = generate_images(pipe, [metadata[i]["prompt"] for i in members], group_settings, progress)
        for k, i in enumerate(members):
            images = result.images[k * n : (k + 1) * n]
            for j, image in enumerate(images):
                save_png(image, sample_path(out_dir, i, j))
            if grid:
                save_png(tile(images, ncols=n), prompt_folder(out_dir, i) / "grid.png")
            atomic_write_text(prompt_folder(out_dir, i) / "metadata.jsonl", json.dumps(metadata[i]) + "\n")
        generated += len(members)
    return GenevalExport(out_dir, len(metadata), n, generated, reused, time.perf_counter() - started)


def check_geneval_layout(out_dir: str | Path, metadata: list[dict], samples_per_prompt: int) -> dict:
    """Read OUT as GenEval's `evaluate_images.py` does (digit-named folders, `json.load` of
    metadata.jsonl, `samples/<digits>.png`) and list what differs from the prompt file."""
    out_dir = Path(out_dir)
    problems, images, seen = [], 0, set()
    for sub in sorted(os.listdir(out_dir)):
        folder = out_dir / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        index = int(sub)
        seen.add(index)
        if sub != f"{index:05d}" or index >= len(metadata):
            problems.append(f"{sub}: not a prompt index of the metadata file")
            continue
        with open(folder / "metadata.jsonl") as fh:
            if json.load(fh) != metadata[index]:
                problems.append(f"{sub}/metadata.jsonl differs from line {index + 1} of the metadata file")
        names = [f for f in os.listdir(folder / "samples")
                 if (folder / "samples" / f).is_file() and re.match(r"\d+\.png", f)]
        if len(names) != samples_per_prompt:
            problems.append(f"{sub}: {len(names)} samples, expected {samples_per_prompt}")
        for name in names:
            with Image.open(folder / "samples" / name) as img:
                if img.mode != "RGB" or np.asarray(img).ndim != 3:
                    problems.append(f"{sub}/samples/{name}: not an RGB image")
        images += len(names)
    missing = sorted(set(range(len(metadata))) - seen)
    if missing:
        problems.append(f"{len(missing)} prompts have no folder (first: {missing[0]:05d})")
    return {"prompts": len(seen), "images": images, "problems": problems}
