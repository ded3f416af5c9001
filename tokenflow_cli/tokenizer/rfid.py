"""`tokenflow eval rfid`: reconstruction quality under stated protocols, from one encode/decode.

1. Reconstruct (tokenizer/rfid_pairs.py): every image is encoded and decoded ONCE; the official
   pair (`gts/`, `samples/`) and our pair (`originals/`, `reconstructions/`) are written as PNGs
   with PSNR/SSIM on each (the official calls on the official crops), LPIPS and codebook usage.
2. Features (eval/fid_protocols.py): each requested protocol reads its pair's PNGs back (the
   round trip every tool makes) and computes its Inception features once per image.
3. Report: FID per protocol and subset, from the cached features.

Both steps keep their results per unit of images on disk (tokenizer/rfid_store.py): running the
same command again resumes a killed run and gives the same report; another protocol later costs
only its features. Under `torchrun` the units are dealt to the ranks and rank 0 writes the report.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from tokenflow_cli.distributed import DistInfo, barrier
from tokenflow_cli.eval.evalset import EvalSubset
from tokenflow_cli.eval.fid import KID_SUBSETS, FeatureSpec
from tokenflow_cli.eval.fid_protocols import FeatureNetwork, describe, protocol_features, protocol_fid
from tokenflow_cli.eval.image_metrics import PSNR_PROTOCOL, SSIM_PROTOCOL, LpipsMetric
from tokenflow_cli.eval.visual import grid, save_png
from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.tokenizer import rfid_pairs as pairs
from tokenflow_cli.tokenizer import rfid_store as store
from tokenflow_cli.tokenizer.identity import tokenizer_id
from tokenflow_cli.tokenizer.inference import InferenceOptions, inference_context, prepare_for_inference
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.usage_report import UsageCounts, quantize_views

MIN_RES, MAX_RES = 8, 2048  # evaluation resolution bounds (the decoder's activations grow with res^2)
ProgressFn = Callable[[int, int, float], None]  # (images done incl. failures, failures, usage share)


@dataclass
class RfidOptions:
    res: int = 256  # evaluation resolution
    protocols: tuple[str, ...] = ("tokenflow",)  # eval/fid_protocols.PROTOCOLS names
    batch_size: int = 16  # images per encode/decode
    unit_size: int = 256  # images per resumable unit (and per rank hand-out)
    kid: bool = True  # KID beside FID (torch-fidelity protocol)
    grid_rows: int = 6  # rows per subset in grid.png
    fid_batch_size: int = 32
    fresh: bool = False  # discard an earlier run in the output folder instead of resuming it
    inference: InferenceOptions = field(default_factory=InferenceOptions)  # encode/decode dtype, compile

    def __post_init__(self) -> None:
        if not MIN_RES <= self.res <= MAX_RES:
            raise ValueError(f"--res {self.res}: the evaluation resolution must be in [{MIN_RES}, {MAX_RES}]")


def pair_folders(name: str) -> tuple[str, str]:
    """(reference, reconstruction) folder names a protocol reads."""
    return ("gts", "samples") if describe(name)["pairs"] == "official" else ("originals", "reconstructions")


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (a hard link: no second copy on disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@inference_context()
def _reconstruct_unit(tok: torch.nn.Module, unit: store.Unit, out_dir: Path, opts: RfidOptions,
                      lpips: LpipsMetric, tick: Callable[[int, int, UsageCounts], None]) -> store.UnitResult:
    device = next(tok.parameters()).device
    same_res = opts.res == tok.image_size
    usage = UsageCounts(tok.scales, tok.codebook_size)
    result = store.UnitResult([], [], {})
    metrics: dict[str, list[np.ndarray]] = {}
    for first in range(0, len(unit.paths), opts.batch_size):
        sources, names = [], []
        for i, path in enumerate(unit.paths[first : first + opts.batch_size], start=unit.start + first):
            try:
                sources.append(pairs.load_source(path))
                names.append(f"{i:06d}.png")
            except pairs.ImageLoadError as err:
                result.failures.append((str(path), str(err)))
        if sources:
            x = torch.stack([pairs.official_input(s, tok.image_size) for s in sources])
            views = quantize_views(tok.quantizer, tok.encode_features(x.to(device)))
            for view, idx in views.items():
                usage.add(view, idx)
            batch = pairs.make_pairs(sources, x, tok.codes_to_img(views["shared"]), opts.res, lpips, device)
            written = {"gts": batch.gts, "samples": batch.samples, "originals": batch.originals}
            if not same_res:
                written["reconstructions"] = batch.reconstructions
            for folder, images in written.items():
                for name, image in zip(names, images):
                    save_png(image, out_dir / folder / unit.subset / name)
            if same_res:  # our reconstruction IS the sample
                for name in names:
                    _link_or_copy(out_dir / "samples" / unit.subset / name,
                                  out_dir / "reconstructions" / unit.subset / name)
            for key, values in batch.metrics.items():
                metrics.setdefault(key, []).append(values)
            result.names += names
        tick(len(sources), len(unit.paths[first : first + opts.batch_size]) - len(sources), usage)
    result.metrics = {k: np.concatenate(v) for k, v in metrics.items()}
    result.usage = usage.counts
    return result


def _features(out_dir: Path, units: list[store.Unit], results: dict[str, store.UnitResult], opts: RfidOptions,
              spec: FeatureSpec, device: torch.device) -> None:
    """This rank's missing feature files, per protocol and unit."""
    net = None
    for name in opts.protocols:
        ref_dir, rec_dir = pair_folders(name)
        for unit in units:
            names = results[unit.key].names
            if store.features_path(out_dir, name, unit).is_file() or not names:
                continue
            net = net or FeatureNetwork(spec, device, opts.fid_batch_size)
            ref = protocol_features(name, [out_dir / ref_dir / unit.subset / n for n in names], net)
            rec = protocol_features(name, [out_dir / rec_dir / unit.subset / n for n in names], net)
            store.save_features(out_dir, name, unit, ref, rec)


