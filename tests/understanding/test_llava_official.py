"""TokenFlow-LLaVA against the official code's own run.

`tests/data/official/llava` is a folder the official classes built and saved
(scripts/official_references.py): a tiny Qwen2 LLaVA whose vision tower is a tiny official
TokenFlow tokenizer (SigLIP teacher, K = 64), cast to bf16 and saved into the shards as
`model.vision_tower.vision_tower.*`, as the official trainer does. The script then ran the
official loader (`load_pretrained_model`, which replaces the tower with that embedded copy) and
recorded features, indices, first-step logits and greedy answers (`generate`, with the
folder's repetition_penalty 1.05): in fp32 (`llava_reference_fp32.npz`), as the loader runs it
in fp16, and with the fp32 `.pt` tower instead of the copy. The converted model must give the
fp32 run's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tokenflow_cli.tokenizer.config import PixelConfig, SemanticDecoderConfig
from tokenflow_cli.tokenizer.convert import ConversionError, variant_config
from tokenflow_cli.tokenizer.model import load_tokenizer
from tokenflow_cli.understanding.convert import convert_llava
from tokenflow_cli.understanding.data import load_llava_image
from tokenflow_cli.understanding.features import build_feature_source
from tokenflow_cli.understanding.model import LlavaModel

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official"
QUESTIONS = ["What color is the star?", "How many circles are there?", "Describe the image briefly."]  # the script's
TOWER = "siglip-official-tiny"  # the script's SigLIP: 3 layers x 64, patch 14 at 384
SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27)
IMAGE_TOKEN_INDEX = -200  # the official placeholder id in its prompt ids


def tiny_tokenizer_config():
    """The script's tokenizer as a recipe: the depths and widths the file cannot say, and K = 64,
    which a given recipe must state like the file does."""
    cfg = variant_config("siglip-384")
    pixel = PixelConfig(base_channels=32, channel_mult=(1, 1, 1, 1, 1), encoder_res_blocks=1, decoder_base_channels=32,
                        decoder_res_blocks=2, z_channels=32, norm_groups=32)
    return dataclasses.replace(
        cfg, name="official-tiny-siglip", pixel=pixel,
        semantic_encoder=dataclasses.replace(cfg.semantic_encoder, model_name=TOWER),
        teacher=dataclasses.replace(cfg.teacher, model_name=TOWER),
        quantizer=dataclasses.replace(cfg.quantizer, codebook_size=64),
        semantic_decoder=SemanticDecoderConfig(width=64, depth=3, heads=2, mlp_ratio=2.0, grid_size=27))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    from tokenflow_cli.tokenizer import semantic_towers

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(semantic_towers.SIGLIP_PRESETS, TOWER, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
            image_size=384, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6))
        root = tmp_path_factory.mktemp("llava_official")
        folder = shutil.copytree(OFFICIAL / "llava", root / "hub")
        report = convert_llava(folder, None, root / "out", tokenizer_config=tiny_tokenizer_config())
        refs = {name: dict(np.load(OFFICIAL / f"llava_reference_{name}.npz")) for name in ("fp32", "fp16", "pt_fp32")}
        images = []
        for i in range(2):
            images.append(root / f"image_{i}.png")
            Image.fromarray(refs["fp32"][f"image_{i}"]).save(images[-1])
        tok = load_tokenizer(str(root / "out" / "image_tokenizer.safetensors"))
        pixels = torch.stack([load_llava_image(p, tok.image_size) for p in images])
        yield {"root": root, "folder": folder, "out": root / "out", "report": report, "refs": refs, "tok": tok,
               "pixels": pixels}


def test_the_embedded_copy_is_the_image_tokenizer_in_its_stored_dtype(official):
    report, out = official["report"], official["out"]
    assert report.image_tokenizer.startswith("the embedded copy") and "bfloat16" in report.image_tokenizer
    with safe_open(str(out / "image_tokenizer.safetensors"), framework="pt") as fh:
        assert fh.get_slice("quantizer.semantic_codebook.weight").get_dtype() == "BF16"
    info = json.loads((out / "llava.json").read_text())
    assert info["tokenizer_source"] == "image_tokenizer.safetensors" and "embedded" in info["tokenizer_origin"]
    assert json.loads((out / "generation_config.json").read_text())["repetition_penalty"] == 1.05


@torch.no_grad()
def test_indices_and_features_equal_the_official_loader(official):
    ref, tok = official["refs"]["fp32"], official["tok"]
    indices = tok.img_to_codes(official["pixels"]).indices
    assert torch.equal(indices, torch.from_numpy(ref["indices"]))
    features = build_feature_source(tok, "tokenflow")(official["pixels"])
    torch.testing.assert_close(features, torch.from_numpy(ref["features"]), atol=2e-5, rtol=0)
    # the fp32 .pt the tower was built from gives other indices at the fine scales
    from_pt = torch.from_numpy(official["refs"]["pt_fp32"]["indices"])
    assert (from_pt[:, -27 * 27 :] != indices[:, -27 * 27 :]).float().mean() > 0.3


def _official_prompt(ids: list[int], image_id: int) -> list[int]:
    """Our prompt ids with the run of image placeholders as the official single -200."""
    out: list[int] = []
    for i in ids:
        if i == image_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(i)
    return out


@torch.no_grad()
def test_prompts_first_logits_and_greedy_answers_equal_the_official_generate(official):
    ref = official["refs"]["fp32"]
    model = LlavaModel.from_pretrained(official["out"], dtype=torch.float32).eval()
    assert model.decoding.repetition_penalty == 1.05 and set(model.decoding.eos_token_ids) == {0, 2}
    visual = build_feature_source(official["tok"], "tokenflow")(official["pixels"])
    row = 0
    for image in range(2):
        for question in QUESTIONS:
            ids_BT, mask_BT = model.prompt_batch([question])
            expected_prompt = [int(i) for i in ref["prompt_ids"][row] if i != -1]
            assert _official_prompt(ids_BT[0].tolist(), model.image_token_id) == expected_prompt
            logits = model(ids_BT, mask_BT, visual[image : image + 1]).logits[0, -1]
            expected = torch.from_numpy(ref["first_scores"][row])
            torch.testing.assert_close(logits, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
            answer = [int(t[0]) for t in model.generate_ids(ids_BT, mask_BT, visual[image : image + 1], 12)]
            assert answer == [int(i) for i in ref["answer_ids"][row] if i != -1], (image, question)
            row += 1


def _official_pt(official, path: Path, shift: float = 0.0) -> Path:
    """A `.pt` as the official trainer saves one, holding the embedded copy's values (in fp32)."""
    prefix = "model.vision_tower.vision_tower."
    with safe_open(str(official["folder"] / "model.safetensors"), framework="pt") as fh:
        state = {k[len(prefix) :]: fh.get_tensor(k).float() for k in fh.keys() if k.startswith(prefix)}  # noqa: SIM118
    state["quantize.embedding_vqkd.weight"] += shift
    torch.save({"model": state, "steps": 1}, path)
    return path


