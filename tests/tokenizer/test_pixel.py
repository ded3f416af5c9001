"""Pixel encoder/decoder (official layout) and the PatchGAN discriminator."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenflow_cli.tokenizer.config import PixelConfig
from tokenflow_cli.tokenizer.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from tokenflow_cli.tokenizer.pixel import AttnBlock, PixelDecoder, PixelEncoder, downsample_factor

OFFICIAL = Path(__file__).resolve().parents[1] / "data"  # key tables copied from the official release notes

STANDARD = PixelConfig()
ENHANCED = PixelConfig(decoder_base_channels=256, decoder_res_blocks=5)
TINY = PixelConfig(
    base_channels=32,
    channel_mult=(1, 2, 2),
    encoder_res_blocks=1,
    decoder_base_channels=32,
    decoder_res_blocks=1,
    z_channels=64,
    norm_groups=8,
)

VARIANTS = {
    "tokenflow_clipb224": ("tokenflow_clipb224_keys.tsv", STANDARD),
    "tokenflow_clipb224_enhanced": ("tokenflow_clipb224_enhanced_keys.tsv", ENHANCED),
}


def _official_rows(filename: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    with open(OFFICIAL / filename, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [
        (row["key"], tuple(int(d) for d in row["shape"].split("x")))
        for row in rows
        if row["key"].startswith(prefix)
    ]


def _official_total(variant: str, prefix: str) -> tuple[int, int]:
    with open(OFFICIAL / "tokenflow_prefix_totals.tsv", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["variant"] == variant and row["prefix"] == prefix:
                return int(row["n_keys"]), int(row["n_params"])
    raise AssertionError(f"no totals row for {variant}/{prefix}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prefix", ["encoder", "decoder"])
def test_official_state_dict_layout(variant: str, prefix: str) -> None:
    filename, cfg = VARIANTS[variant]
    expected = _official_rows(filename, prefix + ".")
    with torch.device("meta"):
        module = PixelEncoder(cfg) if prefix == "encoder" else PixelDecoder(cfg)
    ours = [(f"{prefix}.{k}", tuple(v.shape)) for k, v in module.state_dict().items()]

    assert dict(ours) == dict(expected)  # key set and shapes
    assert [k for k, _ in ours] == [k for k, _ in expected]  # and the official order
    n_keys, n_params = _official_total(variant, prefix)
    assert len(ours) == n_keys
    assert sum(p.numel() for p in module.parameters()) == n_params
    assert not list(module.buffers())


def test_downsample_factor() -> None:
    assert downsample_factor(STANDARD) == 16
    assert downsample_factor(TINY) == 4


def test_tiny_forward_backward_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    encoder, decoder = PixelEncoder(TINY), PixelDecoder(TINY)
    img_B3HW = torch.randn(2, 3, 64, 64)

    z_BChw = encoder(img_B3HW)
    assert z_BChw.shape == (2, 64, 16, 16)
    rec_B3HW = decoder(z_BChw)
    assert rec_B3HW.shape == (2, 3, 64, 64)
    assert torch.isfinite(rec_B3HW).all()

    F.mse_loss(rec_B3HW, img_B3HW).backward()
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


def test_decoder_accepts_non_square_latents() -> None:
    decoder = PixelDecoder(TINY).eval()
    with torch.no_grad():
        assert decoder(torch.randn(1, 64, 3, 5)).shape == (1, 3, 12, 20)


def test_gradient_checkpointing_gives_the_same_output_and_gradients() -> None:
    torch.manual_seed(0)
    encoder = PixelEncoder(TINY)
    img = torch.randn(1, 3, 32, 32)
    plain = encoder(img)
    plain.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad()

    encoder.gradient_checkpointing = True
    ckpt = encoder(img)
    ckpt.square().mean().backward()
    torch.testing.assert_close(ckpt, plain)
    for n, p in encoder.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_attention_matches_explicit_softmax_math() -> None:
    torch.manual_seed(0)
    block = AttnBlock(16, groups=4)
    x = torch.randn(2, 16, 3, 5)
    n = block.norm(x)
    q = block.q(n).flatten(2)  # (B, C, N)
    k = block.k(n).flatten(2)
    v = block.v(n).flatten(2)
    w_BNN = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 16**-0.5, dim=2)
    h = torch.bmm(v, w_BNN.transpose(1, 2)).reshape(x.shape)  # (B, C, N) -> (B, C, h, w)
    torch.testing.assert_close(block(x), x + block.proj_out(h))


def test_downsample_pads_right_and_bottom_only() -> None:
    # An all-ones encoder downsample conv reads a 3x3 window starting at (2i, 2j); with zero
    # padding only on the right/bottom, the top-left output sees nine ones, the bottom-right four.
    encoder = PixelEncoder(TINY)
    down = encoder.conv_blocks[0].downsample
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[:, 0].fill_(1.0)
        down.conv.bias.zero_()
        out = down(torch.ones(1, 32, 4, 4))
    assert out.shape == (1, 32, 2, 2)
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_upsample_is_nearest_then_conv() -> None:
    # With the conv reduced to identity (centre tap 1), the output is each pixel repeated 2x2.
    up = PixelDecoder(TINY).conv_blocks[0].upsample
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[:, :, 1, 1] = torch.eye(up.conv.in_channels)
        up.conv.bias.zero_()
        x = torch.randn(1, up.conv.in_channels, 3, 4)
        expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(up(x), expected)


def test_group_norms_use_official_eps() -> None:
    for module in (PixelEncoder(TINY), PixelDecoder(TINY)):
        norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.eps == 1e-6 and m.num_groups == TINY.norm_groups for m in norms)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_output_shape(norm: str) -> None:
    disc = PatchDiscriminator(in_channels=3, channels=8, layers=3, norm=norm)
    logits = disc(torch.randn(2, 3, 64, 64))
    # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (4x4, stride 1, pad 1)
    assert logits.shape == (2, 1, 6, 6)
    assert torch.isfinite(logits).all()
    assert PatchDiscriminator(layers=3)(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_hinge_losses_on_known_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - x) = 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([-2.0, 0.0, 1.0, -0.5])  # relu(1 + x) = 0, 1, 2, 0.5 -> mean 0.875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.875))
    assert hinge_g_loss(fake).item() == pytest.approx(0.375)  # -mean(fake) = -(-1.5 / 4)
    # A perfect discriminator (margins beyond 1) has zero loss.
    assert hinge_d_loss(torch.full((3,), 1.5), torch.full((3,), -1.5)).item() == 0.0
