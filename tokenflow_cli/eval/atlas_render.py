"""A codebook atlas as pictures: a PNG sheet and a self-contained HTML page.

Input is plain data (`AtlasSheet`: codes, their usage counts and example crops as uint8 arrays);
collecting it from a tokenizer is `tokenizer/atlas.py`. Each example is a *context crop*: the
patch one final-scale position covers plus a margin of one patch on every side (a 3 x 3 patch
window, a grey checkerboard beyond the image border), with the patch itself outlined in yellow. Both
outputs show, per code, three strips of examples: positions whose shared index is the code, and
positions whose nearest code by the semantic half alone / the pixel half alone is the code.

The HTML page needs no network and no server: every crop is an inline base64 PNG, the CSS and
the script are inline. It pages through the codes (buttons, arrow keys, `#page=N&set=top`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tokenflow_cli.fileio import atomic_path, atomic_write_text

VIEWS = ("shared", "semantic", "pixel")
VIEW_TITLES = {"shared": "shared index", "semantic": "semantic-nearest", "pixel": "pixel-nearest"}
VIEW_COLOURS = {"shared": (43, 108, 176), "semantic": (221, 107, 32), "pixel": (47, 133, 90)}
OUTLINE = (255, 214, 0)
BORDER_GREYS = (90, 170)  # a checkerboard beyond the image border
PAGE_SIZE = 12


@dataclass
class AtlasExample:
    image: int  # index into AtlasSheet.sources
    row: int  # final-scale grid position
    col: int
    crop: np.ndarray  # (3p, 3p, 3) uint8 context crop, the patch at [p, 2p)


@dataclass
class AtlasCode:
    index: int  # the code
    group: str  # "top" (most used) or "random" (the seeded sample of other used codes)
    counts: dict[str, int]  # positions per view that picked this code
    pixel_spread: float  # shared view: mean squared deviation of member patches from their mean ([0, 1] pixels)
    semantic_coherence: float  # shared view: length of the mean unit semantic vector (1 = all alike)
    examples: dict[str, list[AtlasExample]] = field(default_factory=dict)  # per view, a seeded sample


@dataclass
class AtlasSheet:
    title: str
    patch_px: int  # p: pixels of one final-scale patch in the crops
    codes: list[AtlasCode]
    sources: list[str]  # image names, for AtlasExample.image
    summary: str  # one line of figures (agreement, purity) for the page header


def context_crop(image_HW3: np.ndarray, row: int, col: int, patch_px: int) -> np.ndarray:
    """The patch at (row, col) of a grid of `patch_px` patches with a one-patch margin (3p x 3p);
    beyond the image border a checkerboard, so it is not mistaken for image content."""
    p = patch_px
    H, W = image_HW3.shape[:2]
    checker = (np.indices((H + 2 * p, W + 2 * p)).sum(0) % 2).astype(bool)
    padded = np.where(checker, *BORDER_GREYS).astype(np.uint8)[..., None].repeat(3, axis=2)
    padded[p : p + H, p : p + W] = image_HW3
    return padded[row * p : row * p + 3 * p, col * p : col * p + 3 * p]


def _zoom(patch_px: int, target: int = 48) -> int:
    return max(1, round(target / (3 * patch_px)))


def _cell(crop: np.ndarray, patch_px: int, zoom: int) -> Image.Image:
    """A crop enlarged `zoom` times (nearest), the centre patch outlined."""
    big = Image.fromarray(crop).resize((crop.shape[1] * zoom, crop.shape[0] * zoom), Image.NEAREST)
    a, b = patch_px * zoom, 2 * patch_px * zoom - 1
    ImageDraw.Draw(big).rectangle([a, a, b, b], outline=OUTLINE)
    return big


def render_png(sheet: AtlasSheet, path: Path, per_code: int) -> None:
    """One row per code: a label (index, uses) then the three strips, each on its view's colour."""
    zoom = _zoom(sheet.patch_px)
    cell, gap, label_w, header_h = 3 * sheet.patch_px * zoom, 2, 120, 22
    strip_w = per_code * (cell + gap) + gap
    width = label_w + len(VIEWS) * (strip_w + 8)
    row_h = cell + 2 * gap + 4
    canvas = Image.new("RGB", (width, header_h + row_h * max(len(sheet.codes), 1)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for v, view in enumerate(VIEWS):
        draw.text((label_w + v * (strip_w + 8) + 4, 5), VIEW_TITLES[view], fill=VIEW_COLOURS[view], font=font)
    for r, code in enumerate(sheet.codes):
        y = header_h + r * row_h
        draw.text((4, y + 4), f"#{code.index} ({code.group})", fill="black", font=font)
        draw.text((4, y + 18), f"{code.counts['shared']} uses", fill="black", font=font)
        for v, view in enumerate(VIEWS):
            x0 = label_w + v * (strip_w + 8)
            draw.rectangle([x0, y, x0 + strip_w - 1, y + cell + 2 * gap - 1], fill=VIEW_COLOURS[view])
            for e, example in enumerate(code.examples.get(view, [])[:per_code]):
                canvas.paste(_cell(example.crop, sheet.patch_px, zoom), (x0 + gap + e * (cell + gap), y + gap))
    with atomic_path(Path(path), suffix=".png") as tmp:
        canvas.save(tmp, format="PNG", optimize=True)


def _data_uri(crop: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _page_data(sheet: AtlasSheet) -> dict:
    """What the page's script reads: codes with their counts and crops as data URIs."""
    codes = [{"index": c.index, "group": c.group, "counts": c.counts,
              "pixel_spread": round(c.pixel_spread, 5), "semantic_coherence": round(c.semantic_coherence, 4),
              "examples": {view: [{"src": _data_uri(e.crop), "where": f"{sheet.sources[e.image]} "
                                   f"row {e.row} col {e.col}"} for e in c.examples.get(view, [])]
                           for view in VIEWS}}
             for c in sheet.codes]
    return {"title": sheet.title, "views": [[v, VIEW_TITLES[v]] for v in VIEWS], "codes": codes,
            "page_size": PAGE_SIZE, "summary": sheet.summary}


def render_html(sheet: AtlasSheet, path: Path) -> None:
    """The self-contained page (template below; the data goes in as one JSON block)."""
    data = json.dumps(_page_data(sheet), separators=(",", ":")).replace("</", "<\\/")
    colours = "".join(f".v-{v}{{border-color:rgb{VIEW_COLOURS[v]};background:rgb{VIEW_COLOURS[v]}}}"
                      f".t-{v}{{color:rgb{VIEW_COLOURS[v]}}}" for v in VIEWS)
    page = (_TEMPLATE.replace("__TITLE__", html.escape(sheet.title)).replace("__COLOURS__", colours)
            .replace("__DATA__", data))
    atomic_write_text(Path(path), page)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 6px}
#figures{margin:4px 0 10px;color:#444}
#controls{display:flex;gap:8px;align-items:center;margin-bottom:10px}
button,select{font:inherit;padding:3px 10px}
#codes{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:0 10px}
.code-card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin-bottom:8px}
.code-head{font-weight:600;margin-bottom:4px}.code-head small{font-weight:400;color:#666}
.strip-row{display:flex;align-items:center;gap:8px;margin:2px 0}
.strip-label{width:170px;font-size:12px}
.strip{display:flex;gap:2px;padding:2px;border:2px solid;border-radius:3px;min-height:48px;min-width:48px}
.cell{position:relative;width:48px;height:48px}
.cell img{width:48px;height:48px;image-rendering:pixelated;display:block}
.cell i{position:absolute;left:33.33%;top:33.33%;width:33.33%;height:33.33%;box-sizing:border-box;
 border:1px solid rgb(255,214,0)}
.none{color:#fff;font-size:12px;padding:14px 6px}
__COLOURS__
</style></head><body>
<h1>__TITLE__</h1>
<div id="figures"></div>
<div id="controls">
<button id="prev" type="button">&larr; prev</button><span id="where"></span>
<button id="next" type="button">next &rarr;</button>
<label>codes <select id="set"><option value="all">all, by usage</option><option value="top">most used</option>
<option value="random">random sample</option></select></label>
<span style="color:#666">(arrow keys page; each crop is the patch, outlined, with a one-patch margin)</span>
</div>
<div id="codes"></div>
<script id="atlas-data" type="application/json">__DATA__</script>
<script>
"use strict";
const atlas = JSON.parse(document.getElementById("atlas-data").textContent);
const state = {page: 1, set: "all"};
function chosen() {
  const codes = atlas.codes.filter(c => state.set === "all" || c.group === state.set);
  return codes.slice().sort((a, b) => b.counts.shared - a.counts.shared || a.index - b.index);
}
function pages() { return Math.max(1, Math.ceil(chosen().length / atlas.page_size)); }
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  state.set = ["all", "top", "random"].includes(params.get("set")) ? params.get("set") : "all";
  state.page = Math.min(Math.max(1, parseInt(params.get("page") || "1", 10) || 1), pages());
}
function go(page) { location.hash = "page=" + page + "&set=" + state.set; }
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
function card(code) {
  const box = el("div", "code-card");
  box.dataset.code = code.index;
  const head = el("div", "code-head", "code " + code.index + " ");
  head.appendChild(el("small", "", code.counts.shared + " uses (" + code.group + "); spread " +
    code.pixel_spread.toFixed(4) + ", semantic coherence " + code.semantic_coherence.toFixed(3)));
  box.appendChild(head);
  for (const [view, title] of atlas.views) {
    const row = el("div", "strip-row");
    row.appendChild(el("span", "strip-label t-" + view, title + ": " + code.counts[view]));
    const strip = el("div", "strip v-" + view);
    strip.dataset.view = view;
    for (const ex of code.examples[view]) {
      const cell = el("div", "cell");
      const img = el("img");
      img.src = ex.src; img.alt = ex.where; img.title = ex.where;
      cell.appendChild(img); cell.appendChild(el("i"));
      strip.appendChild(cell);
    }
    if (!code.examples[view].length) strip.appendChild(el("span", "none", "none"));
    row.appendChild(strip);
    box.appendChild(row);
  }
  return box;
}
function render() {
  readHash();
  document.getElementById("set").value = state.set;
  const start = (state.page - 1) * atlas.page_size;
  const list = document.getElementById("codes");
  list.replaceChildren(...chosen().slice(start, start + atlas.page_size).map(card));
  document.getElementById("where").textContent = "page " + state.page + " of " + pages();
  document.getElementById("prev").disabled = state.page <= 1;
  document.getElementById("next").disabled = state.page >= pages();
}
document.getElementById("prev").onclick = () => go(state.page - 1);
document.getElementById("next").onclick = () => go(state.page + 1);
document.getElementById("set").onchange = e => { state.set = e.target.value; go(1); };
document.addEventListener("keydown", e => {
  if (e.key === "ArrowRight" && state.page < pages()) go(state.page + 1);
  if (e.key === "ArrowLeft" && state.page > 1) go(state.page - 1);
});
window.addEventListener("hashchange", render);
document.getElementById("figures").textContent = atlas.summary;
render();
</script></body></html>
"""
