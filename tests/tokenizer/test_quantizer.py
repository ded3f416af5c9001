import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tokenflow_cli.tokenizer.config import QuantizerConfig
from tokenflow_cli.tokenizer.quantizer import MultiScaleDualQuantizer, nearest_code, plain_nearest_code


def _brute_force(z_sem, z_pix, cb_sem, cb_pix, w):
    d_sem = ((z_sem[:, None, :].double() - cb_sem[None].double()) ** 2).sum(-1)
    d_pix = ((z_pix[:, None, :].double() - cb_pix[None].double()) ** 2).sum(-1)
    return (d_sem + w * d_pix).argmin(1)


@pytest.mark.parametrize("w", [1.0, 0.3, 4.0])
def test_index_is_argmin_of_joint_distance(w):
    g = torch.Generator().manual_seed(1)
    z_sem, z_pix = torch.randn(300, 32, generator=g), torch.randn(300, 8, generator=g)
    cb_sem, cb_pix = torch.randn(1000, 32, generator=g), torch.randn(1000, 8, generator=g)
    idx = nearest_code(z_sem, z_pix, cb_sem, cb_pix, pixel_weight=w, chunk_size=128)
    assert torch.equal(idx, _brute_force(z_sem, z_pix, cb_sem, cb_pix, w))


def test_pixel_weight_changes_the_choice():
    g = torch.Generator().manual_seed(2)
    z_sem, z_pix = torch.randn(500, 32, generator=g), torch.randn(500, 8, generator=g)
    cb_sem, cb_pix = torch.randn(512, 32, generator=g), torch.randn(512, 8, generator=g)
    a = nearest_code(z_sem, z_pix, cb_sem, cb_pix, pixel_weight=0.0)
    b = nearest_code(z_sem, z_pix, cb_sem, cb_pix, pixel_weight=100.0)
    assert (a != b).float().mean() > 0.5
    assert torch.equal(a, _brute_force(z_sem, z_pix, cb_sem, cb_pix, 0.0))


def _loop_joint_distances(z_sem, z_pix, cb_sem, cb_pix, w, semantic_weight=1.0):
    """Independent reference: float64, one token at a time, the quantizer's joint distance
    semantic_weight * ||z_sem - e_sem_i||^2 + w * ||z_pix - e_pix_i||^2 for every code i."""
    cb_sem, cb_pix = cb_sem.double(), cb_pix.double()
    rows = [
        semantic_weight * (zs - cb_sem).pow(2).sum(1) + w * (zp - cb_pix).pow(2).sum(1)
        for zs, zp in zip(z_sem.double(), z_pix.double())
    ]
    return torch.stack(rows)  # (N, K)


def _assert_is_joint_argmin(idx, dist):
    """idx is exactly the (lowest-index) argmin of dist; the data has no fp32-rounding near-ties,
    so exact equality with the float64 reference is the right check."""
    top2 = dist.topk(2, dim=1, largest=False).values
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-5, "near-tie in the test data: pick another seed"
    assert torch.equal(idx, dist.argmin(1))


@pytest.mark.parametrize("chunk", [3, 7, 64, 1000, 4096])
def test_chunked_search_is_brute_force_argmin(chunk):
    # the quantizer's setting: both halves and both codebooks l2-normalised
    g = torch.Generator().manual_seed(3)
    z_sem = F.normalize(torch.randn(257, 32, generator=g), dim=1)
    z_pix = F.normalize(torch.randn(257, 8, generator=g), dim=1)
    cb_sem = F.normalize(torch.randn(1000, 32, generator=g), dim=1)
    cb_pix = F.normalize(torch.randn(1000, 8, generator=g), dim=1)
    dist = _loop_joint_distances(z_sem, z_pix, cb_sem, cb_pix, 1.0)
    _assert_is_joint_argmin(nearest_code(z_sem, z_pix, cb_sem, cb_pix, chunk_size=chunk), dist)
    _assert_is_joint_argmin(plain_nearest_code(z_sem, z_pix, cb_sem, cb_pix), dist)


