"""Data: image sources, robust loading, transforms, dataset, shapes world, detector, crops, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow_cli.data.captions import export_llava, load_captions, read_jsonl
from tokenflow_cli.data.dataset import ImageDataset, collate_skip_bad
from tokenflow_cli.data.images import (
    ImageLoadError,
    ImageSourceError,
    from_tensor_pm1,
    list_images,
    load_image,
    resize_center_crop,
    to_tensor_pm1,
)
from tokenflow_cli.data.shapes import TAGS, detect_shapes, geneval_prompts, render_shapes_world
from tokenflow_cli.data.shapes_scene import BACKGROUNDS

RED = (200, 30, 40)


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


# ---------------------------------------------------------------------------------------------
# Sources


def test_list_images_folder_glob_list_and_jsonl(tmp_path):
    a = _save(tmp_path / "imgs" / "b.png", Image.new("RGB", (4, 4)))
    b = _save(tmp_path / "imgs" / "sub" / "a.JPG", Image.new("RGB", (4, 4)))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert list_images(tmp_path / "imgs") == sorted([a, b])
    assert list_images(str(tmp_path / "imgs" / "**" / "*.png")) == [a]
    (tmp_path / "list.txt").write_text("# training images\n\nimgs/sub/a.JPG\nimgs/b.png\n")
    assert list_images(tmp_path / "list.txt") == [b, a]  # list order kept, relative to the list
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "imgs/b.png", "caption": "x"}) + "\n")
    assert list_images(tmp_path / "caps.jsonl") == [a]
    assert list_images(a) == [a]


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ImageSourceError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(ImageSourceError, match="pattern"):
        list_images(str(tmp_path / "*.png"))
    (tmp_path / "bad.jsonl").write_text('{"caption": "no image field"}\n')
    with pytest.raises(ImageSourceError, match="bad.jsonl:1"):
        list_images(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_grey_palette_and_alpha(tmp_path):
    grey = load_image(_save(tmp_path / "grey.png", Image.new("L", (3, 3), 77)))
    assert grey.mode == "RGB" and _pixel(grey) == (77, 77, 77)

    palette = Image.new("P", (2, 1))
    palette.putpalette([*RED, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    loaded = load_image(_save(tmp_path / "p.png", palette, transparency=1))
    assert _pixel(loaded, (0, 0)) == RED and _pixel(loaded, (1, 0)) == (255, 255, 255)

    rgba = Image.new("RGBA", (3, 1), (*RED, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black on white: mid grey
    loaded = load_image(_save(tmp_path / "rgba.png", rgba))
    assert _pixel(loaded, (0, 0)) == RED and _pixel(loaded, (1, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in _pixel(loaded, (2, 0)))

    la = load_image(_save(tmp_path / "la.png", Image.new("LA", (2, 2), (10, 0))))
    assert _pixel(la) == (255, 255, 255)


def test_load_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    loaded = load_image(_save(tmp_path / "cmyk.jpg", cmyk, quality=95))
    r, g, b = _pixel(loaded, (4, 4))
    assert r > 230 and g < 25 and b < 25


def test_load_high_bit_depth_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    loaded = load_image(_save(tmp_path / "16.png", Image.fromarray(values)))
    assert np.asarray(loaded)[0, :, 0].tolist() == [0, 4, 128, 255]

    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert np.asarray(load_image(_save(tmp_path / "i.tif", as_int32)))[0, :, 1].tolist() == [0, 4, 128, 255]

    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_image(_save(tmp_path / "f.tif", floats)))[0, :, 2].tolist() == [0, 128, 255]


def test_load_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (4, 2), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    loaded = load_image(_save(tmp_path / "rot.jpg", img, exif=exif.tobytes()))
    assert loaded.size == (2, 4)


def test_load_rejects_corrupt_truncated_and_missing(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "text.jpg").write_text("hello")
    noisy = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    good = _save(tmp_path / "good.png", Image.fromarray(noisy))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ("junk.png", "text.jpg", "cut.png", "missing.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(tmp_path / name)
        assert info.value.path.endswith(name) and info.value.reason


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("width,height", [(300, 200), (64, 64), (50, 80), (129, 1000), (128, 128)])
def test_resize_center_crop_size(width, height):
    assert resize_center_crop(Image.new("RGB", (width, height)), 64).size == (64, 64)


def test_resize_center_crop_keeps_the_centre():
    # Columns coloured by x: the crop of a wide image must come from its middle.
    ramp = np.tile(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], (100, 1, 3))
    crop = np.asarray(resize_center_crop(Image.fromarray(ramp), 50)).astype(float)
    assert abs(crop[:, 25, 0].mean() - 127.5) < 4
    assert 90 < crop[:, 0, 0].mean() < 100 and 155 < crop[:, -1, 0].mean() < 165  # columns 150..250


def test_resize_center_crop_halves_with_box_filter_first():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(300, 520, 3), dtype=np.uint8))
    halved = img.resize((260, 150), Image.BOX).resize((130, 75), Image.BOX)  # 75 < 2 * 64 stops
    expected = halved.resize((111, 64), Image.BICUBIC).crop((23, 0, 87, 64))
    assert np.array_equal(np.asarray(resize_center_crop(img, 64)), np.asarray(expected))


def test_tensor_round_trip_is_exact():
    rng = np.random.default_rng(2)
    hwc = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    t = to_tensor_pm1(Image.fromarray(hwc))
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert np.array_equal(from_tensor_pm1(t), hwc)
    assert from_tensor_pm1(torch.stack([t, t * 5])).shape == (2, 5, 7, 3)  # batched, clamped
    assert from_tensor_pm1(torch.full((3, 1, 1), 7.0)).max() == 255
    # The official byte conversion rounds half up: 0.0 -> 127.5 -> 128, not 127.
    assert from_tensor_pm1(torch.zeros(3, 1, 1)).tolist() == [[[128, 128, 128]]]


# ---------------------------------------------------------------------------------------------
# Dataset


def _mixed_folder(root: Path) -> tuple[list[Path], Path]:
    paths = [_save(root / f"{i}.png", Image.new("RGB", (40 + 10 * i, 30), RED)) for i in range(3)]
    bad = root / "3_bad.png"
    bad.write_bytes(b"not a png")
    return sorted(paths + [bad]), bad


def test_dataset_skips_bad_files(tmp_path):
    paths, bad = _mixed_folder(tmp_path)
    dataset = ImageDataset(paths, size=16, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_skip_bad)
    (batch,) = list(loader)
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["skipped"] == [str(bad)] and batch["errors"][0]
    assert batch["index"].tolist() == [0, 1, 2] and len(batch["path"]) == 3
    assert collate_skip_bad([dataset[3]])["image"] is None
    with pytest.raises(ImageLoadError):
        ImageDataset(paths, size=16, strict=True)[3]


def test_dataset_train_mode_crops_and_flips(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 48).astype(np.uint8)[None, :, None], (48, 1, 3))
    path = _save(tmp_path / "ramp.png", Image.fromarray(ramp))
    plain = ImageDataset([path], size=24, train=False)[0]["image"]
    full_crop = ImageDataset([path], size=24, train=True, crop_scale=(1.0, 1.0))
    torch.manual_seed(0)
    seen = {bool(torch.equal(full_crop[0]["image"], plain)) for _ in range(16)}
    assert seen == {True, False}  # sometimes flipped, sometimes not
    torch.manual_seed(0)
    assert torch.equal(full_crop[0]["image"].flip(-1), plain) or torch.equal(full_crop[0]["image"], plain)
    random_crop = ImageDataset([path], size=24, train=True, crop_scale=(0.3, 0.5), hflip=False)[0]["image"]
    assert random_crop.shape == (3, 24, 24) and not torch.equal(random_crop, plain)


# ---------------------------------------------------------------------------------------------
# Shapes world


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = render_shapes_world(out, 24, seed=3, size=64, llava=True)
    return out, summary


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_world_is_deterministic(tmp_path):
    render_shapes_world(tmp_path / "a", 12, seed=0, size=32)
    render_shapes_world(tmp_path / "b", 12, seed=0, size=32)
    render_shapes_world(tmp_path / "c", 12, seed=1, size=32)
    render_shapes_world(tmp_path / "d", 6, seed=0, size=32)
    a, b, c, d = (_all_bytes(tmp_path / name) for name in "abcd")
    assert a == b
    assert all(a[name] != c[name] for name in a if name.startswith("images/"))
    assert all(d[name] == a[name] for name in d if name.startswith("images/"))  # n extends, same images


def _relation(box_a: list[float], box_b: list[float]) -> set[str]:
    """GenEval's rule: A relative to B, with a dead zone of 0.1 x the summed box sizes."""
    a, b = np.array(box_a).reshape(2, 2), np.array(box_b).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    revised = np.maximum(np.abs(offset) - 0.1 * ((a[1] - a[0]) + (b[1] - b[0])), 0) * np.sign(offset)
    dx, dy = revised / np.linalg.norm(offset)
    return {
        name
        for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
        if hit
    }


