import json

import numpy as np
import pytest

from tokenflow_cli.tokenizer.codes import find_shards, merge_codes, read_codes, shard_name, write_codes

SCALES = (1, 2, 4)


def _indices(n, seed=0):
    return np.random.default_rng(seed).integers(0, 1024, size=(n, 21), dtype=np.int32)


def test_round_trip_exact(tmp_path):
    idx = _indices(5)
    paths = [f"img/{i}.png" for i in range(5)]
    write_codes(tmp_path / "c.npz", idx, SCALES, paths, {"codebook_size": 1024, "resolution": 64})
    codes = read_codes(tmp_path / "c.npz")
    assert np.array_equal(codes.indices, idx) and codes.indices.dtype == np.int32
    assert codes.scales == SCALES and list(codes.paths) == paths
    assert codes.meta["codebook_size"] == 1024 and "tool_version" in codes.meta
    # per-scale views, row-major, coarse to fine
    assert np.array_equal(codes.per_scale(0)[:, 0, 0], idx[:, 0])
    assert np.array_equal(codes.per_scale(1).reshape(5, 4), idx[:, 1:5])
    assert np.array_equal(codes.per_scale(2)[:, 1, 2], idx[:, 5 + 4 + 2])


def test_file_is_plain_npz_without_pickle(tmp_path):
    write_codes(tmp_path / "c.npz", _indices(2), SCALES, ["a", "b"], {})
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:
        assert set(data.files) == {"indices", "scales", "paths", "meta"}
        assert data["paths"].dtype.kind == "U"
        json.loads(str(data["meta"]))


def test_width_mismatch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="scales"):
        write_codes(tmp_path / "c.npz", np.zeros((2, 20), np.int32), SCALES, ["a", "b"])


def test_shards_merge_in_rank_order(tmp_path):
    out = tmp_path / "codes.npz"
    for rank in range(3):
        write_codes(
            shard_name(out, rank, 3),
            _indices(2, rank),
            SCALES,
            [f"r{rank}_{i}" for i in range(2)],
            {"codebook_size": 1024},
        )
    shards = find_shards(out)
    assert [p.name for p in shards] == [f"codes-0000{r}-of-00003.npz" for r in range(3)]
    merged = merge_codes(shards, out, delete=True)
    assert len(merged) == 6 and list(merged.paths[:2]) == ["r0_0", "r0_1"]
    assert np.array_equal(merged.indices[2:4], _indices(2, 1))
    assert not find_shards(out)


def test_no_partial_file_on_failure(tmp_path):
    with pytest.raises(ValueError):
        write_codes(tmp_path / "c.npz", _indices(2), SCALES, ["only-one"])
    assert list(tmp_path.iterdir()) == []


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os

    write_codes(tmp_path / "c.npz", _indices(1), SCALES, ["a"], {})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
