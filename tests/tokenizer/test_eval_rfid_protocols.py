"""`eval rfid --protocol`: the official pair against the official script's own arithmetic, each
protocol's features and FID against the tool it reproduces, one reconstruction pass for all
protocols, resume after a kill, and the resolution bounds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner


def _photos(folder, n=5, broken=True, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


# --- the official script's arithmetic, copied from ByteFlow-AI/TokenFlow (commit 9812da0):
# tokenflow/dataset/augmentation.py (ADM's center_crop_arr) and tokenflow/tokenizer/reconstruction_vq_ddp.py


def _official_center_crop_arr(pil_image, image_size):
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _official_eval(pil_image, decode, image_size, image_size_eval):
    from skimage.metrics import peak_signal_noise_ratio as psnr_loss
    from skimage.metrics import structural_similarity as ssim_loss
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Lambda(lambda im: _official_center_crop_arr(im, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
    ])
    x = transform(pil_image)[None]
    rgb_gts = x if image_size_eval == image_size else torch.nn.functional.interpolate(
        x, size=(image_size_eval, image_size_eval), mode="bicubic")
    rgb_gts = (rgb_gts.permute(0, 2, 3, 1).to("cpu").numpy() + 1.0) / 2.0
    samples = decode(x)
    if image_size_eval != image_size:
        samples = torch.nn.functional.interpolate(samples, size=(image_size_eval, image_size_eval), mode="bicubic")
    samples = torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
    sample, rgb_gt = samples[0], rgb_gts[0]
    gt_png = np.clip(rgb_gt * 255, 0, 255).astype(np.uint8)
    rgb_restored = sample.astype(np.float32) / 255.0
    psnr = psnr_loss(rgb_restored, rgb_gt)
    ssim = ssim_loss(rgb_restored, rgb_gt, data_range=2.0, channel_axis=-1)
    return x, gt_png, sample, psnr, ssim


@pytest.mark.parametrize("eval_res", [32, 24])
def test_official_pair_is_the_official_scripts(eval_res):
    from tokenflow_cli.eval.image_metrics import LpipsMetric
    from tokenflow_cli.tokenizer.rfid_pairs import make_pairs, official_input

    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (75, 50, 3), dtype=np.uint8))
    blur = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def decode(x):
        return blur(x) * 0.9

    x_ref, gt_png, sample, psnr, ssim = _official_eval(source, decode, 32, eval_res)
    x = official_input(source, 32)[None]
    assert torch.equal(x, x_ref)
    batch = make_pairs([source], x, decode(x), eval_res, LpipsMetric("off", False, None), torch.device("cpu"))
    assert np.array_equal(batch.gts[0], gt_png) and np.array_equal(batch.samples[0], sample)
    assert batch.metrics["psnr_official"][0] == pytest.approx(psnr, rel=1e-12)
    assert batch.metrics["ssim_official"][0] == pytest.approx(ssim, rel=1e-12)
    if eval_res == 32:  # our reference keeps the exact bytes; the official one truncates
        exact = np.asarray(_official_center_crop_arr(source, 32))
        assert np.array_equal(batch.originals[0], exact)
        lowered = batch.gts[0].astype(int) - exact
        assert set(np.unique(lowered)) <= {-1, 0} and (lowered == -1).any()


def test_frechet_distance_is_pytorch_fids_and_clean_fids():
    pytorch_fid = pytest.importorskip("pytorch_fid.fid_score")
    cleanfid = pytest.importorskip("cleanfid.fid")
    from tokenflow_cli.eval.fid_protocols import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.3, 1.2, size=(40, 6))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (a, b)]
    ours, offset = frechet_distance(*stats[0], *stats[1])
    assert not offset
    assert ours == pytest.approx(pytorch_fid.calculate_frechet_distance(*stats[0], *stats[1]), rel=1e-12)
    assert ours == pytest.approx(cleanfid.frechet_distance(*stats[0], *stats[1]), rel=1e-12)


@pytest.fixture
def inception_weights():
    from tokenflow_cli.weights import find_weight_file

    path = find_weight_file("fid-inception")
    if path is None:
        pytest.skip("FID Inception weights not built here (`tokenflow prepare-fid`)")
    return path


@pytest.mark.slow  # real Inception on CPU: minutes on two shared cores
def test_protocol_fids_equal_the_tools_they_reproduce(tmp_path, inception_weights):
    """Same network; each tool's own loader, resize, scaling and statistics."""
    import torch_fidelity
    from cleanfid import fid as cleanfid

    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    from pytorch_fid.fid_score import get_activations

    from tokenflow_cli.eval.fid import fidelity_kwargs, inception_spec
    from tokenflow_cli.eval.fid_protocols import FeatureNetwork, protocol_features, protocol_fid

    a, b = _photos(tmp_path / "a", 4, False, seed=2), _photos(tmp_path / "b", 4, False, seed=3)
    files = {d: sorted(d.glob("*.png")) for d in (a, b)}
    spec = inception_spec(inception_weights)
    net = FeatureNetwork(spec, torch.device("cpu"), batch_size=4)
    feats = {name: [protocol_features(name, files[d], net) for d in (a, b)]
             for name in ("tokenflow", "torch-fidelity", "clean-fid")}
    fids = {name: protocol_fid(name, *f, kid=False)["fid"] for name, f in feats.items()}

    state = torch.load(inception_weights, map_location="cpu", weights_only=True)  # same file, pytorch-fid's names
    original = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        model = pytorch_fid_inception.InceptionV3([3]).eval()
    finally:
        pytorch_fid_inception.load_state_dict_from_url = original
    theirs = get_activations(files[a], model, batch_size=50, dims=2048, device="cpu", num_workers=0)
    assert np.abs(theirs - feats["tokenflow"][0]).max() < 1e-4 * max(1.0, np.abs(theirs).max())

    fidelity = torch_fidelity.calculate_metrics(input1=str(b), input2=str(a), fid=True,
                                                **fidelity_kwargs(spec, cuda=False))
    assert fids["torch-fidelity"] == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-5)
    clean = cleanfid.compute_fid(str(b), str(a), mode="clean", num_workers=0, device=torch.device("cpu"),
                                 verbose=False, custom_feat_extractor=lambda x: net.after_input((x - 128) / 128))
    assert fids["clean-fid"] == pytest.approx(clean, rel=1e-5)
    assert len({round(v, 3) for v in fids.values()}) == 3  # the protocols do disagree