def _geneval_true(record: dict) -> bool:
    groups = []
    for req in record["include"]:
        found = [o for o in record["objects"] if o["shape"] == req["class"]]
        if "color" in req:
            found = [o for o in found if o["color"] == req["color"]]
        if len(found) < req["count"]:
            return False
        if "position" in req:
            relation, target = req["position"]
            if not all(relation in _relation(o["bbox"], t["bbox"]) for o in found for t in groups[target]):
                return False
        groups.append(found)
    return all(
        sum(o["shape"] == req["class"] for o in record["objects"]) < req["count"] for req in record.get("exclude", [])
    )


def test_shapes_files_agree_with_the_scene(shapes_world):
    out, summary = shapes_world
    captions, vqa, geneval = (read_jsonl(out / f"{name}.jsonl") for name in ("captions", "vqa", "geneval"))
    assert len(captions) == len(geneval) == summary.n_images == 24 and len(vqa) == summary.n_vqa
    assert Counter(r["tag"] for r in geneval) == Counter({tag: 4 for tag in TAGS})
    by_image = {r["image"]: r for r in geneval}
    for caption, record in zip(captions, geneval, strict=True):
        assert Image.open(out / record["image"]).size == (64, 64)
        assert caption["prompt"] == record["prompt"] and record["prompt"].startswith("a photo of ")
        assert 1 <= len(record["objects"]) <= 4 and _geneval_true(record)
        for obj in record["objects"]:
            assert obj["color"] in caption["caption"] and obj["shape"] in caption["caption"]
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert record["background"] in BACKGROUNDS and record["background"] in caption["caption"]
    for qa in vqa:
        objects, kind = by_image[qa["image"]]["objects"], qa["type"]
        if kind == "count" and qa["question"] == "How many shapes are there?":
            assert qa["answer"] == str(len(objects))
        elif kind == "count":
            shape = qa["question"].split()[2][:-1]
            assert qa["answer"] == str(sum(o["shape"] == shape for o in objects))
        elif kind == "color":
            shape = qa["question"].rstrip("?").split()[-1]
            assert [o["color"] for o in objects if o["shape"] == shape] == [qa["answer"]]
        elif kind == "exists":
            color, shape = qa["question"].rstrip("?").split()[-2:]
            assert (qa["answer"] == "yes") == any((o["color"], o["shape"]) == (color, shape) for o in objects)
        elif kind == "background":
            assert qa["answer"] == by_image[qa["image"]]["background"]
    assert set(summary.vqa_types) >= {"count", "color", "shape", "position", "size", "exists", "background"}