def _identity(tok: TokenFlowTokenizer, subsets: list[EvalSubset], opts: RfidOptions) -> dict:
    paths = {s.name: [str(p) for p in s.paths] for s in subsets}
    return {**tokenizer_id(tok), "model_resolution": tok.image_size, "resolution": opts.res,
            "inputs_sha256": store.inputs_sha256(paths), "unit_size": opts.unit_size,
            "inference": opts.inference.describe()}


def run_rfid(tok: TokenFlowTokenizer, subsets: list[EvalSubset], out_dir: Path, spec: FeatureSpec,
             lpips: LpipsMetric, opts: RfidOptions, progress: ProgressFn | None = None,
             dist: DistInfo | None = None) -> dict | None:
    """Reconstruct, extract features and return the report on rank 0 (None on other ranks; the
    caller writes it). The tokenizer is prepared in place for `opts.inference`."""
    dist = dist or DistInfo()
    tok = prepare_for_inference(tok, opts.inference)
    device = next(tok.parameters()).device
    out_dir, started = Path(out_dir), time.perf_counter()
    identity = _identity(tok, subsets, opts)
    if dist.is_main:
        store.open_run(out_dir, identity, opts.fresh)
    barrier()
    if not dist.is_main:
        store.open_run(out_dir, identity, fresh=False)  # checks the manifest rank 0 wrote
    units = store.make_units({s.name: [str(p) for p in s.paths] for s in subsets}, opts.unit_size)
    mine = store.mine(units, dist.rank, dist.world_size)
    done = {"images": 0, "failed": 0, "reused": 0}
    running = UsageCounts(tok.scales, tok.codebook_size)

    def tick(n: int, failed: int, usage: UsageCounts) -> None:
        done["images"] += n + failed
        done["failed"] += failed
        if progress:
            merged = {v: running.counts.get(v, 0) + c for v, c in usage.counts.items()}
            share = float((merged["shared"].sum(0) > 0).mean()) if merged else 0.0
            progress(done["images"], done["failed"], share)

    results = {}
    for unit in mine:
        result = store.load_unit(out_dir, unit)
        if result is None:
            result = _reconstruct_unit(tok, unit, out_dir, opts, lpips, tick)
            store.save_unit(out_dir, unit, result)
        else:
            done["reused"] += 1
            tick(len(result.names), len(result.failures), UsageCounts(tok.scales, tok.codebook_size))
        for view, counts in result.usage.items():
            running.counts[view] = running.counts.get(view, 0) + counts
        results[unit.key] = result
    recon_s = time.perf_counter() - started
    _features(out_dir, mine, results, opts, spec, device)
    barrier()
    if not dist.is_main:
        return None
    report = _report(tok, subsets, units, out_dir, spec, lpips, opts, device)
    report["run"] = {"units": len(units), "reused_units_on_rank0": done["reused"], "ranks": dist.world_size,
                     "seconds": {"reconstruct": round(recon_s, 2), "total": round(time.perf_counter() - started, 2)}}
    return report


