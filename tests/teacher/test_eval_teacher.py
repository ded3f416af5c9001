"""Teacher: caption labels vs the scene metadata, a short train-teacher run whose file loads
through open_clip and the tokenizer's Teacher, and the zero-shot report."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tokenflow_cli.teacher.evaluate import attribute_labels, caption_groups, class_prompts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tokenflow_cli.data.shapes import render_shapes_world

    out = tmp_path_factory.mktemp("world")
    render_shapes_world(out, 36, seed=3, size=64)
    return out


def test_caption_groups_match_scene_objects(world):
    captions = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    scenes = [json.loads(line) for line in (world / "geneval.jsonl").read_text().splitlines()]
    for cap, scene in zip(captions, scenes, strict=True):
        from_caption = Counter()
        for count, color, shape in caption_groups(cap["caption"]):
            from_caption[(color, shape)] += count
        assert from_caption == Counter((o["color"], o["shape"]) for o in scene["objects"]), cap["caption"]


def test_attribute_labels():
    assert attribute_labels("an orange star at the top left on a noisy beige background") == {
        "colour": "orange", "shape": "star", "count": 1}
    assert attribute_labels("three small green squares on a grey background") == {
        "colour": "green", "shape": "square", "count": 3}
    assert attribute_labels("a red circle left of a red square on a grey background") == {"colour": "red"}
    assert attribute_labels("a photo") == {}
    prompts = class_prompts()
    assert set(prompts["count"]) == {1, 2, 3, 4} and len(prompts["colour"]) == 8
    assert all(attribute_labels(p)["shape"] == s for s, phrases in prompts["shape"].items() for p in phrases)


def test_train_teacher_file_loads_as_tokenizer_teacher(world, tmp_path):
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.teacher.config import TeacherRecipe
    from tokenflow_cli.teacher.evaluate import load_clip, zero_shot_report
    from tokenflow_cli.teacher.stage import publish_teacher, train_teacher
    from tokenflow_cli.tokenizer.config import SemanticEncoderConfig, TeacherConfig, TokenizerRecipe
    from tokenflow_cli.tokenizer.semantic import Teacher

    recipe = load_recipe("teacher-tiny", TeacherRecipe, overrides=[
        f"data.captions={world / 'captions.jsonl'}", "data.val_size=4", "train.steps=2", "train.batch_size=8",
        "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1", "eval.batch_size=4"])
    publish = tmp_path / "published" / "teacher.safetensors"
    result = train_teacher(recipe, tmp_path / "run", device="cpu", live=False)
    assert result.step == 2 and 0 <= result.last_eval["i2t_top1"] <= 1 and not publish.exists()
    weights = tmp_path / "run" / "model.safetensors"
    assert publish_teacher(tmp_path / "run", publish, steps=2) == publish
    assert publish.read_bytes() == weights.read_bytes()

    clip = load_clip(str(tmp_path / "run"))
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    assert torch.equal(clip.model.visual.conv1.weight, saved["visual.conv1.weight"])

    tiny = load_recipe("tiny", TokenizerRecipe).model
    teacher = Teacher(TeacherConfig(**{**tiny.teacher.__dict__, "pretrained": str(weights)}),
                      SemanticEncoderConfig(**tiny.semantic_encoder.__dict__))
    assert not teacher.random_init and teacher.dim == 64
    assert torch.equal(teacher.tower.conv1.weight, saved["visual.conv1.weight"])

    report = zero_shot_report(clip, world / "captions.jsonl", torch.device("cpu"), batch_size=16)
    assert set(report["tasks"]) == {"colour", "shape", "count"}
    for row in report["tasks"].values():
        assert row["n"] > 0 and 0 <= row["accuracy"] <= 1 and 0 <= row["balanced_accuracy"] <= 1


def test_registered_teacher_name_resolves(tmp_path, monkeypatch):
    from tokenflow_cli.weights import MissingWeightsError, resolve_open_clip_weights

    monkeypatch.setenv("TOKENFLOW_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="train-teacher"):
        resolve_open_clip_weights("tokenflow-tiny-vit", "teacher-tiny", "model.teacher")
    target = tmp_path / "weights" / "teacher-tiny.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert resolve_open_clip_weights("tokenflow-tiny-vit", "teacher-tiny", "model.teacher").path == target