def test_detector_recovers_rendered_objects(shapes_world):
    out, _ = shapes_world
    records = read_jsonl(out / "geneval.jsonl")
    exact = 0
    for record in records:
        found = detect_shapes(np.asarray(Image.open(out / record["image"])))
        want = Counter((o["color"], o["shape"], o["size"]) for o in record["objects"])
        exact += Counter((o["color"], o["shape"], o["size"]) for o in found) == want
    assert exact / len(records) >= 0.9
    plain = np.full((64, 64, 3), BACKGROUNDS["grey"], dtype=np.uint8)
    assert detect_shapes(plain) == []


def test_detector_boxes_match_the_metadata(shapes_world):
    out, _ = shapes_world
    record = read_jsonl(out / "geneval.jsonl")[4]  # a position scene: two objects
    found = detect_shapes(Image.open(out / record["image"]))
    for obj in record["objects"]:
        match = min(found, key=lambda d: np.hypot(*np.subtract(d["center"], obj["center"])))
        assert (match["color"], match["shape"]) == (obj["color"], obj["shape"])
        assert np.abs(np.subtract(match["bbox"], obj["bbox"])).max() < 1.5


def test_geneval_prompts_schema():
    prompts = geneval_prompts(seed=0, n_per_tag=5)
    tags = Counter(p["tag"] for p in prompts)
    assert tags["single_object"] == 4 and all(tags[t] == 5 for t in TAGS if t != "single_object")
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert "image" not in p and p["include"]
        if p["tag"] == "counting":
            assert p["exclude"] == [{"class": p["include"][0]["class"], "count": p["include"][0]["count"] + 1}]
        if p["tag"] == "position":
            assert p["include"][1]["position"][1] == 0 and p["include"][1]["position"][0] in p["prompt"]
    assert geneval_prompts(seed=0, n_per_tag=5) == prompts