def _mean(parts: list[np.ndarray]) -> float | None:
    parts = [p for p in parts if len(p)]
    return float(np.concatenate(parts).mean()) if parts else None


def _row(results: list[store.UnitResult], features: dict[str, list[tuple[np.ndarray, np.ndarray]]],
         usage: UsageCounts, opts: RfidOptions) -> dict:
    n = sum(len(r.names) for r in results)
    row = {"n": n, "failed": sum(len(r.failures) for r in results), "rfid": {}}
    for name, parts in features.items():
        if n < 2:
            row["rfid"][name] = None
            continue
        ref = np.concatenate([p[0] for p in parts])
        rec = np.concatenate([p[1] for p in parts])
        dist = protocol_fid(name, ref, rec, kid=opts.kid)
        row["rfid"][name] = dist["fid"]
        if name == "torch-fidelity" and opts.kid:
            row.update(kid=dist["kid"], kid_std=dist["kid_std"])
    for key in ("psnr_official", "ssim_official", "psnr", "ssim", "lpips"):
        row[key] = _mean([r.metrics[key] for r in results if key in r.metrics])
    overall = usage.summary()["shared"]["overall"] if usage.counts else {}
    row.update(usage=overall.get("usage"), perplexity=overall.get("perplexity"))
    return row


def _report(tok: TokenFlowTokenizer, subsets: list[EvalSubset], units: list[store.Unit], out_dir: Path,
            spec: FeatureSpec, lpips: LpipsMetric, opts: RfidOptions, device: torch.device) -> dict:
    loaded = {u.key: store.load_unit(out_dir, u) for u in units}
    missing = [k for k, r in loaded.items() if r is None]
    if missing:
        raise RuntimeError(f"rfid: {len(missing)} units were not reconstructed (first: {missing[0]})")
    results, total = {}, UsageCounts(tok.scales, tok.codebook_size)
    groups = {s.name: [u for u in units if u.subset == s.name] for s in subsets}
    if len(groups) > 1:
        groups["all"] = units
    for group, members in groups.items():
        usage = UsageCounts(tok.scales, tok.codebook_size)
        for unit in members:
            for view, counts in loaded[unit.key].usage.items():
                usage.counts[view] = usage.counts.get(view, 0) + counts
        if group == "all" or len(groups) == 1:
            total = usage
        feats = {name: [f for u in members if (f := store.load_features(out_dir, name, u)) is not None]
                 for name in opts.protocols}
        results[group] = _row([loaded[u.key] for u in members], feats, usage, opts)
    failures = [f for r in loaded.values() for f in r.failures]
    return {
        "command": "tokenflow eval rfid",
        "model": {**tokenizer_id(tok), "resolution": tok.image_size, "codebook_size": tok.codebook_size,
                  "scales": list(tok.scales)},
        "protocols": list(opts.protocols),
        "protocol": _protocol(tok, opts, spec, lpips, device),
        "data": {s.name: {"description": s.description, "files": len(s.paths)} for s in subsets},
        "counts": {"images": sum(len(r.names) for r in loaded.values()), "failed": len(failures)},
        "results": results,
        "usage": {"shared_semantic_pixel": total.summary()},
        "failures": [{"path": p, "reason": r} for p, r in failures[:100]],
        "warnings": _warnings(tok, spec, lpips),
        "files": {**{name: [str(out_dir / f) for f in pair_folders(name)] for name in opts.protocols},
                  "grid": _grid(out_dir, units, loaded, opts)},
    }


