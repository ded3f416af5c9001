"""GenEval-style evaluation on the shapes world.

Prompts and their metadata come from `data.shapes.geneval_prompts` (GenEval's schema: "tag",
"include" [{"class", "count", ["color"], ["position": [relation, group]]}], ["exclude"],
"prompt"). Generated images are scored by the classical shapes detector with GenEval's rules:

- for each `include` group, the first `count` detections of the class (largest first, our
  stand-in for GenEval's confidence order) must exist, carry the colour when one is asked, and
  for `position` every one of them must stand in the relation to every object of the
  referenced group (GenEval's box-centre rule with a 0.1 x (size_a + size_b) dead zone);
- for each `exclude` group there must be fewer than `count` detections of the class.

An image is correct when every rule holds; a tag's score is its share of correct images and the
overall score is the mean over tags (GenEval's). The same images are written in GenEval's
folder layout (`NNNNN/metadata.jsonl`, `NNNNN/samples/NNNN.png`) so the real GenEval detector
can score them too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow_cli.data.shapes import detect_shapes, geneval_prompts, render_shapes_world
from tokenflow_cli.eval.visual import save_png
from tokenflow_cli.fileio import atomic_write_text
from tokenflow_cli.generation.text_to_image import generate_images

POSITION_THRESHOLD = 0.1  # GenEval's dead zone around the centre offset, per unit of box size


def relative_position(box_a: list[float], box_b: list[float]) -> set[str]:
    """Relations of box A to box B ("left of", "right of", "above", "below"); boxes x0,y0,x1,y1."""
    a, b = np.asarray(box_a, dtype=float).reshape(2, 2), np.asarray(box_b, dtype=float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    size_a, size_b = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def score_detections(detections: list[dict[str, Any]], metadata: dict[str, Any]) -> tuple[bool, list[str]]:
    """GenEval's decision for one image from its detections: (correct, reasons it is not)."""
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for det in sorted(detections, key=lambda d: -d.get("area", 0.0)):
        by_class[det["shape"]].append(det)
    reasons: list[str] = []
    groups: list[list[dict[str, Any]] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = by_class.get(cls, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if ok and "color" in req and sum(d["color"] == req["color"] for d in found) < count:
            ok = False
            reasons.append(f"expected {req['color']} {cls}>={count}, found {[d['color'] for d in found]}")
        if ok and "position" in req:
            relation, target = req["position"]
            others = groups[target] if target < len(groups) else None
            if others is None:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            elif not all(relation in relative_position(d["bbox"], o["bbox"]) for d in found for o in others):
                ok = False
                reasons.append(f"expected {cls} {relation} target")
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, reasons


def score_images(images: list[np.ndarray], metadata: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per image: tag, prompt, correct, reasons, detections."""

    records = []
    for image, meta in zip(images, metadata, strict=True):
        detections = detect_shapes(image)
        correct, reasons = score_detections(detections, meta)
        records.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": correct, "reasons": reasons,
                        "detections": [{k: d[k] for k in ("shape", "color", "bbox")} for d in detections]})
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-tag share of correct images and the overall score (mean over tags)."""
    per_tag: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        per_tag[record["tag"]].append(bool(record["correct"]))
    scores = {tag: float(np.mean(hits)) for tag, hits in per_tag.items()}
    return {"overall": float(np.mean(list(scores.values()))) if scores else 0.0, "per_tag": scores,
            "images": len(records), "images_per_tag": {tag: len(h) for tag, h in per_tag.items()}}


def export_geneval_layout(out_dir: str | Path, metadata: list[dict[str, Any]], images: np.ndarray,
                          samples_per_prompt: int) -> list[Path]:
    """GenEval's input layout: for prompt i, `{i:05d}/metadata.jsonl` (its metadata as one
    JSON line) and `{i:05d}/samples/{j:04d}.png`; `images` holds samples_per_prompt per prompt
    in prompt order. Returns the prompt folders."""

    if len(images) != len(metadata) * samples_per_prompt:
        raise ValueError(f"{len(images)} images for {len(metadata)} prompts x {samples_per_prompt} samples")
    folders = []
    for i, meta in enumerate(metadata):
        folder = Path(out_dir) / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metadata.jsonl", json.dumps(meta) + "\n")
        for j in range(samples_per_prompt):
            save_png(images[i * samples_per_prompt + j], folder / "samples" / f"{j:04d}.png")
        folders.append(folder)
    return folders


def run_geneval(loaded, settings, out_dir: str | Path, n_per_tag: int = 10, prompt_seed: int = 0,
                progress=None) -> dict[str, Any]:
    """Generate `settings.samples_per_prompt` images for each shapes-world GenEval prompt, score
    them, write the GenEval layout under OUT/geneval and per-image records; return the report."""

    metadata = geneval_prompts(seed=prompt_seed, n_per_tag=n_per_tag)
    result = generate_images(loaded, [m["prompt"] for m in metadata], settings, progress)
    per_image = [m for m in metadata for _ in range(settings.samples_per_prompt)]
    records = score_images(list(result.images), per_image)
    out_dir = Path(out_dir)
    export_geneval_layout(out_dir / "geneval", metadata, result.images, settings.samples_per_prompt)
    atomic_write_text(out_dir / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {**summarize(records), "prompts": len(metadata), "seconds": round(result.seconds, 2),
            "images_per_s": round(result.images_per_s, 3), "settings": settings.to_json()}


CEILING_SEED = 90210  # a world no training or prompt set uses


def detector_ceiling(image_size: int, n: int = 300, seed: int = CEILING_SEED) -> dict[str, Any]:
    """The detector's score on real rendered images of the shapes world at `image_size`, with
    their own GenEval metadata: the most a perfect generator can score (small stars, for one,
    are hard to tell from blobs at 32 px)."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        render_shapes_world(Path(tmp), n=n, seed=seed, size=image_size)
        metadata = [json.loads(line) for line in (Path(tmp) / "geneval.jsonl").read_text().splitlines()]
        images = [np.asarray(Image.open(Path(tmp) / m["image"]).convert("RGB")) for m in metadata]
    return summarize(score_images(images, metadata))
