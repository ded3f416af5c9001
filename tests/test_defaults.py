"""The trained defaults shipped in tokenflow_cli/assets beat their random-init counterparts by a
wide margin on small held-out sets (worlds rendered with seeds no training set used), so a
change that breaks learning, loading or the feature path fails here.

The margins are far below what the shipped models reach (docs/RESULTS.md) and far above what
a random model can reach by chance; each figure is printed for the log.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import tokenflow_cli
from tokenflow_cli.weights import DEFAULT_GENERATOR, DEFAULT_LLAVA, DEFAULT_TOKENIZER

ASSETS = Path(tokenflow_cli.__file__).resolve().parent / "assets"  # conftest hides them from the lookup
TOKENIZER = ASSETS / DEFAULT_TOKENIZER.asset
GENERATOR = ASSETS / DEFAULT_GENERATOR.asset
LLAVA = ASSETS / DEFAULT_LLAVA.asset
HELD_OUT_SEED = 4242


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture with fresh weights: every submodule's own initialisation."""
    torch.manual_seed(seed)
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tokenflow_cli.data.shapes import render_shapes_world

    out = tmp_path_factory.mktemp("held_out")
    render_shapes_world(out, n=48, seed=HELD_OUT_SEED, size=32, llava=True)
    return out


def _images(world: Path, n: int) -> torch.Tensor:
    from tokenflow_cli.data.images import load_image, to_tensor_pm1

    return torch.stack([to_tensor_pm1(load_image(p)) for p in sorted((world / "images").glob("*.png"))[:n]])


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="no shipped tokenizer")
def test_shipped_tokenizer_reconstructs_far_better_than_random_init(world):
    from tokenflow_cli.eval.image_metrics import psnr_uint8
    from tokenflow_cli.eval.visual import to_uint8
    from tokenflow_cli.tokenizer.model import load_tokenizer

    x = _images(world, 16)

    def psnr(tok) -> float:
        with torch.no_grad():
            rec = tok.codes_to_img(tok.img_to_codes(x))
        return float(psnr_uint8(to_uint8(x), to_uint8(rec)).mean())

    tok = load_tokenizer(TOKENIZER)
    assert not tok.random_init_parts
    trained = psnr(tok)
    random = psnr(_randomize(tok))
    print(f"held-out shapes PSNR: shipped {trained:.2f} dB, random init {random:.2f} dB")
    assert trained > 26.0 and trained > random + 10.0


@pytest.mark.skipif(not (GENERATOR / "model.safetensors").is_file(), reason="no shipped generator")
def test_shipped_generator_predicts_held_out_codes_and_draws_the_prompt(world):
    import json

    import torch.nn.functional as F

    from tokenflow_cli.data.shapes_detect import detect_shapes
    from tokenflow_cli.generation.sampling import get_schedule
    from tokenflow_cli.generation.text_to_image import GenerationSettings, TextToImage, generate_images

    loaded = TextToImage.from_pretrained(GENERATOR, device="cpu")
    assert not loaded.random_init
    captions = [json.loads(line)["caption"] for line in (world / "captions.jsonl").read_text().splitlines()][:16]
    with torch.no_grad():
        idx_BL = loaded.tokenizer.img_to_codes(_images(world, 16)).indices

    def nll(model) -> float:
        with torch.no_grad():
            out = model(loaded.prompts(captions), model.scale_inputs(loaded.tokenizer, idx_BL), None)
        return float(F.cross_entropy(out.logits_BLK.flatten(0, 1).float(), idx_BL.flatten()))

    settings = GenerationSettings(get_schedule("two-pass"), cfg=3.0, seed=0, samples_per_prompt=4)
    images = generate_images(loaded, ["a red circle"], settings).images
    red_circles = sum(any(d["shape"] == "circle" and d["color"] == "red" for d in detect_shapes(im)) for im in images)
    trained = nll(loaded.model)
    random = nll(_randomize(loaded.model))
    chance = float(np.log(loaded.tokenizer.codebook_size))
    print(f"held-out code NLL: shipped {trained:.3f}, random init {random:.3f} (uniform {chance:.3f}); "
          f"'a red circle': {red_circles}/4 samples show one")
    assert trained < random - 2.0 and trained < chance - 2.0
    assert red_circles >= 2


@pytest.mark.skipif(not (LLAVA / "llava.json").is_file(), reason="no shipped understanding model")
def test_shipped_understanding_model_answers_far_better_than_random_init(world):
    from tokenflow_cli.understanding.pipeline import Understanding
    from tokenflow_cli.understanding.vqa import answer_questions, load_vqa_items, score_vqa

    items = [it for it in load_vqa_items(world / "vqa.jsonl", world) if it.type in ("color", "shape", "count")][:60]
    understanding = Understanding.from_pretrained(LLAVA, device=torch.device("cpu"))
    assert not understanding.warnings, understanding.warnings

    def accuracy(model) -> float:
        answers = answer_questions(model, understanding.features, items, batch_size=32, max_new_tokens=4)
        return float(score_vqa(items, answers)["accuracy"])

    trained = accuracy(understanding.model)
    random = accuracy(_randomize(understanding.model))
    print(f"held-out colour/shape/count accuracy: shipped {trained:.1%}, random init {random:.1%} "
          f"({len(items)} questions)")
    assert trained > 0.4 and trained > random + 0.3  # chance is about 1/3 on the colour/shape/count mix at best