def _protocol(tok: TokenFlowTokenizer, opts: RfidOptions, spec: FeatureSpec, lpips: LpipsMetric,
              device: torch.device) -> dict:
    network = {"feature_extractor": spec.label, "weights": spec.weights_path, "weights_sha256": spec.weights_sha256,
               "is_real_fid": spec.is_real_fid}
    return {
        "resolution": opts.res,
        "model_resolution": tok.image_size,
        "resized_for_model": opts.res != tok.image_size,
        "official_pair": {"folders": ["gts", "samples"], "loader": pairs.OFFICIAL_LOADER, "crop": pairs.OFFICIAL_CROP,
                          "resize": pairs.OFFICIAL_RESIZE, "reference": pairs.OFFICIAL_REFERENCE,
                          "sample": pairs.SAMPLE_QUANTIZE, "psnr": pairs.OFFICIAL_PSNR, "ssim": pairs.OFFICIAL_SSIM},
        "our_pair": {"folders": ["originals", "reconstructions"],
                     "crop": pairs.OURS_CROP, "resize": pairs.OURS_RESIZE, "reconstruction": pairs.SAMPLE_QUANTIZE,
                     "psnr": PSNR_PROTOCOL, "ssim": SSIM_PROTOCOL, "lpips": _lpips_info(lpips)},
        "fid": {name: {**describe(name), **network, "kid": name == "torch-fidelity" and opts.kid,
                       **({"backend": f"torch-fidelity {torch_fidelity.__version__}", "kid_subsets": KID_SUBSETS}
                          if name == "torch-fidelity" else {})} for name in opts.protocols},
        "codebook_usage": "share of the K codes hit by the shared index over all scales; perplexity = exp(entropy)",
        "device": str(device),
        "precision": opts.inference.dtype,
        "inference": opts.inference.describe(),
    }


def _lpips_info(lpips: LpipsMetric) -> dict:
    return {"label": lpips.label, "real_backbone": lpips.real_backbone, "backbone": lpips.backbone_path,
            "backbone_sha256": file_sha256(lpips.backbone_path) if lpips.backbone_path else None,
            "unavailable": lpips.unavailable or None}


def _warnings(tok: TokenFlowTokenizer, spec: FeatureSpec, lpips: LpipsMetric) -> list[str]:
    warnings = []
    if tok.random_init:
        warnings.append("the tokenizer is RANDOMLY INITIALISED: these numbers say nothing about a trained model")
    if not spec.is_real_fid:
        warnings.append(f"distribution metrics use {spec.label}: they are NOT FID/KID and not comparable to papers")
    if not lpips.real_backbone:
        warnings.append(f"LPIPS: {lpips.unavailable or lpips.label}")
    return warnings


def _grid(out_dir: Path, units: list[store.Unit], loaded: dict[str, store.UnitResult], opts: RfidOptions) -> str | None:
    """Originals beside reconstructions, the first rows of each subset."""
    from PIL import Image

    rows: dict[str, list[str]] = {}
    for unit in units:
        taken = rows.setdefault(unit.subset, [])
        taken += loaded[unit.key].names[: opts.grid_rows - len(taken)]
    names = [(subset, n) for subset, ns in rows.items() for n in ns]
    if not names:
        return None
    columns = [np.stack([np.asarray(Image.open(out_dir / folder / s / n)) for s, n in names])
               for folder in ("originals", "reconstructions")]
    path = out_dir / "grid.png"
    save_png(grid(columns, max_rows=len(names)), path)
    return str(path)
