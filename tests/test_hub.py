"""The hub-folder reader: every weights layout gives the same tensors in the stored dtype, and
every broken folder is one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tokenflow_cli.hub import HubFolderError, iter_shards, iter_tensors, open_hub_folder


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=gen).to(torch.bfloat16),
        "a.bias": torch.randn(4, generator=gen),
        "b.weight": torch.randn(2, 2, generator=gen).to(torch.float16),
    }


def _write(root: Path, layout: str, state: dict[str, torch.Tensor]) -> Path:
    """A hub-style folder: config.json plus the weights in `layout`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (root / "tokenizer.json").write_text("{}")
    suffix = "safetensors" if layout.startswith("safetensors") else "bin"
    stem = "model" if suffix == "safetensors" else "pytorch_model"

    def save(part: dict[str, torch.Tensor], name: str) -> None:
        if suffix == "safetensors":
            save_file(part, str(root / name))
        else:
            torch.save(part, root / name)

    if layout.endswith("single"):
        save(state, f"{stem}.{suffix}")
        return root
    keys = list(state)
    shards = {f"{stem}-00001-of-00002.{suffix}": keys[:2], f"{stem}-00002-of-00002.{suffix}": keys[2:]}
    for name, part in shards.items():
        save({k: state[k] for k in part}, name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (root / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.mark.parametrize("layout", ["safetensors-single", "safetensors-sharded", "bin-single", "bin-sharded"])
def test_every_layout_gives_the_same_tensors_in_the_stored_dtype(tmp_path, layout):
    state = _state()
    folder = open_hub_folder(_write(tmp_path / layout, layout, state))
    assert folder.config == {"model_type": "toy"}
    assert folder.format == layout.split("-")[0]
    assert set(folder.tokenizer_files) == {"tokenizer.json"}
    assert (folder.weight_map is None) == layout.endswith("single")
    got = dict(iter_tensors(folder))
    assert set(got) == set(state)
    for key, value in state.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value)


def test_shards_come_one_at_a_time(tmp_path):
    folder = open_hub_folder(_write(tmp_path / "f", "safetensors-sharded", _state()))
    assert [(p.name, [k for k, _ in tensors]) for p, tensors in iter_shards(folder)] == [
        ("model-00001-of-00002.safetensors", ["a.bias", "a.weight"]),
        ("model-00002-of-00002.safetensors", ["b.weight"]),
    ]


def test_a_missing_shard_names_the_file(tmp_path):
    root = _write(tmp_path / "f", "bin-sharded", _state())
    (root / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(HubFolderError, match="pytorch_model-00002-of-00002.bin not found"):
        open_hub_folder(root)


def test_a_tensor_the_index_lists_but_its_shard_lacks_names_both(tmp_path):
    root = _write(tmp_path / "f", "safetensors-sharded", _state())
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["c.weight"] = "model-00002-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HubFolderError, match=r"model-00002-of-00002.safetensors lacks 'c.weight'"):
        list(iter_tensors(open_hub_folder(root)))


def test_a_tensor_missing_from_the_index_is_an_error(tmp_path):
    root = _write(tmp_path / "f", "safetensors-sharded", _state())
    index = json.loads((root / "model.safetensors.index.json").read_text())
    del index["weight_map"]["a.bias"]
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HubFolderError, match=r"holds 'a.bias', which the index does not list"):
        list(iter_tensors(open_hub_folder(root)))


@pytest.mark.parametrize("layout", ["safetensors-single", "bin-single"])
def test_a_truncated_weights_file_names_the_file(tmp_path, layout):
    root = _write(tmp_path / "f", layout, _state())
    weights = next(p for p in root.iterdir() if p.suffix in {".safetensors", ".bin"})
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(HubFolderError, match=weights.name) as info:
        list(iter_tensors(open_hub_folder(root)))
    assert "\n" not in str(info.value)


def test_a_bin_that_would_run_code_is_refused(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    (root / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1), "fn": print}, root / "pytorch_model.bin")
    with pytest.raises(HubFolderError, match="weights_only refused it"):
        list(iter_tensors(open_hub_folder(root)))


def test_missing_or_broken_config_and_no_weights(tmp_path):
    with pytest.raises(HubFolderError, match="is not a folder"):
        open_hub_folder(tmp_path / "nowhere")
    root = tmp_path / "f"
    root.mkdir()
    with pytest.raises(HubFolderError, match="config.json not found"):
        open_hub_folder(root)
    (root / "config.json").write_text("{not json")
    with pytest.raises(HubFolderError, match="config.json is not valid JSON"):
        open_hub_folder(root)
    (root / "config.json").write_text("{}")
    with pytest.raises(HubFolderError, match="holds no weights"):
        open_hub_folder(root)


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-sharded"])
def test_shapes_come_from_the_headers_and_match_the_tensors(tmp_path, layout):
    from tokenflow_cli.hub import tensor_shapes

    state = _state()
    folder = open_hub_folder(_write(tmp_path / layout, layout, state))
    infos = tensor_shapes(folder)
    assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()
    }
    assert infos["b.weight"].shard.endswith(f"00002-of-00002.{folder.format}")