@pytest.mark.parametrize(
    ("pixel_weight", "use_semantic", "l2_normalize"),
    [(1.0, True, True), (0.3, True, True), (4.0, True, True), (1.0, False, True), (1.0, True, False)],
)
def test_quantizer_search_is_brute_force_over_its_joint_distance(pixel_weight, use_semantic, l2_normalize):
    """MultiScaleDualQuantizer.search against the definition in quantizer.py, written out here:
    split 32/8, l2-normalise each half and each codebook row (l2_normalize), argmin over
    d_sem + pixel_weight * d_pix (d_sem dropped when use_semantic is False), ties to the lowest index."""
    cfg = QuantizerConfig(codebook_size=300, scales=(1, 5), search_chunk_size=64, pixel_weight=pixel_weight,
                          use_semantic=use_semantic, l2_normalize=l2_normalize)
    torch.manual_seed(4)
    q = MultiScaleDualQuantizer(cfg).eval()
    r = 3.0 * torch.randn(2, 40, 5, 5, generator=torch.Generator().manual_seed(5))  # residuals are not unit norm
    with torch.no_grad():
        idx = q.search(r)
    assert idx.shape == (2, 25)
    z = r.permute(0, 2, 3, 1).reshape(-1, 40)  # row-major positions, batch first
    z_sem, z_pix = z[:, :32], z[:, 32:]
    cb_sem, cb_pix = q.semantic_codebook.weight.detach(), q.pixel_codebook.weight.detach()
    if l2_normalize:
        z_sem, z_pix = z_sem / z_sem.norm(dim=1, keepdim=True), z_pix / z_pix.norm(dim=1, keepdim=True)
        cb_sem, cb_pix = cb_sem / cb_sem.norm(dim=1, keepdim=True), cb_pix / cb_pix.norm(dim=1, keepdim=True)
    dist = _loop_joint_distances(z_sem, z_pix, cb_sem, cb_pix, pixel_weight, 1.0 if use_semantic else 0.0)
    _assert_is_joint_argmin(idx.reshape(-1), dist)


def test_ties_go_to_lowest_index_across_chunks():
    cb_sem = torch.zeros(10, 2)
    cb_pix = torch.zeros(10, 1)
    cb_sem[3] = cb_sem[7] = torch.tensor([1.0, 0.0])
    idx = nearest_code(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 1), cb_sem, cb_pix, chunk_size=4)
    assert idx.item() == 3


def _quantizer(**kw):
    cfg = dataclasses.replace(QuantizerConfig(codebook_size=64, scales=(1, 2, 4), search_chunk_size=16), **kw)
    torch.manual_seed(0)
    return MultiScaleDualQuantizer(cfg)


def test_residual_pyramid_matches_index_decoding():
    q = _quantizer().eval()
    f = torch.randn(2, 40, 4, 4)
    out = q(f)
    assert [i.shape for i in out.indices] == [(2, 1), (2, 4), (2, 16)]
    idx = torch.cat(out.indices, 1)
    assert torch.allclose(q.indices_to_features(idx, 4), out.quantized, atol=1e-6)
    # reconstruction improves as scales are added: the last residual is smaller than the input
    assert (f - out.quantized).norm() < f.norm()


def test_manual_residual_procedure():
    """Hand-written official procedure: area down, joint argmin, bicubic up, subtract."""
    q = _quantizer().eval()
    f = torch.randn(1, 40, 4, 4)
    sem, pix = q.codebooks()
    residual, f_hat, expect = f.clone(), torch.zeros_like(f), []
    for s in q.scales:
        r = F.interpolate(residual, size=(s, s), mode="area")
        z = r.permute(0, 2, 3, 1).reshape(-1, 40)
        idx = _brute_force(F.normalize(z[:, :32], dim=1), F.normalize(z[:, 32:], dim=1), sem, pix, 1.0)
        code = torch.cat([sem[idx], pix[idx]], 1).T.reshape(1, 40, s, s)
        up = code if s == 4 else F.interpolate(code, size=(4, 4), mode="bicubic")
        f_hat, residual = f_hat + up, residual - up
        expect.append(idx)
    out = q(f)
    assert torch.equal(torch.cat(out.indices, 1)[0], torch.cat(expect))
    assert torch.allclose(out.quantized, f_hat, atol=1e-6)


