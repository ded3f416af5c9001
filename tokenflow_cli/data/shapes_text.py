"""Text about a shapes scene: captions, VQA pairs and GenEval-style metadata.

GenEval metadata follows `evaluation_metadata.jsonl` of GenEval (Ghosh et al., 2023): "tag",
"include" [{"class", "count", optional "color", optional "position": [relation, group]}],
optional "exclude" [{"class", "count"}] (fails when at least that many are found) and "prompt".
Our classes are the shape names.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from tokenflow_cli.data.shapes_scene import (
    COLORS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    position_name,
)


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith("s") else f"{shape}s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _group_phrase(group: list[ShapeObject]) -> str:
    first = group[0]
    sizes = {o.size for o in group}
    size = f"{first.size} " if len(sizes) == 1 else ""
    if len(group) == 1:
        return with_article(f"{size}{first.color} {first.shape}")
    return f"{NUMBER_WORDS[len(group)]} {size}{first.color} {plural(first.shape)}"


def caption(scene: Scene) -> str:
    """A full description, e.g. 'two red circles and a large blue square on a grey background'."""
    background = f"{with_article(('noisy ' if scene.noisy else '') + scene.background)} background"
    objects = scene.objects
    if scene.relation is not None:
        relation, a, b = scene.relation
        subject, reference = _group_phrase([objects[a]]), _group_phrase([objects[b]])
        return f"{subject} {relation} {reference} on {background}"
    if len(objects) == 1:
        where = position_name(objects[0].cell)
        return f"{_group_phrase(objects)} at the {where} on {background}"
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in objects:
        groups.setdefault((obj.color, obj.shape), []).append(obj)
    return f"{_join([_group_phrase(g) for g in groups.values()])} on {background}"


def geneval_metadata(scene: Scene) -> dict[str, Any]:
    """{"tag", "include", ["exclude"], "prompt"} true of the scene (GenEval's schema)."""
    tag, objects = scene.tag, scene.objects
    first = objects[0]
    if tag == "single_object":
        return {
            "tag": tag,
            "include": [{"class": first.shape, "count": 1}],
            "prompt": f"a photo of {with_article(first.shape)}",
        }
    if tag == "colors":
        return {
            "tag": tag,
            "include": [{"class": first.shape, "count": 1, "color": first.color}],
            "prompt": f"a photo of {with_article(first.color)} {first.shape}",
        }
    if tag == "counting":
        count = sum(o.shape == scene.counted for o in objects)
        return {
            "tag": tag,
            "include": [{"class": scene.counted, "count": count}],
            "exclude": [{"class": scene.counted, "count": count + 1}],
            "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(scene.counted)}",
        }
    second = objects[1]
    if tag == "two_object":
        return {
            "tag": tag,
            "include": [{"class": first.shape, "count": 1}, {"class": second.shape, "count": 1}],
            "prompt": f"a photo of {with_article(first.shape)} and {with_article(second.shape)}",
        }
    if tag == "position":
        relation, a, b = scene.relation
        subject, reference = objects[a].shape, objects[b].shape
        # GenEval lists the reference first; the subject's "position" points at group 0.
        return {
            "tag": tag,
            "include": [{"class": reference, "count": 1}, {"class": subject, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {with_article(subject)} {relation} {with_article(reference)}",
        }
    if tag == "color_attr":
        return {
            "tag": tag,
            "include": [
                {"class": first.shape, "count": 1, "color": first.color},
                {"class": second.shape, "count": 1, "color": second.color},
            ],
            "prompt": f"a photo of {with_article(first.color)} {first.shape} and "
            f"{with_article(second.color)} {second.shape}",
        }
    raise ValueError(f"unknown GenEval tag {tag!r}")


def _choice(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _relation_between(a: ShapeObject, b: ShapeObject) -> str | None:
    """Relation of a to b when they share a grid row or column (otherwise ambiguous: None)."""
    (row_a, col_a), (row_b, col_b) = a.cell, b.cell
    if row_a == row_b:
        return "left of" if col_a < col_b else "right of"
    if col_a == col_b:
        return "above" if row_a < row_b else "below"
    return None


def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """One question of each type that has an unambiguous answer in this scene.

    Types: count, color, shape, position, size, exists (yes/no), relation (yes/no), background.
    """
    objects = scene.objects
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    identity_counts = Counter((o.color, o.shape) for o in objects)
    unique = [o for o in objects if identity_counts[(o.color, o.shape)] == 1]
    pairs: list[dict[str, str]] = []

    def ask(kind: str, question: str, answer: str | int) -> None:
        pairs.append({"question": question, "answer": str(answer), "type": kind})

    if rng.random() < 0.25:
        ask("count", "How many shapes are there?", len(objects))
    else:
        shape = _choice(rng, sorted(shape_counts) if rng.random() < 0.8 else list(SHAPES))
        ask("count", f"How many {plural(shape)} are there?", shape_counts[shape])
    single_shapes = sorted(s for s, n in shape_counts.items() if n == 1)
    if single_shapes:
        shape = _choice(rng, single_shapes)
        color = next(o.color for o in objects if o.shape == shape)
        ask("color", f"What color is the {shape}?", color)
    single_colors = sorted(c for c, n in color_counts.items() if n == 1)
    if single_colors:
        color = _choice(rng, single_colors)
        shape = next(o.shape for o in objects if o.color == color)
        ask("shape", f"What shape is the {color} object?", shape)
    if unique:
        obj = _choice(rng, unique)
        ask("position", f"Where is the {obj.color} {obj.shape}?", position_name(obj.cell))
        obj = _choice(rng, unique)
        ask("size", f"Is the {obj.color} {obj.shape} small or large?", obj.size)
    if rng.random() < 0.5:
        obj = _choice(rng, objects)
        ask("exists", f"Is there {with_article(obj.color)} {obj.shape}?", "yes")
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in identity_counts]
        color, shape = _choice(rng, absent)
        ask("exists", f"Is there {with_article(color)} {shape}?", "no")
    related = [(a, b) for a in unique for b in unique if a is not b and _relation_between(a, b)]
    if related:
        a, b = _choice(rng, related)
        truth = _relation_between(a, b)
        asked = truth if rng.random() < 0.5 else _choice(rng, [r for r in RELATIONS if r != truth])
        ask(
            "relation",
            f"Is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?",
            "yes" if asked == truth else "no",
        )
    ask("background", "What color is the background?", scene.background)
    return pairs
