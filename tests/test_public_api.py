"""The public Python API (README "Python API"): the README's blocks run as written against the
shipped defaults; every model kind saves and loads back to identical outputs, and loads by run
folder, by file, by built-in name and by default; `import tokenflow_cli` does not import torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenflow_cli as tf
from tokenflow_cli import weights
from tokenflow_cli.pretrained import NoModelError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenflow_cli" / "assets"
QUESTION = "What color is the circle?"

pytestmark = pytest.mark.skipif(not (SHIPPED / "toy-llava" / "llava.json").is_file(), reason="no shipped defaults")


@pytest.fixture
def shipped(monkeypatch):
    """The shipped defaults back in place (the suite hides them: conftest.py)."""
    monkeypatch.setattr(weights, "ASSETS_DIR", SHIPPED)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Four small photos from scikit-image, as PNG files."""
    from skimage import data

    folder = tmp_path_factory.mktemp("world") / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return sorted(folder.glob("*.png"))


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_import_is_light_and_names_are_public():
    code = "import sys, tokenflow_cli as tf; assert 'torch' not in sys.modules, 'torch'; print(sorted(tf.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TokenFlowTokenizer" in out and "TextToImage" in out and "Understanding" in out
    with pytest.raises(AttributeError):
        tf.NoSuchThing  # noqa: B018


def test_readme_python_api_runs_as_written(shipped, photos, tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert len(blocks) >= 4
    (tmp_path / "photos").symlink_to(photos[0].parent)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Python API)", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "red_circle.png").is_file() and float(namespace["psnr"]) > 15


# ---------------------------------------------------------------- every kind, one convention


def _tokenizer_outputs(model, photos):
    codes = model.encode(photos)
    return [codes.indices, model.decode(codes)]


def _generator_outputs(model, photos):
    out = model("a red circle", k1=1200, k2=100, seed=0, n=2)
    return [torch.from_numpy(out.codes), torch.from_numpy(np.stack([np.asarray(im) for im in out.images]))]


def _understanding_outputs(model, photos):
    return [model.visual_tokens(photos[:2]), model.ask_batch(photos[:2], [QUESTION, "How many shapes are there?"])]


KINDS = {  # kind -> (class, built-in asset, its weights file inside a saved folder, outputs)
    "tokenizer": (lambda: tf.TokenFlowTokenizer, "toy-tokenizer.safetensors", "model.safetensors", _tokenizer_outputs),
    "text-to-image": (lambda: tf.TextToImage, "toy-generator", "model.safetensors", _generator_outputs),
    "understanding": (lambda: tf.Understanding, "toy-llava", "llava.json", _understanding_outputs),
}


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip_and_every_way_to_name_a_model(kind, shipped, photos, tmp_path):
    cls, asset, file_name, outputs = KINDS[kind]
    cls = cls()
    default = cls.from_pretrained()
    builtin = cls.from_pretrained("toy")
    expected = outputs(default, photos)
    _same(outputs(builtin, photos), expected)

    default.save_pretrained(tmp_path / "saved")
    _same(outputs(cls.from_pretrained(tmp_path / "saved"), photos), expected)  # by run folder
    _same(outputs(cls.from_pretrained(str(tmp_path / "saved" / file_name)), photos), expected)  # by file
    assert not (tmp_path / "saved" / "config.json").exists() or kind == "understanding"  # the LM's own config


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_name_that_is_nothing_says_so(kind, shipped):
    cls = KINDS[kind][0]()
    with pytest.raises(NoModelError, match="not a path, a built-in name"):
        cls.from_pretrained("no-such-model")
    with pytest.raises(NoModelError, match="not in the local Hugging Face cache"):
        cls.from_pretrained("nobody-has/this-model")