def _run(tmp_path, out, protocols=("tokenflow",), progress=None, unit_size=2, **extra):
    from tokenflow_cli.eval.evalset import folder_subset
    from tokenflow_cli.eval.fid import tiny_spec
    from tokenflow_cli.eval.image_metrics import build_lpips_metric
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.rfid import RfidOptions, run_rfid

    photos = tmp_path / "photos"
    if not photos.exists():
        _photos(photos)
    opts = RfidOptions(res=32, protocols=tuple(protocols), batch_size=2, unit_size=unit_size, **extra)
    metric = build_lpips_metric("vgg", enabled=False)  # LPIPS is a per-image metric like PSNR; it costs seconds here
    return run_rfid(resolve_tokenizer(None, "cpu"), [folder_subset(photos)], out, tiny_spec(), metric, opts,
                    progress=progress)


def _stable(report):
    return {k: v for k, v in report.items() if k not in ("run", "files")}


def test_all_protocols_from_one_pass_and_added_later_without_decoding(tmp_path, monkeypatch):
    first = _run(tmp_path, tmp_path / "out")
    assert set(first["results"]["data"]["rfid"]) == {"tokenflow"}

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr("tokenflow_cli.tokenizer.rfid._reconstruct_unit", no_decoding)
    every = _run(tmp_path, tmp_path / "out", protocols=("tokenflow", "torch-fidelity", "clean-fid"))
    rfid = every["results"]["data"]["rfid"]
    assert set(rfid) == {"tokenflow", "torch-fidelity", "clean-fid"} and all(v > 0 for v in rfid.values())
    assert rfid["tokenflow"] == first["results"]["data"]["rfid"]["tokenflow"]
    assert every["run"]["reused_units_on_rank0"] == every["run"]["units"] == 3
    assert every["results"]["data"]["kid"] is not None and every["counts"] == {"images": 5, "failed": 1}


def test_killed_run_resumes_to_the_same_report(tmp_path):
    def kill_after_three(done, failed, usage):
        if done >= 3:
            raise KeyboardInterrupt

    protocols = ("tokenflow", "torch-fidelity", "clean-fid")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tmp_path / "resumed", protocols, progress=kill_after_three)
    resumed = _run(tmp_path, tmp_path / "resumed", protocols)
    assert 0 < resumed["run"]["reused_units_on_rank0"] < resumed["run"]["units"]
    whole = _run(tmp_path, tmp_path / "whole", protocols)
    assert json.dumps(_stable(resumed), sort_keys=True) == json.dumps(_stable(whole), sort_keys=True)
    assert math.isfinite(whole["results"]["data"]["psnr_official"])


def test_other_settings_in_the_output_are_refused_unless_fresh(tmp_path, cli_error):
    from tokenflow_cli.cli.app import app

    photos = _photos(tmp_path / "photos", 3, False)
    base = ["eval", "rfid", str(photos), "--tiny-features", "--no-lpips", "-o", str(tmp_path / "o"), "--device", "cpu"]
    assert CliRunner().invoke(app, [*base, "--res", "32"]).exit_code == 0
    cli_error(CliRunner().invoke(app, [*base, "--res", "48"]), "resolution", "--fresh", code=1)
    result = CliRunner().invoke(app, [*base, "--res", "48", "--fresh"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["protocol"]["resolution"] == 48


@pytest.mark.parametrize("res", ["4", "4096", "-1"])
def test_res_out_of_range_is_refused(tmp_path, res, cli_error):
    from tokenflow_cli.cli.app import app

    photos = _photos(tmp_path / "photos", 2, False)
    result = CliRunner().invoke(app, ["eval", "rfid", str(photos), "--tiny-features", "--res", res,
                                      "-o", str(tmp_path / "o"), "--device", "cpu"])
    if res == "4":  # inside the option's range (0 = the model's), below the evaluation minimum
        cli_error(result, "--res 4", "[8, 2048]", code=1)
    else:  # outside the option's range: click's usage error
        assert result.exit_code == 2 and "--res" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_protocol_is_one_error_line(tmp_path, cli_error):
    from tokenflow_cli.cli.app import app

    _photos(tmp_path / "images", n=1, broken=False)  # the inputs are checked first (without torch)
    result = CliRunner().invoke(app, ["eval", "rfid", str(tmp_path / "images"), "--protocol", "adm",
                                      "--tiny-features", "-o", str(tmp_path / "out")])
    cli_error(result, "adm", "clean-fid")
    assert not (tmp_path / "out").exists()
