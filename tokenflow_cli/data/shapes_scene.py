"""The shapes world's vocabulary and scene sampling (no drawing, no text).

A scene is 1-4 coloured shapes placed in distinct cells of a 3 x 3 grid on a plain or noisy
background. Every scene is sampled for one GenEval task tag, so the GenEval-style metadata
written with it is true of the image by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Palette chosen for colour segmentation: every pair of object colours is >= ~95 apart in RGB
# and every background is >= ~80 from every object colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 130, 20),
    "yellow": (235, 225, 40),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "light blue": (175, 205, 230),
    "beige": (220, 205, 170),
    "dark slate": (55, 65, 85),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Object bounding side as a share of the image side; a grid cell is 1/3 of it.
SIZES: dict[str, float] = {"small": 0.17, "large": 0.27}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
GRID = 3
MAX_OBJECTS = 4
NOISY_BACKGROUND_PROBABILITY = 0.3
NOISE_STD = 6.0  # grey levels; small enough that segmentation against the palette stays clean
JITTER = 0.8  # share of a cell's free margin an object centre may move (keeps gaps between cells)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    cell: tuple[int, int]  # (row, column) in the 3 x 3 grid
    center: tuple[float, float]  # (x, y) as a share of the image side


@dataclass
class Scene:
    tag: str
    objects: list[ShapeObject]
    background: str
    noisy: bool
    # (relation, index of the subject A, index of the reference B): "A <relation> B"
    relation: tuple[str, int, int] | None = None
    counted: str | None = None  # the shape a counting scene asks about
    extras: list[int] = field(default_factory=list)  # indices of distractor objects


def position_name(cell: tuple[int, int]) -> str:
    """'top left', 'top', 'centre', 'right', ... for a grid cell."""
    row, col = cell
    vertical = ("top", "", "bottom")[row]
    horizontal = ("left", "", "right")[col]
    return " ".join(word for word in (vertical, horizontal) if word) or "centre"


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str], k: int = 1) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _place(rng: np.random.Generator, shape: str, color: str, size: str, cell: tuple[int, int]) -> ShapeObject:
    cell_side, side = 1.0 / GRID, SIZES[size]
    max_shift = JITTER * (cell_side - side) / 2
    dx, dy = rng.uniform(-max_shift, max_shift, size=2)
    row, col = cell
    center = ((col + 0.5) * cell_side + float(dx), (row + 0.5) * cell_side + float(dy))
    return ShapeObject(shape, color, size, cell, center)


def _free_cells(rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    flat = rng.choice(GRID * GRID, size=k, replace=False)
    return [(int(i) // GRID, int(i) % GRID) for i in flat]


def _relation_cells(rng: np.random.Generator, relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells for A and B with A <relation> B, on one row or column so the relation is unambiguous."""
    line = int(rng.integers(GRID))
    first, second = sorted(int(i) for i in rng.choice(GRID, size=2, replace=False))
    if relation in ("left of", "above"):
        near, far = first, second  # A has the smaller column / row
    else:
        near, far = second, first
    if relation in ("left of", "right of"):
        return (line, near), (line, far)
    return (near, line), (far, line)


def _size(rng: np.random.Generator) -> str:
    return _pick(rng, tuple(SIZES))[0]


def _color(rng: np.random.Generator) -> str:
    return _pick(rng, tuple(COLORS))[0]


def sample_objects_for_tag(rng: np.random.Generator, tag: str) -> Scene:
    """Object identities (no layout) that make the tag's GenEval prompt true."""
    if tag in ("single_object", "colors"):
        (shape,) = _pick(rng, SHAPES)
        specs = [(shape, _color(rng))]
        return Scene(tag, [ShapeObject(s, c, "", (0, 0), (0, 0)) for s, c in specs], "", False)
    if tag in ("two_object", "position", "color_attr"):
        shapes = _pick(rng, SHAPES, 2)
        colors = _pick(rng, tuple(COLORS), 2) if tag == "color_attr" else [_color(rng), _color(rng)]
        objects = [ShapeObject(s, c, "", (0, 0), (0, 0)) for s, c in zip(shapes, colors, strict=True)]
        relation = (_pick(rng, RELATIONS)[0], 0, 1) if tag == "position" else None
        return Scene(tag, objects, "", False, relation=relation)
    if tag == "counting":
        (shape,) = _pick(rng, SHAPES)
        count = int(rng.integers(2, 5))
        same = rng.random() < 0.5
        colors = [_color(rng)] * count if same else [_color(rng) for _ in range(count)]
        objects = [ShapeObject(shape, c, "", (0, 0), (0, 0)) for c in colors]
        return Scene(tag, objects, "", False, counted=shape)
    raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {TAGS}")


def sample_scene(rng: np.random.Generator, tag: str) -> Scene:
    """A laid-out scene for `tag`, sometimes with one distractor of a shape the prompt leaves out."""
    scene = sample_objects_for_tag(rng, tag)
    specs = [(o.shape, o.color) for o in scene.objects]
    # Distractors only where GenEval's rule cannot be broken by them (two_object, counting).
    if tag in ("two_object", "counting") and len(specs) < MAX_OBJECTS and rng.random() < 0.4:
        used = {shape for shape, _ in specs}
        specs.append((_pick(rng, [s for s in SHAPES if s not in used])[0], _color(rng)))
        scene.extras = [len(specs) - 1]
    if scene.relation is not None:
        cells = list(_relation_cells(rng, scene.relation[0]))
    else:
        cells = _free_cells(rng, len(specs))
    scene.objects = [_place(rng, s, c, _size(rng), cell) for (s, c), cell in zip(specs, cells, strict=True)]
    scene.background = _pick(rng, tuple(BACKGROUNDS))[0]
    scene.noisy = bool(rng.random() < NOISY_BACKGROUND_PROBABILITY)
    return scene
