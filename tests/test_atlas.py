"""`tokenflow eval atlas` (issue 24): the final-scale assignments are the tokenizer's own indices
and true one-half argmins, the figures add up, the files are written, bad input fails in one
line, and the HTML page renders and pages in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenflow_cli
from tokenflow_cli.cli.app import app
from tokenflow_cli.eval.atlas_render import PAGE_SIZE, VIEW_COLOURS, context_crop
from tokenflow_cli.tokenizer.atlas import (
    AtlasOptions,
    choose_codes,
    collect_atlas,
    final_scale_views,
    within_code_stats,
)
from tokenflow_cli.tokenizer.usage_report import quantize_views

TOKENIZER = Path(tokenflow_cli.__file__).resolve().parent / "assets" / "toy-tokenizer.safetensors"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="no shipped toy tokenizer")


@pytest.fixture(scope="module")
def tok():
    from tokenflow_cli.tokenizer.model import load_tokenizer

    return load_tokenizer(TOKENIZER).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from tokenflow_cli.data.shapes import render_shapes_world

    out = tmp_path_factory.mktemp("atlas_world")
    render_shapes_world(out, n=8, seed=31, size=32)
    return out / "images"


def _batch(tok, world: Path) -> tuple[torch.Tensor, list[str]]:
    paths = sorted(world.glob("*.png"))
    return tok.preprocess(paths), [p.name for p in paths]


def test_final_scale_views_are_the_tokenizers_indices_and_true_argmins(tok, world):
    img, _ = _batch(tok, world)
    q, d_sem = tok.quantizer, tok.config.quantizer.semantic_dim
    with torch.no_grad():
        idx_BL = tok.encode(img).indices
        f = tok.encode_features(img)
        views = final_scale_views(q, f, idx_BL)
        walked = quantize_views(q, f)  # eval usage's own walk down the pyramid
    s = tok.scales[-1]
    assert torch.equal(views.shared, idx_BL[:, -s * s :])
    assert torch.equal(q.search(views.residual), views.shared)  # the residual is the one searched
    for view in ("shared", "semantic", "pixel"):
        assert torch.equal(getattr(views, view), walked[view][:, -s * s :])
    # brute force: the full distance matrix of each half alone
    z = views.residual.permute(0, 2, 3, 1).reshape(-1, tok.code_dim)
    sem_cb, pix_cb = q.codebooks()
    z_sem = torch.nn.functional.normalize(z[:, :d_sem], dim=1)
    z_pix = torch.nn.functional.normalize(z[:, d_sem:], dim=1)
    with torch.no_grad():
        assert torch.equal(views.semantic.reshape(-1), torch.cdist(z_sem, sem_cb).argmin(1))
        assert torch.equal(views.pixel.reshape(-1), torch.cdist(z_pix, pix_cb).argmin(1))


def test_atlas_counts_examples_and_figures_add_up(tok, world):
    img, keys = _batch(tok, world)
    atlas = collect_atlas(tok, [(img[:5], keys[:5]), (img[5:], keys[5:])], AtlasOptions(top=6, random=4, per_code=3))
    positions = len(keys) * tok.scales[-1] ** 2
    assert atlas.positions == positions
    assert all(int(c.sum()) == positions for c in atlas.counts.values())
    with torch.no_grad():
        final = tok.encode(img).indices[:, -tok.scales[-1] ** 2 :].reshape(-1)
    assert np.array_equal(atlas.counts["shared"], np.bincount(final.numpy(), minlength=tok.codebook_size))
    codes = atlas.sheet.codes
    assert [c.group for c in codes] == ["top"] * 6 + ["random"] * 4
    assert [c.index for c in codes[:6]] == [int(i) for i in np.argsort(-atlas.counts["shared"], kind="stable")[:6]]
    p, s = atlas.patch_px, tok.scales[-1]
    for code in codes:
        for view, examples in code.examples.items():
            assert len(examples) == min(3, code.counts[view])
            assert all(e.crop.shape == (3 * p, 3 * p, 3) for e in examples)
        # a shared example's position really has this code, and its crop's centre is that patch
        for e in code.examples["shared"]:
            assert int(final.view(len(keys), -1)[e.image, e.row * s + e.col]) == code.index
            picture = ((img[e.image].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            patch = picture[e.row * p : (e.row + 1) * p, e.col * p : (e.col + 1) * p]
            assert np.abs(e.crop[p : 2 * p, p : 2 * p].astype(int) - patch).max() <= 1
    shares = atlas.within_share
    assert 0 < shares["shared"]["pixel"] < shares["random"]["pixel"] <= 1
    figures = atlas.figures()
    assert json.loads(json.dumps(figures))["images"] == len(keys)
    again = collect_atlas(tok, [(img, keys)], AtlasOptions(top=6, random=4, per_code=3))
    assert [c.index for c in again.sheet.codes] == [c.index for c in codes]  # seeded, batch split irrelevant


def test_choose_codes_and_within_code_stats_by_hand():
    counts = np.array([0, 5, 9, 5, 1, 2, 0, 3])
    chosen = choose_codes(counts, AtlasOptions(top=3, random=2), np.random.default_rng(0))
    assert chosen[:3] == [(2, "top"), (1, "top"), (3, "top")]  # ties: lower index first
    sample = [i for i, group in chosen if group == "random"]
    assert len(sample) == 2 and set(sample) <= {4, 5, 7}
    assert counts[sample[0]] >= counts[sample[1]]
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 4.0], [10.0, 6.0]])
    labels = torch.tensor([1, 1, 0, 0])
    within, share = within_code_stats(x, labels, 3)
    assert within.tolist() == [2.0, 2.0, 0.0]
    total = float(((x - x.mean(0)) ** 2).sum())
    assert share == pytest.approx(4.0 / total)


def test_context_crop_pads_beyond_the_border():
    img = np.full((8, 8, 3), 7, dtype=np.uint8)
    corner = context_crop(img, 0, 0, 2)
    assert corner.shape == (6, 6, 3)
    assert (corner[2:, 2:] == 7).all() and (corner[:2] != 7).all()


@pytest.fixture(scope="module")
def atlas_dir(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atlas_cli") / "atlas"
    result = CliRunner().invoke(app, ["eval", "atlas", str(world), "--model", str(TOKENIZER), "-o", str(out),
                                      "--top", "16", "--random", "8", "--per-code", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "pixel var. within codes" in result.output
    return out


def test_cli_writes_png_html_and_json(atlas_dir):
    report = json.loads((atlas_dir / "atlas.json").read_text())
    assert report["images"] == 8 and report["positions"] == 8 * 64 and len(report["codes"]) == 24
    assert set(report["agreement_with_shared"]) == {"semantic", "pixel"}
    with Image.open(atlas_dir / "atlas.png") as png:
        assert png.height > 24 * 40
    page = (atlas_dir / "atlas.html").read_text()
    assert page.count("data:image/png;base64,") >= 24
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "<link" not in page  # no network


def test_cli_bad_inputs_fail_in_one_line_and_leave_nothing(tmp_path, world, cli_error):
    runner = CliRunner()
    missing = runner.invoke(app, ["eval", "atlas", str(tmp_path / "nowhere"), "-o", str(tmp_path / "a")])
    cli_error(missing, "nowhere", code=1)
    none = runner.invoke(app, ["eval", "atlas", str(world), "--top", "0", "--random", "0", "-o", str(tmp_path / "b")])
    cli_error(none, "--top", code=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    foreign = runner.invoke(app, ["eval", "atlas", str(world), "-o", str(tmp_path / "mine")])
    cli_error(foreign, "--overwrite", code=1)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def _cards(dom: str) -> list[int]:
    return [int(x) for x in re.findall(r'class="code-card" data-code="(\d+)"', dom)]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install chromium; `make test` "
                                             "installs it where it can)")
def test_html_renders_and_pages_in_headless_chromium(atlas_dir, tmp_path):
    report = json.loads((atlas_dir / "atlas.json").read_text())
    by_usage = sorted(report["codes"], key=lambda c: (-c["counts"]["shared"], c["index"]))
    url = (atlas_dir / "atlas.html").resolve().as_uri()

    shot = tmp_path / "atlas.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,1600", url, tmp=tmp_path)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (1600, 1280, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    for colour in VIEW_COLOURS.values():  # the three strips' borders are on screen
        close = (np.abs(pixels.astype(int) - colour).max(axis=2) <= 3).sum()
        assert close > 200, f"strip colour {colour} not in the screenshot"

    first = _chromium("--dump-dom", url, tmp=tmp_path).stdout
    cards = _cards(first)
    assert cards == [c["index"] for c in by_usage[:PAGE_SIZE]]
    assert f"{by_usage[0]['counts']['shared']} uses" in first and "page 1 of 2" in first
    second = _cards(_chromium("--dump-dom", url + "#page=2", tmp=tmp_path).stdout)
    assert second == [c["index"] for c in by_usage[PAGE_SIZE : 2 * PAGE_SIZE]] and second[0] != cards[0]
    random_set = _cards(_chromium("--dump-dom", url + "#page=1&set=random", tmp=tmp_path).stdout)
    assert random_set and set(random_set) == {c["index"] for c in report["codes"] if c["group"] == "random"}
