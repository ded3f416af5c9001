"""Top-k / top-p filters, schedules, guidance ramp."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenflow_cli.generation.sampling import (
    SamplingPass,
    cfg_strength,
    filter_logits,
    get_schedule,
    guide,
    list_schedules,
    parse_schedule,
    sample_codes,
    schedule_from_pairs,
    top_k_keep,
    top_p_keep,
)


def _kept(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


def test_top_k_keeps_the_k_largest_with_index_tie_break() -> None:
    logits = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.0, -3.0])
    assert _kept(top_k_keep(logits, 1)) == {1}  # tie 1 vs 3: lower index
    assert _kept(top_k_keep(logits, 2)) == {1, 3}
    assert _kept(top_k_keep(logits, 3)) == {1, 3, 2}  # tie 2 vs 4: lower index
    assert _kept(top_k_keep(logits, 4)) == {1, 2, 3, 4}
    assert _kept(top_k_keep(logits, 0)) == set(range(6))  # off
    assert _kept(top_k_keep(logits, 99)) == set(range(6))


def test_top_k_matches_brute_force_on_random_rows() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (20, 9), generator=g).float()  # many ties
    for k in range(1, 9):
        keep = top_k_keep(logits, k)
        assert (keep.sum(-1) == k).all()
        for row, kept in zip(logits.tolist(), keep.tolist(), strict=True):
            ranked = sorted(range(9), key=lambda i, row=row: (-row[i], i))[:k]
            assert {i for i, on in enumerate(kept) if on} == set(ranked)


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([0.1, 0.4, 0.3, 0.2])
    logits = probs.log()
    assert _kept(top_p_keep(logits, 0.35)) == {1}
    assert _kept(top_p_keep(logits, 0.4)) == {1}  # 0.4 reaches p exactly
    assert _kept(top_p_keep(logits, 0.45)) == {1, 2}
    assert _kept(top_p_keep(logits, 0.85)) == {1, 2, 3}
    assert _kept(top_p_keep(logits, 0.95)) == {0, 1, 2, 3}
    assert _kept(top_p_keep(logits, 1e-9)) == {1}  # always at least one
    assert _kept(top_p_keep(logits, 0.0)) == {0, 1, 2, 3}  # off
    assert _kept(top_p_keep(logits, 1.0)) == {0, 1, 2, 3}


def test_top_p_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 7, generator=g) * 2
    for p in (0.1, 0.5, 0.8, 0.99):
        keep = top_p_keep(logits, p)
        probs = torch.softmax(logits, -1)
        for row, kept in zip(probs.tolist(), keep.tolist(), strict=True):
            order = sorted(range(7), key=lambda i, row=row: (-row[i], i))
            n = next(n for n in range(1, 8) if sum(row[i] for i in order[:n]) >= p - 1e-7)
            assert {i for i, on in enumerate(kept) if on} == set(order[:n])


def test_top_k_then_top_p_on_survivors() -> None:
    logits = torch.tensor([3.0, 2.9, 2.8, -10.0, 0.0])
    out = filter_logits(logits, top_k=2, top_p=0.5)
    # among the two survivors 3.0 has probability ~0.525 >= 0.5 -> only it remains
    assert _kept(torch.isfinite(out)) == {0}
    assert _kept(torch.isfinite(filter_logits(logits, top_k=3, top_p=0.0))) == {0, 1, 2}


def test_sampling_stays_inside_the_kept_set_and_is_seeded() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(2))
    sp = SamplingPass(5, 0.9)
    a = sample_codes(logits, sp, generator=torch.Generator().manual_seed(3))
    b = sample_codes(logits, sp, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    keep = top_k_keep(logits, 5) & top_p_keep(filter_logits(logits, 5), 0.9)
    assert keep.gather(-1, a[:, None]).all()


def test_greedy_pass_is_argmax_and_draws_nothing() -> None:
    logits = torch.randn(4, 3, 10)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(sample_codes(logits, SamplingPass(1, 0.0), generator=g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_schedules_and_presets() -> None:
    assert parse_schedule("1200:0.8,100:0.8,1:0") == (
        SamplingPass(1200, 0.8), SamplingPass(100, 0.8), SamplingPass(1, 0.0))
    presets = list_schedules()
    assert presets["one-pass"] == (SamplingPass(600, 0.6),)
    assert presets["two-pass"] == (SamplingPass(1200, 0.8), SamplingPass(1, 0.0))
    assert presets["three-pass"] == get_schedule("1200:0.8,100:0.8,1:0")
    assert schedule_from_pairs([(1200, None), (100, None), (None, None)]) == (
        SamplingPass(1200, 0.0), SamplingPass(100, 0.0))
    for bad in ("1200", "a:b", "", "1:2:3"):
        with pytest.raises(ValueError):
            get_schedule(bad)


def test_cfg_ramp() -> None:
    assert [cfg_strength(4.0, si, 5) for si in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    cond, uncond = torch.randn(3, 8), torch.randn(3, 8)
    for si, n in itertools.product(range(4), (4,)):
        t = cfg_strength(2.0, si, n)
        torch.testing.assert_close(guide(cond, uncond, t), (1 + t) * cond - t * uncond)
    assert torch.equal(guide(cond, uncond, 0.0), cond)


def test_draws_follow_the_filtered_softmax() -> None:
    logits = torch.tensor([1.0, 2.0, 0.5, 2.0, 1.5, -1.0])  # tie at 2.0
    sp = SamplingPass(3, 0.9)
    expected = torch.softmax(filter_logits(logits, 3, 0.9), -1)
    draws = sample_codes(logits.expand(40000, 6), sp, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert set(torch.nonzero(freq).flatten().tolist()) == set(torch.nonzero(expected).flatten().tolist())
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    tied = torch.tensor([0.0, 3.0, 3.0, 3.0, 1.0])
    picks = sample_codes(tied.expand(2000, 5), SamplingPass(2, 0.0), generator=torch.Generator().manual_seed(1))
    assert set(picks.tolist()) == {1, 2}  # of the three tied codes, the two lowest indices


def test_top_k_with_ties_kept_keeps_every_code_tied_with_the_kth() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_keep(logits, 2).tolist()[0] == [True, False, True, False, False]
    assert top_k_keep(logits, 2, keep_ties=True).tolist() == [[True, False, True, True, False],
                                                               [True, True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    rows = logits.repeat(500, 1)
    drawn = sample_codes(rows, SamplingPass(2, 0.0), generator=g, keep_ties=True).reshape(500, 2)
    assert set(drawn[:, 0].tolist()) == {0, 2, 3} and set(drawn[:, 1].tolist()) == {0, 1}
    kept = filter_logits(logits, 2, 0.0, keep_ties=True)
    assert torch.isinf(kept[0]).tolist() == [False, True, False, False, True]
