"""What `generate` writes and reads: numbered PNGs, a grid and settings.json per run; prompt files."""

from __future__ import annotations

import json
from pathlib import Path

from tokenflow_cli.eval.visual import save_png, tile
from tokenflow_cli.fileio import atomic_write_text
from tokenflow_cli.generation.text_to_image import GenerationResult, GenerationSettings


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def write_outputs(out_dir: str | Path, result: GenerationResult, settings: GenerationSettings,
                  extra: dict | None = None) -> list[Path]:
    """PNGs (00000.png, ...), grid.png (one row per prompt, up to 16) and settings.json."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(result.images):
        save_png(img, out_dir / image_name(i))
        written.append(out_dir / image_name(i))
    per_row = settings.samples_per_prompt
    ncols = per_row if per_row > 1 else 8  # one row per prompt when there are several samples
    save_png(tile(result.images[: 16 * ncols], ncols=ncols), out_dir / "grid.png")
    record = {**settings.to_json(), **(extra or {}), "seconds": round(result.seconds, 3),
              "images": [{"file": image_name(i), "prompt": p} for i, p in enumerate(result.prompts)]}
    atomic_write_text(out_dir / "settings.json", json.dumps(record, indent=2))
    return [*written, out_dir / "grid.png", out_dir / "settings.json"]
