"""A deterministic synthetic world of coloured shapes, for offline training and evaluation.

`render_shapes_world(out_dir, n, seed)` writes

    images/000000.png ...   RGB PNGs, size x size
    captions.jsonl          {"image", "caption", "prompt"}  (full description; GenEval-style prompt)
    vqa.jsonl               {"image", "question", "answer", "type"}
    geneval.jsonl           GenEval metadata {"tag", "include", ["exclude"], "prompt"} plus
                            {"image", "background", "noisy", "objects": [{"shape", "color",
                            "size", "position", "bbox": [x0, y0, x1, y1], "center": [x, y]}]}
    llava.json              (optional) the VQA pairs as LLaVA conversations

Image i depends only on (seed, i), so different seeds give held-out sets and a larger n
extends a smaller one. `geneval_prompts` gives prompts + metadata without images for
generation eval, and `detect_shapes` scores generated images against them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tokenflow_cli.data.captions import export_llava, write_jsonl
from tokenflow_cli.data.shapes_detect import detect_shapes
from tokenflow_cli.data.shapes_scene import (
    BACKGROUNDS,
    COLORS,
    NOISE_STD,
    SHAPES,
    SIZES,
    TAGS,
    Scene,
    ShapeObject,
    position_name,
    sample_objects_for_tag,
    sample_scene,
)
from tokenflow_cli.data.shapes_text import caption, geneval_metadata, vqa_pairs

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "SIZES",
    "TAGS",
    "ShapesWorldSummary",
    "detect_shapes",
    "export_llava",
    "geneval_prompts",
    "object_outline",
    "render_scene",
    "render_shapes_world",
]

SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges, exact area coverage
STAR_INNER_RATIO = 0.5  # inner/outer radius; fat enough arms to survive 64 px renders


def object_outline(obj: ShapeObject, image_size: int) -> tuple[str, list[tuple[float, float]]]:
    """("ellipse", [top-left, bottom-right]) or ("polygon", vertices), in pixels of the image."""
    cx, cy = obj.center[0] * image_size, obj.center[1] * image_size
    radius = SIZES[obj.size] * image_size / 2
    if obj.shape == "circle":
        return "ellipse", [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    if obj.shape == "square":
        half = 0.9 * radius  # a little smaller, so squares do not look bigger than circles
        return "polygon", [
            (cx - half, cy - half),
            (cx + half, cy - half),
            (cx + half, cy + half),
            (cx - half, cy + half),
        ]
    if obj.shape == "triangle":
        half_height = radius * math.sqrt(3) / 2
        return "polygon", [(cx, cy - half_height), (cx + radius, cy + half_height), (cx - radius, cy + half_height)]
    if obj.shape == "star":
        outer = 1.05 * radius
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else STAR_INNER_RATIO * outer
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return "polygon", points
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def object_record(obj: ShapeObject, image_size: int) -> dict[str, Any]:
    _, points = object_outline(obj, image_size)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return {
        "shape": obj.shape,
        "color": obj.color,
        "size": obj.size,
        "position": position_name(obj.cell),
        "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2)],
        "center": [round(obj.center[0] * image_size, 2), round(obj.center[1] * image_size, 2)],
    }


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene: background (plus grey-level noise when `scene.noisy`), then the objects."""
    background_HW3 = np.full((image_size, image_size, 3), BACKGROUNDS[scene.background], dtype=np.float64)
    if scene.noisy:
        background_HW3 += rng.normal(0.0, NOISE_STD, size=(image_size, image_size, 1))
    background = Image.fromarray(np.clip(np.rint(background_HW3), 0, 255).astype(np.uint8))
    # Nearest-upsampled noise box-downsamples back to itself, so the texture survives exactly.
    canvas = background.resize((image_size * SUPERSAMPLE,) * 2, Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        kind, points = object_outline(obj, image_size)
        # PIL addresses pixel centres; shift by half a fine pixel to address pixel corners.
        fine = [(x * SUPERSAMPLE - 0.5, y * SUPERSAMPLE - 0.5) for x, y in points]
        if kind == "ellipse":
            draw.ellipse(fine, fill=COLORS[obj.color])
        else:
            draw.polygon(fine, fill=COLORS[obj.color])
    return canvas.resize((image_size, image_size), Image.BOX)


@dataclass
class ShapesWorldSummary:
    out_dir: Path
    n_images: int
    n_vqa: int
    tags: dict[str, int]
    vqa_types: dict[str, int]
    files: list[Path] = field(default_factory=list)
    stale_images: int = 0  # images/*.png from an earlier, larger run that the lists do not name


def render_shapes_world(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: int = 64,
    llava: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ShapesWorldSummary:
    """Write n images with captions, VQA pairs and GenEval metadata (see the module doc)."""
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16 (got n={n}, size={size})")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    captions, vqa, geneval = [], [], []
    tags: Counter[str] = Counter()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, TAGS[i % len(TAGS)])  # round robin: every tag even in tiny sets
        name = f"images/{i:06d}.png"
        render_scene(scene, size, rng).save(out_dir / name)
        metadata = geneval_metadata(scene)
        tags[scene.tag] += 1
        captions.append({"image": name, "caption": caption(scene), "prompt": metadata["prompt"]})
        vqa.extend({"image": name, **pair} for pair in vqa_pairs(scene, rng))
        geneval.append(
            {
                **metadata,
                "image": name,
                "background": scene.background,
                "noisy": scene.noisy,
                "objects": [object_record(o, size) for o in scene.objects],
            }
        )
        if progress is not None:
            progress(1)
    files = [out_dir / "captions.jsonl", out_dir / "vqa.jsonl", out_dir / "geneval.jsonl"]
    for path, records in zip(files, (captions, vqa, geneval), strict=True):
        write_jsonl(path, records)
    if llava:
        export_llava(out_dir / "vqa.jsonl", out_dir / "llava.json")
        files.append(out_dir / "llava.json")
    named = {record["image"] for record in captions}
    stale = sum(1 for p in (out_dir / "images").glob("*.png") if f"images/{p.name}" not in named)
    return ShapesWorldSummary(out_dir, n, len(vqa), dict(tags), dict(Counter(q["type"] for q in vqa)), files, stale)


def geneval_prompts(seed: int = 0, n_per_tag: int = 10, tags: tuple[str, ...] = TAGS) -> list[dict[str, Any]]:
    """Up to n_per_tag distinct GenEval-style prompts per tag, with metadata and no image.

    Some tags have fewer distinct prompts than asked (single_object has one per shape); those
    give what exists.
    """
    rng = np.random.default_rng(seed)
    prompts: list[dict[str, Any]] = []
    for tag in tags:
        seen: set[str] = set()
        for _ in range(50 * n_per_tag):
            if len(seen) == n_per_tag:
                break
            metadata = geneval_metadata(sample_objects_for_tag(rng, tag))
            if metadata["prompt"] not in seen:
                seen.add(metadata["prompt"])
                prompts.append(metadata)
    return prompts