def test_a_given_tokenizer_is_measured_against_the_copy_and_only_overrides_when_asked(official, tmp_path):
    cfg = tiny_tokenizer_config()
    same = _official_pt(official, tmp_path / "same.pt")
    report = convert_llava(official["folder"], same, tmp_path / "a", tokenizer_config=cfg)
    note = next(n for n in report.notes if n.startswith("embedded copy vs same.pt"))
    assert "differ by up to 0 " in note and "27: 0%" in note
    assert report.image_tokenizer.startswith("the embedded copy")
    assert not (tmp_path / "a" / "given_tokenizer.safetensors").exists()  # only checked, not kept
    other = _official_pt(official, tmp_path / "other.pt", shift=1.0)
    with pytest.raises(ConversionError, match="not the tokenizer this model was trained with"):
        convert_llava(official["folder"], other, tmp_path / "b", tokenizer_config=cfg)
    report = convert_llava(official["folder"], other, tmp_path / "c", tokenizer_config=cfg, override_tokenizer=True)
    assert report.image_tokenizer.startswith("given: other.pt") and any("WARNING" in n for n in report.notes)
    assert json.loads((tmp_path / "c" / "llava.json").read_text())["tokenizer_source"] == "given_tokenizer.safetensors"


@torch.no_grad()
def test_dtype_fp16_gives_the_official_loaders_own_fp16_run(official):
    """`dtype="fp16"` (`--dtype fp16`) is the release as its loader runs it (builder.py:43: LM,
    projector and the tokenizer copy in float16, code search included). Given the official fp16
    features, the fp16 projector and LM give the official first-step logits (measured: exactly)
    and all greedy answers. Our own fp16 features: indices identical up to scale 14 (measured: 2
    of 4,454 differ, past scale 14), which moves the logits by up to 0.42 (std 3.6)
    and changes 2 of 6 answers of this chaotic tiny LM: the official side ran torch 2.12, whose
    CPU fp16 kernels round the SigLIP tower's outputs differently (pixel branch and quantizer
    are bit-identical given the same inputs; docs/CONVERT.md)."""
    from tokenflow_cli.understanding.pipeline import Understanding

    ref = official["refs"]["fp16"]
    vlm = Understanding.from_pretrained(official["out"], dtype="fp16")
    assert vlm.dtype == "fp16" and vlm.model.projector[0].weight.dtype == torch.float16
    visual, indices = vlm.features.encode(official["pixels"])
    assert visual.dtype == torch.float16 and visual.shape == (2, 729, 40)
    flips = indices != torch.from_numpy(ref["indices"])
    coarse = sum(s * s for s in SCALES[: SCALES.index(14) + 1])
    assert not flips[:, :coarse].any() and int(flips.sum()) <= 4
    official_visual = torch.from_numpy(ref["features"]).half()  # fp16 values, stored upcast
    row, same = 0, 0
    for image in range(2):
        for question in QUESTIONS:
            ids_BT, mask_BT = vlm.model.prompt_batch([question])
            expected_answer = [int(i) for i in ref["answer_ids"][row] if i != -1]
            logits = vlm.model(ids_BT, mask_BT, official_visual[image : image + 1]).logits[0, -1].float()
            torch.testing.assert_close(logits, torch.from_numpy(ref["first_scores"][row]), atol=1e-2, rtol=0)
            for source in (official_visual, visual):
                answer = [int(t[0]) for t in vlm.model.generate_ids(ids_BT, mask_BT, source[image : image + 1], 12)]
                assert answer == expected_answer or source is visual, (image, question)
            same += answer == expected_answer
            row += 1
    assert same >= 4