def test_training_gradients_and_usage_buffers():
    q = _quantizer(scale_drop_prob=0.0).train()
    f = torch.randn(2, 40, 4, 4, requires_grad=True)
    out = q(f)
    (out.quantized.square().mean() + out.codebook_loss + out.commit_loss).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0  # straight-through
    assert q.semantic_codebook.weight.grad.abs().sum() > 0
    assert q.pixel_codebook.weight.grad.abs().sum() > 0
    counts = q.usage_counts
    for si, idx in enumerate(out.indices):
        assert torch.equal(counts[si], torch.bincount(idx.reshape(-1), minlength=64))
    assert "usage_counts" in q.state_dict()


def test_scale_drop_only_in_training():
    q = _quantizer(scale_drop_prob=1.0)
    q.train()
    out = q(torch.randn(1, 40, 4, 4))
    dropped = [i for i, idx in enumerate(out.indices) if (idx < 0).all()]
    assert len(dropped) == 1 and dropped[0] != 0
    q.eval()
    assert all((idx >= 0).all() for idx in q(torch.randn(1, 40, 4, 4)).indices)


def test_entropy_loss_is_finite_and_differentiable():
    q = _quantizer(entropy_weight=0.1, scale_drop_prob=0.0).train()
    f = torch.randn(2, 40, 4, 4, requires_grad=True)
    out = q(f)
    assert torch.isfinite(out.entropy_loss) and out.entropy_loss.requires_grad


def test_pixel_only_ablation_ignores_semantic_half():
    q = _quantizer(use_semantic=False).eval()
    f = torch.randn(1, 40, 4, 4)
    g = f.clone()
    g[:, :32] = torch.randn(1, 32, 4, 4)
    assert torch.equal(q(f).indices[0], q(g).indices[0])


def test_next_scale_inputs_are_running_sums():
    q = _quantizer().eval()
    idx = torch.cat(q(torch.randn(2, 40, 4, 4)).indices, 1)
    inputs = q.next_scale_inputs(idx, 4)
    assert [x.shape for x in inputs] == [(2, 4, 40), (2, 16, 40)]
    first = q.upsample(q.indices_to_map(idx[:, :1], 1), 4)
    assert torch.allclose(inputs[0], F.interpolate(first, size=(2, 2), mode="area").flatten(2).transpose(1, 2))


def test_dead_code_restart_revives_unused_codes():
    q = _quantizer(scale_drop_prob=0.0).train()
    f = torch.randn(1, 40, 4, 4)
    for _ in range(5):
        q(f)
    before = q.semantic_codebook.weight.clone()
    idle = (q.step - q.last_used_step) > 2
    n = q.restart_dead_codes(f.permute(0, 2, 3, 1).reshape(-1, 40), max_idle_steps=2)
    assert n == int(idle.sum()) > 0
    changed = (q.semantic_codebook.weight != before).any(1)
    assert torch.equal(changed, idle)
    assert ((q.step - q.last_used_step) <= 2).all()


def test_kmeans_init_places_codes_on_data():
    q = _quantizer(codebook_size=8)
    centers = F.normalize(torch.randn(8, 40), dim=1)
    data = centers.repeat(50, 1) + 0.001 * torch.randn(400, 40)
    q.kmeans_init(data, iters=20)
    sem, pix = q.codebooks()
    assert torch.cat([sem, pix], 1).shape == (8, 40)
    idx = nearest_code(data[:, :32], data[:, 32:], sem, pix)
    assert len(torch.unique(idx)) >= 6
