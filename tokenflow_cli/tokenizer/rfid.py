"""`tokenflow eval rfid`: reconstruction quality under one stated protocol.

Protocol (also written into report.json, so numbers can be compared and recomputed):

1. every image is loaded as 8-bit RGB, its short side resized to `res` and centre-cropped to
   res x res (PIL bicubic, after halving with a box filter while it is >= 2x the target: the
   official evaluation's resize); this is the ORIGINAL, saved as PNG;
2. when `res` differs from the tokenizer's resolution, the original is resized to the model's
   resolution with the same filter, encoded and decoded, and the decoded image resized back to
   `res` (PIL bicubic); otherwise it goes in and comes out unchanged;
3. the decoded image is quantized to uint8 as clamp(127.5 x + 128) and saved as PNG: the
   RECONSTRUCTION;
4. every metric is computed on those two PNG folders: rFID (and KID) with torch-fidelity's
   Inception, PSNR, SSIM and LPIPS per image pair, and codebook usage over the set's codes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image

from tokenflow_cli.data.images import ImageLoadError, load_image, resize_center_crop
from tokenflow_cli.eval.evalset import EvalSubset
from tokenflow_cli.eval.fid import KID_SUBSETS, FeatureCache, FeatureSpec, fid_kid
from tokenflow_cli.eval.image_metrics import PSNR_PROTOCOL, SSIM_PROTOCOL, LpipsMetric, psnr, ssim
from tokenflow_cli.eval.visual import grid, save_png, to_uint8
from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.tokenizer.identity import tokenizer_id
from tokenflow_cli.tokenizer.inference import InferenceOptions, inference_context, prepare_for_inference
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.usage_report import UsageCounts, quantize_views

CROP = "short side resized to res, then centre crop res x res"
RESIZE_FILTER = "PIL bicubic, after halving with a box filter while the image is >= 2x the target"
QUANTIZE = "uint8 = clamp(127.5 * x + 128) of the [-1, 1] decoder output"

ProgressFn = Callable[[int, int, float], None]  # (images done incl. failures, failures, usage share)


@dataclass
class RfidOptions:
    res: int = 256  # evaluation resolution (crop size and metric resolution)
    batch_size: int = 16
    kid: bool = True  # KID next to FID (subset size min(1000, n))
    grid_rows: int = 6  # rows per subset in grid.png
    fid_batch_size: int = 32
    inference: InferenceOptions = field(default_factory=InferenceOptions)  # encode/decode dtype, compile


@dataclass
class _Pairs:
    """Running per-image metrics of one subset."""

    psnr: list[np.ndarray] = field(default_factory=list)
    ssim: list[np.ndarray] = field(default_factory=list)
    lpips: list[np.ndarray] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    grid_orig: list[np.ndarray] = field(default_factory=list)
    grid_rec: list[np.ndarray] = field(default_factory=list)
    n: int = 0


def load_original(path: Path, res: int) -> np.ndarray:
    """Step 1 of the protocol: (res, res, 3) uint8."""

    return np.asarray(resize_center_crop(load_image(path), res))


def to_model_input(originals_BHW3: np.ndarray, model_res: int) -> torch.Tensor:
    """Step 2 (in): uint8 originals -> [-1, 1] (B, 3, r, r) at the model's resolution."""

    if originals_BHW3.shape[1] != model_res:
        originals_BHW3 = np.stack([np.asarray(resize_center_crop(Image.fromarray(a), model_res))
                                   for a in originals_BHW3])
    x = torch.from_numpy(np.ascontiguousarray(originals_BHW3)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def from_model_output(decoded_BHW3: np.ndarray, res: int) -> np.ndarray:
    """Step 2 (out): decoded uint8 at the model's resolution -> res x res."""
    if decoded_BHW3.shape[1] == res:
        return decoded_BHW3
    return np.stack([np.asarray(Image.fromarray(a).resize((res, res), Image.BICUBIC)) for a in decoded_BHW3])


@inference_context()
def _reconstruct_subset(tok: TokenFlowTokenizer, subset: EvalSubset, out_dir: Path, opts: RfidOptions,
                        lpips: LpipsMetric, usage: UsageCounts, progress: Callable[[int, int], None]) -> _Pairs:

    device = next(tok.parameters()).device
    orig_dir, rec_dir = out_dir / "originals" / subset.name, out_dir / "reconstructions" / subset.name
    for folder in (orig_dir, rec_dir):  # torch-fidelity reads whole folders: no stale PNGs
        shutil.rmtree(folder, ignore_errors=True)
    pairs = _Pairs()
    for start in range(0, len(subset.paths), opts.batch_size):
        batch, names = [], []
        for i, path in enumerate(subset.paths[start : start + opts.batch_size], start=start):
            try:
                batch.append(load_original(path, opts.res))
                names.append(f"{i:06d}_{Path(path).stem}.png")
            except (ImageLoadError, OSError, ValueError) as err:
                pairs.failures.append((str(path), str(err)))
        if batch:
            orig = np.stack(batch)
            views = quantize_views(tok.quantizer, tok.encode_features(to_model_input(orig, tok.image_size).to(device)))
            for view, idx in views.items():
                usage.add(view, idx)
            rec = from_model_output(to_uint8(tok.codes_to_img(views["shared"])), opts.res)
            for name, o, r in zip(names, orig, rec):
                save_png(o, orig_dir / name)
                save_png(r, rec_dir / name)
            pairs.psnr.append(psnr(orig, rec))
            pairs.ssim.append(ssim(orig, rec))
            scores = lpips(orig, rec, device)
            if scores is not None:
                pairs.lpips.append(scores)
            room = opts.grid_rows - sum(len(g) for g in pairs.grid_orig)
            if room > 0:
                pairs.grid_orig.append(orig[:room])
                pairs.grid_rec.append(rec[:room])
            pairs.n += len(batch)
        progress(pairs.n, len(pairs.failures))
    return pairs


def _mean(parts: list[np.ndarray]) -> float | None:
    return float(np.concatenate(parts).mean()) if parts else None


def _row(pairs: _Pairs, usage: UsageCounts, dist: dict | None) -> dict:
    overall = usage.summary()["shared"]["overall"] if usage.counts else {}
    row = {"n": pairs.n, "failed": len(pairs.failures), "psnr": _mean(pairs.psnr), "ssim": _mean(pairs.ssim),
           "lpips": _mean(pairs.lpips), "usage": overall.get("usage"), "perplexity": overall.get("perplexity")}
    if dist:
        row.update(rfid=dist["fid"], kid=dist.get("kid"), kid_std=dist.get("kid_std"))
    return row


def _merge(parts: list[_Pairs]) -> _Pairs:
    out = _Pairs()
    for p in parts:
        out.psnr += p.psnr
        out.ssim += p.ssim
        out.lpips += p.lpips
        out.failures += p.failures
        out.n += p.n
    return out


def protocol(tok: TokenFlowTokenizer, opts: RfidOptions, spec: FeatureSpec, lpips: LpipsMetric,
             device: torch.device) -> dict:

    resized = opts.res != tok.image_size
    lpips_info = {"label": lpips.label, "real_backbone": lpips.real_backbone, "backbone": lpips.backbone_path,
                  "backbone_sha256": file_sha256(lpips.backbone_path) if lpips.backbone_path else None,
                  "unavailable": lpips.unavailable or None}
    return {
        "resolution": opts.res,
        "model_resolution": tok.image_size,
        "crop": CROP,
        "resize_filter": RESIZE_FILTER,
        "resized_for_model": resized,
        "resize_note": (f"resized {opts.res} -> {tok.image_size} before encoding and {tok.image_size} -> "
                        f"{opts.res} after decoding (bicubic); metrics at {opts.res}") if resized
        else "none: the model runs at the evaluation resolution",
        "quantize": QUANTIZE,
        "saved_as": "PNG (lossless 8-bit RGB); every metric reads these files",
        "psnr": PSNR_PROTOCOL,
        "ssim": SSIM_PROTOCOL,
        "lpips": lpips_info,
        "fid": {"backend": f"torch-fidelity {torch_fidelity.__version__}", "feature_extractor": spec.label,
                "extractor_name": spec.extractor, "feature_layer": spec.layer, "weights": spec.weights_path,
                "weights_sha256": spec.weights_sha256, "is_real_fid": spec.is_real_fid,
                "kid": opts.kid, "kid_subsets": KID_SUBSETS},
        "codebook_usage": "share of the K codes hit by the shared index over all scales; perplexity = exp(entropy)",
        "device": str(device),
        "precision": opts.inference.dtype,
        "inference": opts.inference.describe(),
    }


def run_rfid(tok: TokenFlowTokenizer, subsets: list[EvalSubset], out_dir: Path, spec: FeatureSpec,
             lpips: LpipsMetric, opts: RfidOptions, progress: ProgressFn | None = None) -> dict:
    """Reconstruct every subset, measure, and return the report (the caller writes it).

    The tokenizer is prepared in place for `opts.inference` (eval mode, its dtype, channels-last)."""

    tok = prepare_for_inference(tok, opts.inference)
    device = next(tok.parameters()).device
    out_dir = Path(out_dir)
    started = time.perf_counter()
    total_usage = UsageCounts(tok.scales, tok.codebook_size)
    results, per_subset, done = {}, {}, 0
    for subset in subsets:
        usage = UsageCounts(tok.scales, tok.codebook_size)

        def advance(n: int, failed: int, base: int = done, usage: UsageCounts = usage) -> None:
            if progress:
                share = usage.summary()["shared"]["overall"]["usage"] if usage.counts else 0.0
                progress(base + n + failed, failed, share)

        pairs = _reconstruct_subset(tok, subset, out_dir, opts, lpips, usage, advance)
        done += pairs.n + len(pairs.failures)
        for view, counts in usage.counts.items():
            total_usage.counts[view] = total_usage.counts.get(view, 0) + counts
        per_subset[subset.name] = (pairs, usage)
    recon_s = time.perf_counter() - started

    cache = FeatureCache(spec, cuda=device.type == "cuda", batch_size=opts.fid_batch_size)
    features = {}
    for name, (pairs, usage) in per_subset.items():
        dist = None
        if pairs.n >= 2:
            f_orig = cache.features(out_dir / "originals" / name)
            f_rec = cache.features(out_dir / "reconstructions" / name)
            features[name] = (f_orig, f_rec)
            dist = fid_kid(f_orig, f_rec, kid=opts.kid)
        results[name] = _row(pairs, usage, dist)
    if len(per_subset) > 1:
        all_pairs = _merge([p for p, _ in per_subset.values()])
        dist = None
        if len(features) == len(per_subset):
            dist = fid_kid(torch.cat([f[0] for f in features.values()]), torch.cat([f[1] for f in features.values()]),
                           kid=opts.kid)
        results["all"] = _row(all_pairs, total_usage, dist)

    columns = [np.concatenate([g for p, _ in per_subset.values() for g in p.grid_orig] or [np.zeros((0, 1, 1, 3))]),
               np.concatenate([g for p, _ in per_subset.values() for g in p.grid_rec] or [np.zeros((0, 1, 1, 3))])]
    grid_path = None
    if len(columns[0]):
        grid_path = out_dir / "grid.png"
        save_png(grid(columns, max_rows=len(columns[0])), grid_path)

    failures = [f for p, _ in per_subset.values() for f in p.failures]
    warnings = []
    if tok.random_init:
        warnings.append("the tokenizer is RANDOMLY INITIALISED: these numbers say nothing about a trained model")
    if not spec.is_real_fid:
        warnings.append(f"distribution metrics use {spec.label}: they are NOT FID/KID and not comparable to papers")
    if not lpips.real_backbone:
        warnings.append(f"LPIPS: {lpips.unavailable or lpips.label}")
    return {
        "command": "tokenflow eval rfid",
        "model": {**tokenizer_id(tok), "resolution": tok.image_size, "codebook_size": tok.codebook_size,
                  "scales": list(tok.scales)},
        "protocol": protocol(tok, opts, spec, lpips, device),
        "data": {s.name: {"description": s.description, "files": len(s.paths)} for s in subsets},
        "counts": {"images": sum(p.n for p, _ in per_subset.values()), "failed": len(failures)},
        "results": results,
        "usage": {"shared_semantic_pixel": total_usage.summary()},
        "failures": [{"path": p, "reason": r} for p, r in failures[:100]],
        "warnings": warnings,
        "files": {"originals": str(out_dir / "originals"), "reconstructions": str(out_dir / "reconstructions"),
                  "grid": str(grid_path) if grid_path else None},
        "seconds": {"reconstruct": round(recon_s, 2), "total": round(time.perf_counter() - started, 2)},
    }
