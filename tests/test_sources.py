"""Image sources: webdataset tar shards and Hugging Face datasets (saved to disk, parquet) give
the same images as the files they were made from; undecodable samples are reported like bad
files; a missing shard or image column is one clear error."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pytest
import torch
import webdataset as wds
from PIL import Image

from tokenflow_cli.data.images import ImageSourceError
from tokenflow_cli.data.sources import DatasetSource, FileSource, TarSource, decode_batch, open_source


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(6):
        path = root / f"im{i}.png"
        Image.new("RGB", (20 + i, 16), (40 * i, 255 - 30 * i, 7)).save(path)
        paths.append(path)
    return paths


def _decoded(source, size: int = 16):
    batch = decode_batch(list(source.items()), size)
    return batch.images, batch.keys, batch.failures


def test_tar_shards_with_brace_patterns_match_the_files(pngs, tmp_path):
    for k in range(2):
        with wds.TarWriter(str(tmp_path / f"part-{k:03d}.tar")) as sink:
            for path in pngs[3 * k : 3 * k + 3]:
                sink.write({"__key__": path.stem, "png": path.read_bytes(), "json": b"{}"})
            sink.write({"__key__": f"bad{k}", "jpg": b"not a jpeg"})
    source = open_source(str(tmp_path / "part-{000..001}.tar"))
    assert isinstance(source, TarSource) and source.count is None
    images, keys, failures = _decoded(source)
    reference, _, _ = _decoded(FileSource("files", pngs))
    assert torch.equal(images, reference)
    assert keys[:2] == ["part-000.tar#im0", "part-000.tar#im1"]
    assert [key for key, _ in failures] == ["part-000.tar#bad0", "part-001.tar#bad1"]
    assert list(open_source(str(tmp_path)).items(start=4))[0].key == "part-001.tar#im3"  # a folder of shards


def test_a_truncated_tar_is_reported_and_the_next_shard_still_read(pngs, tmp_path):
    for name in ("a", "full"):  # keys are unique across shards, as webdataset expects
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
            for path in pngs:
                sink.write({"__key__": f"{name}-{path.stem}", "png": path.read_bytes()})
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:2500])
    _, keys, failures = _decoded(open_source(str(tmp_path / "{cut,a}.tar")))
    assert any(key == "cut.tar" and "truncated tar" in why for key, why in failures), failures
    assert [k for k in keys if k.startswith("a.tar")] == [f"a.tar#a-{p.stem}" for p in pngs]


def test_a_missing_tar_shard_is_one_error(tmp_path):
    with pytest.raises(ImageSourceError, match="missing.tar does not exist"):
        open_source(str(tmp_path / "missing.tar"))


def _dataset(pngs: list[Path]) -> datasets.Dataset:
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int32")})
    cells = [{"bytes": p.read_bytes(), "path": None} for p in pngs] + [{"bytes": b"broken", "path": None}]
    return datasets.Dataset.from_dict({"picture": cells, "label": list(range(len(cells)))}, features=features)


def test_datasets_saved_to_disk_and_parquet_match_the_files(pngs, tmp_path):
    ds = _dataset(pngs)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    reference, _, _ = _decoded(FileSource("files", pngs))
    for spec in (tmp_path / "saved", tmp_path / "rows.parquet"):
        source = open_source(spec)
        assert isinstance(source, DatasetSource) and source.column == "picture" and source.count == 7
        images, keys, failures = _decoded(source)
        assert torch.equal(images, reference), spec
        assert [key for key, _ in failures] == [f"{Path(spec).name}#6"]
    assert [item.key for item in open_source(tmp_path / "saved").items(start=5)] == ["saved#5", "saved#6"]


def test_a_dataset_without_an_image_column_names_its_columns(tmp_path):
    datasets.Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ImageSourceError, match="no image column .*text.*--image-column"):
        open_source(tmp_path / "t.parquet")
    with pytest.raises(ImageSourceError, match="no column 'img'"):
        open_source(tmp_path / "t.parquet", image_column="img")


def test_bytes_and_files_decode_alike(pngs):
    buffer = io.BytesIO(pngs[0].read_bytes())
    from tokenflow_cli.data.images import load_image

    assert load_image(buffer.getvalue(), name="x").tobytes() == load_image(pngs[0]).tobytes()
