"""The paper's understanding ablation at toy scale: VQA accuracy per question type on held-out
shapes for each visual feature choice (tokenflow, pixel, semantic, teacher).

Runs the real commands end to end, offline:

    data shapes (train / val / test worlds) -> train-teacher (tiny CLIP on the captions)
    -> train-tokenizer tiny (semantic branch from that teacher)
    -> for each feature choice: finetune-llava --stage 1, --stage 2, eval vqa

and prints a per-type accuracy table (Markdown) and writes OUT/summary.json.

    python benchmarks/llava_ablation.py -o runs/llava-ablation            # defaults
    python benchmarks/llava_ablation.py -o /tmp/abl --quick                # smoke run, minutes on a CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FEATURES = ("tokenflow", "pixel", "semantic", "teacher")


def run(args: list[str], env: dict[str, str], log: Path, limit_s: float | None = None) -> float:
    """One `tokenflow` command, output appended to `log`; returns seconds. Past `limit_s` it gets
    SIGTERM, on which training commands finish the step, checkpoint and exit cleanly."""
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ tokenflow {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", "tokenflow_cli", *args], env=env, stdout=fh, stderr=fh)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            fh.write(f"[time limit {limit_s:.0f}s: stopping]\n")
            fh.flush()
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): tokenflow {' '.join(args)}; see {log}")
    return time.perf_counter() - start


def last_step(run_dir: Path) -> int:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max((int(r.get("step", 0)) for r in rows if r.get("split") == "train"), default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=Path("runs/llava-ablation"))
    p.add_argument("--device", default="auto")
    p.add_argument("--features", default=",".join(FEATURES))
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--tokenizer-steps", type=int, default=1500)
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage2-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-limit", type=float, default=None, help="seconds, then stop cleanly")
    p.add_argument("--tokenizer-limit", type=float, default=None)
    p.add_argument("--stage1-limit", type=float, default=None)
    p.add_argument("--stage2-limit", type=float, default=None)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="use this trained tokenizer (run folder) instead of training a teacher and a tokenizer")
    p.add_argument("--parallel", action="store_true", help="run the feature choices side by side")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the figures")
    a = p.parse_args()
    if a.quick:
        a.train_images, a.test_images, a.teacher_steps, a.tokenizer_steps = 40, 8, 4, 4
        a.stage1_steps, a.stage2_steps, a.batch_size = 3, 3, 4
    out = a.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENFLOW_HOME": str(out / "home")}
    dev = ["--device", a.device]
    seconds: dict[str, float] = {}

    seconds["data"] = sum(
        run(["data", "shapes", "-n", str(n), "--seed", str(seed), "--llava", "-o", str(out / name)], env, log)
        for name, n, seed in (("train", a.train_images, 0), ("val", 64, 1), ("test", a.test_images, 2))
    )
    tokenizer_dir = a.tokenizer.resolve() if a.tokenizer else out / "tokenizer"
    source = "given"
    if a.tokenizer is None:
        teacher = ["train-teacher", "teacher-tiny", "-o", str(out / "teacher"), "--steps", str(a.teacher_steps)]
        teacher += ["--set", f"data.captions={out / 'train' / 'captions.jsonl'}", *dev]
        try:
            seconds["teacher"] = run(teacher, env, log, a.teacher_limit)
            source = "teacher-tiny"
        except RuntimeError as err:  # go on with a random-init teacher: said in every later output
            print(err, file=sys.stderr)
            source = ""
        tokenizer = ["train-tokenizer", "tiny", "-o", str(out / "tokenizer"), "--steps", str(a.tokenizer_steps)]
        tokenizer += ["--set", f"data.train={out / 'train' / 'images'}", "--set", f"model.teacher.pretrained={source}"]
        tokenizer += ["--set", f"model.semantic_encoder.pretrained={source}", *dev]
        seconds["tokenizer"] = run(tokenizer, env, log, a.tokenizer_limit)
    summary = {
        "settings": {k: v for k, v in vars(a).items() if k != "output"},
        "seconds": seconds,
        "steps": {
            "clip_teacher": last_step(out / "teacher") if source and a.tokenizer is None else 0,
            "tokenizer": last_step(tokenizer_dir),
        },
        "reports": {},
    }

    def chain(feature: str) -> None:
        common = [
            "--set",
            f"model.features={feature}",
            "--set",
            f"model.tokenizer={tokenizer_dir}",
            "--set",
            f"data.train={out / 'train' / 'llava.json'}",
            "--set",
            f"data.val={out / 'val' / 'llava.json'}",
            "--set",
            f"train.batch_size={a.batch_size}",
            "--set",
            f"stage1.steps={a.stage1_steps}",
            "--set",
            f"train.steps={a.stage2_steps}",
            "--set",
            f"train.eval_every={max(a.stage2_steps // 4, 1)}",
            "--set",
            f"train.checkpoint_every={max(a.stage2_steps // 4, 1)}",
            *dev,
        ]
        s1, s2, ev = out / f"{feature}-stage1", out / f"{feature}-stage2", out / f"{feature}-eval"
        seconds[f"{feature}/stage1"] = run(
            ["finetune-llava", "llava-tiny", "--stage", "1", "-o", str(s1), *common],
            env,
            out / f"log-{feature}.txt",
            a.stage1_limit,
        )
        seconds[f"{feature}/stage2"] = run(
            ["finetune-llava", "llava-tiny", "--stage", "2", "-o", str(s2), "--init", str(s1), *common],
            env,
            out / f"log-{feature}.txt",
            a.stage2_limit,
        )
        seconds[f"{feature}/eval"] = run(
            [
                "eval",
                "vqa",
                "--data",
                str(out / "test" / "vqa.jsonl"),
                "--model",
                str(s2),
                "-o",
                str(ev),
                "--batch-size",
                "128",
                *dev,
            ],
            env,
            out / f"log-{feature}.txt",
        )
        summary["steps"][f"{feature}_stages"] = [last_step(s1), last_step(s2)]
        summary["reports"][feature] = json.loads((ev / "report.json").read_text())
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    # the feature choices are independent: run them side by side (tiny models leave a GPU idle)
    features = a.features.split(",")
    with concurrent.futures.ThreadPoolExecutor(len(features) if a.parallel else 1) as pool:
        for future in [pool.submit(chain, f) for f in features]:
            try:
                future.result()
            except RuntimeError as err:  # one failed choice keeps the others' figures
                print(err, file=sys.stderr)
    summary["reports"] = {f: summary["reports"][f] for f in features if f in summary["reports"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(markdown_table(summary["reports"]))
    print("\nsteps: " + json.dumps(summary["steps"]))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


def markdown_table(reports: dict[str, dict]) -> str:
    types = sorted({t for r in reports.values() for t in r["per_type"]})
    lines = ["| features | " + " | ".join(types) + " | all | yes/no acc | acc+ |", "|---" * (len(types) + 4) + "|"]
    for feature, r in reports.items():
        cells = [f"{100 * r['per_type'][t]['accuracy']:.1f}" if t in r["per_type"] else "-" for t in types]
        yn = r.get("yes_no", {})
        lines.append(
            f"| {feature} | " + " | ".join(cells) + f" | {100 * r['accuracy']:.1f} | "
            f"{100 * yn.get('accuracy', 0):.1f} | {100 * yn.get('accuracy_plus', 0):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