def test_llava_export_paths_resolve(shapes_world, tmp_path):
    out, summary = shapes_world
    local = json.loads((out / "llava.json").read_text())
    assert len(local) == summary.n_vqa
    first = local[0]["conversations"]
    assert first[0]["from"] == "human" and first[0]["value"].startswith("<image>\n") and first[1]["from"] == "gpt"
    assert export_llava(out / "vqa.jsonl", tmp_path / "elsewhere" / "llava.json") == summary.n_vqa
    moved = json.loads((tmp_path / "elsewhere" / "llava.json").read_text())
    assert (tmp_path / "elsewhere" / moved[0]["image"]).resolve() == (out / local[0]["image"]).resolve()
    pairs = load_captions(out / "captions.jsonl")
    assert pairs[0][0] == out / "images" / "000000.png" and pairs[0][1]
    # about half the colour questions spell "colour" (`ask ... "What colour ..."` is in distribution)
    humans = [c["conversations"][0]["value"] for c in local]
    british, american = sum("colour" in h for h in humans), sum("color " in h for h in humans)
    assert 0.25 < british / (british + american) < 0.75 and "colour" not in (out / "vqa.jsonl").read_text()
    export_llava(out / "vqa.jsonl", tmp_path / "us" / "llava.json", colour_share=0.0)
    assert "colour" not in (tmp_path / "us" / "llava.json").read_text()


# ---------------------------------------------------------------------------------------------
# Natural crops


def test_natural_crops_sizes_and_disjoint_splits(tmp_path):
    from tokenflow_cli.data.natural import VAL_PHOTOS, natural_crops

    train = natural_crops(tmp_path / "train", 5, size=32, seed=0, split="train")
    val = natural_crops(tmp_path / "val", 4, size=32, seed=0, split="val")
    assert set(train.photos_used).isdisjoint(VAL_PHOTOS) and set(val.photos_used) <= set(VAL_PHOTOS)
    for summary, n in ((train, 5), (val, 4)):
        records = read_jsonl(summary.out_dir / "captions.jsonl")
        assert len(records) == n and sum(summary.photos_used.values()) == n
        for record in records:
            assert load_image(summary.out_dir / record["image"]).size == (32, 32)
            assert record["caption"] == "a photo"
    with pytest.raises(ValueError, match="split"):
        natural_crops(tmp_path / "x", 1, split="test")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_data_commands(tmp_path, cli_error):
    from typer.testing import CliRunner

    import tokenflow_cli.cli.app  # noqa: F401  (registers every command)
    from tokenflow_cli.cli.common import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "shapes", "-n", "6", "-o", str(tmp_path / "s"), "--size", "32", "--llava"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 6
    assert (tmp_path / "s" / "llava.json").exists() and "VQA pairs" in result.output
    result = runner.invoke(app, ["data", "natural", "-n", "3", "-o", str(tmp_path / "n"), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "n" / "captions.jsonl")) == 3
    result = runner.invoke(app, ["data", "natural", "-n", "3", "-o", str(tmp_path / "m"), "--split", "test"])
    assert result.exit_code != 0
    cli_error(result, "--split", "'test'", code=1)
    assert not (tmp_path / "m").exists()
