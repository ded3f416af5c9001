"""The markdown summary of benchmarks/device_check.py's results.json: stage status, then one table
per benchmark with the figures issue 23 asks for (images/s or tokens/s, TFLOP/s, share of the
ceiling measured in the same run, peak memory, agreement and reconstruction difference)."""

from __future__ import annotations


def _f(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _inference(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["layout"], "-", "-", str(r["batch_size"]), r["error"], "", "", "", "", ""])
            continue
        quality = (f"{100 * r['index_agreement']:.2f}% indices" if r["stage"] == "encode"
                   else f"{r['psnr_db']:.1f} dB vs first mode")
        out.append([r["layout"], r["stage"], r["mode"], str(r["batch_size"]), _f(r["images_per_s"]),
                    _f(r.get("speedup_vs_official"), ".2f"), _f(r["gflops"] / 1e3, ".1f"),
                    _f(100 * r.get("share_of_ceiling", 0)), _f(r["peak_mb"], ".0f"), quality])
    return _table(["layout", "stage", "mode", "batch", "img/s", "x official", "TFLOP/s", "% ceiling", "peak MB",
                   "agreement / recon"], out)


def _tokenize(rows: list[dict]) -> list[str]:
    return _table(["layout", "dtype", "batch", "workers", "files->codes img/s", "network-only img/s",
                   "share of network", "TFLOP/s (files)", "% ceiling"],
                  [[r["layout"], r["dtype"], str(r["batch_size"]), str(r["workers"]), _f(r["files_images_per_s"]),
                    _f(r["network_images_per_s"]), _f(100 * r["files_share_of_network"]) + "%",
                    _f(r["files_tflops"], ".2f"), _f(100 * r.get("share_of_ceiling", 0))] for r in rows])


def _sampler(rows: list[dict]) -> list[str]:
    return _table(["config", "schedule", "batch", "layers", "dtype", "tokens/s", "x recompute-all", "TFLOP/s",
                   "% ceiling", "peak MB", "same codes"],
                  [[r["config"], r["schedule"], str(r["batch"]), str(r["layers"]), r.get("dtype", "fp32"),
                    _f(r.get("tokens_per_s"), ".0f"), _f(r["speedup"], ".2f"), _f(r.get("tflops"), ".2f"),
                    _f(100 * r.get("share_of_ceiling", 0)), _f(r.get("peak_mb"), ".0f"),
                    f"{r['same_codes']} ({100 * r['codes_agree']:.1f}%)"] for r in rows])


def _train(rows: list[dict]) -> list[str]:
    return _table(["case", "batch", "s/step", "img/s", "TFLOP/s", "% ceiling", "peak MB"],
                  [[r["case"], str(r["batch_size"]), _f(r["s_per_step"], ".3f"), _f(r["images_per_s"]),
                    _f(r.get("tflops"), ".2f"), _f(100 * r.get("share_of_ceiling", 0)), _f(r.get("peak_mb"), ".0f")]
                   for r in rows])


def _pytest(tests: dict) -> list[str]:
    rows = []
    for name, t in tests.items():
        figures = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("outcome", "message"))
        rows.append([name, t["outcome"], (figures or t.get("message", ""))[:300].replace("|", "/")])
    return _table(["test", "outcome", "figures / message"], rows)


def render(results: dict) -> str:
    env = results.get("environment", {})
    lines = ["# device check", "", f"{env.get('gpu') or 'no GPU'}; torch {env.get('torch')} (CUDA {env.get('cuda')}); "
             f"python {env.get('python')}; {env.get('cpus')} CPUs; {env.get('mode')}; started {env.get('started')}", "",
             "packages: " + ", ".join(f"{k[4:]} {v}" for k, v in env.items() if k.startswith("pkg_")), ""]
    stages = results.get("stages", {})
    lines += _table(["stage", "status", "seconds", "time box"],
                    [[n, s["status"], _f(s.get("seconds")), str(s.get("time_box_s", "-"))] for n, s in stages.items()])
    for name, stage in stages.items():
        result = stage.get("result")
        if not result:
            if stage["status"] not in ("ok", "skipped (budget spent)"):
                tail = stage.get("output_tail", "").strip().splitlines()[-8:]
                lines += [f"## {name}: {stage['status']}", "", "```", *tail, "```", ""]
            continue
        lines += [f"## {name}", ""]
        if name.startswith("pytest"):
            lines += _pytest(result)
        elif name.startswith("inference"):
            lines += [f"ceiling GFLOP/s: {_ceil(result.get('ceiling_gflops', {}))}", "", *_inference(result["rows"])]
        elif name.startswith("tokenize"):
            lines += [f"ceiling GFLOP/s: {_ceil(result.get('ceiling_gflops', {}))}", "", *_tokenize(result["rows"])]
        elif name.startswith("sampler"):
            lines += [f"ceiling GFLOP/s: {_ceil(result.get('meta', {}).get('ceiling_gflops', {}))}", "",
                      *_sampler(result["rows"])]
        elif name.startswith("train"):
            lines += [f"ceiling GFLOP/s: {_ceil(result.get('env', {}).get('ceiling_gflops', {}))}", "",
                      *_train(result["rows"])]
    return "\n".join(lines) + "\n"


def _ceil(ceiling: dict) -> str:
    return ", ".join(f"{k.removeprefix('ceiling_')} {v:.0f}" for k, v in ceiling.items() if k.startswith("ceiling_"))
