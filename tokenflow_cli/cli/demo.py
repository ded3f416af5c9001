"""`make demo` (`python -m tokenflow_cli.cli.demo`): the whole tokenizer story on a laptop CPU.

Renders a small shapes world plus natural-image crops, trains the toy tokenizer (recipe shapes-toy, 32 px) for a
few minutes, tokenizes and reconstructs held-out images, prints a summary (PSNR, codebook usage,
images/s), writes the reconstruction grids, and installs the trained tokenizer as the default
that `tokenflow tokenize` uses without `--model`.

The demo is a list of steps run in order on one `DemoContext`; later parts append their own
step (e.g. the generator: `DEMO_STEPS.append(train_generator_step)`), reading
`ctx.tokenizer_path` and the data folders and adding lines to `ctx.summary`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CALIBRATION_STEPS = 6  # inside the recipe's warmup, so calibrating then resuming == one run
DEMO_SIZE = 32  # the toy world of the shipped defaults (recipes shapes-toy, generator-toy, llava-toy)
TOKENIZER_RECIPE = "shapes-toy"
GENERATOR_RECIPE = "generator-toy"


@dataclass
class DemoContext:
    out_dir: Path  # everything the demo writes lives here
    minutes: float  # training budget for the tokenizer
    device: str = "cpu"
    seed: int = 0
    n_shapes: int = 1200
    n_natural: int = 400
    n_val: int = 32  # held-out images per kind
    install: bool = True  # make the trained tokenizer (and generator) the defaults
    gen_minutes: float = 1.5  # generator training budget (0 skips the generator)
    overrides: list[str] = field(default_factory=list)  # extra `--set` values for the tokenizer recipe
    data: dict[str, Path] = field(default_factory=dict)  # name -> image folder or list file
    run_dir: Path | None = None
    tokenizer_path: Path | None = None  # the trained model.safetensors
    summary: list[str] = field(default_factory=list)
    held_out_psnr: float | None = None  # the trained tokenizer's mean PSNR over the held-out parts

    def say(self, text: str) -> None:
        print(text, flush=True)


def prepare_data(ctx: DemoContext) -> None:
    """Shapes world and natural crops (train and disjoint val), plus list files mixing both."""
    from tokenflow_cli.data.natural import natural_crops
    from tokenflow_cli.data.shapes import render_shapes_world

    root = ctx.out_dir / "data"
    started = time.perf_counter()
    render_shapes_world(root / "shapes", n=ctx.n_shapes, seed=ctx.seed, size=DEMO_SIZE, llava=True)
    render_shapes_world(root / "shapes_val", n=ctx.n_val, seed=ctx.seed + 1000, size=DEMO_SIZE)
    natural_crops(root / "natural", n=ctx.n_natural, size=DEMO_SIZE, seed=ctx.seed, split="train")
    natural_crops(root / "natural_val", n=ctx.n_val, size=DEMO_SIZE, seed=ctx.seed, split="val")
    for split, parts in (("train", ("shapes", "natural")), ("val", ("shapes_val", "natural_val"))):
        lines = [f"{part}/images/{p.name}" for part in parts for p in sorted((root / part / "images").glob("*.png"))]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        ctx.data[split] = root / f"{split}.txt"
    for part in ("shapes", "shapes_val", "natural", "natural_val"):
        ctx.data[part] = root / part / "images"
    ctx.say(f"data: {ctx.n_shapes} shapes + {ctx.n_natural} natural crops for training, "
            f"{ctx.n_val} + {ctx.n_val} held out ({time.perf_counter() - started:.0f}s) in {root}")


def _teacher_overrides(ctx: DemoContext) -> list[str]:
    """Use the tiny CLIP teacher (shipped with the package, or trained by `train-teacher`) for
    the semantic branch when it is found; otherwise the tiny recipe's random tower, as labelled."""
    from tokenflow_cli.weights import find_weight_file

    found = find_weight_file("teacher-tiny")
    if found is None:
        ctx.say("teacher: no trained tiny teacher found; the semantic branch uses a random tower")
        return []
    ctx.say(f"teacher: {found}")
    return [f"model.teacher.pretrained={found}", f"model.semantic_encoder.pretrained={found}"]


def _stop_if_interrupted(result):
    """Ctrl-C / SIGTERM during a demo training: stop the demo (exit 128 + signal) instead of
    evaluating and installing a half-trained model; the checkpoint stays for a rerun."""
    from tokenflow_cli.errors import exit_code_for_signal

    if result.stop_signal is not None:
        print(f"interrupted at step {result.step}: nothing installed (checkpoint {result.checkpoint})")
        raise SystemExit(exit_code_for_signal(result.stop_signal))
    return result


def train_tokenizer_step(ctx: DemoContext) -> None:
    """Calibrate the speed on a few steps, then train the tokenizer recipe for the budget (resuming)."""
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.stage import train_tokenizer

    ctx.run_dir = ctx.out_dir / "tokenizer_run"
    teacher = _teacher_overrides(ctx)

    def recipe(steps: int):
        return load_recipe(TOKENIZER_RECIPE, TokenizerRecipe, overrides=[
            f"data.train={ctx.data['train']}", f"data.val={ctx.data['val']}", f"train.steps={steps}",
            f"train.seed={ctx.seed}", "train.log_every=1" if steps == CALIBRATION_STEPS else "train.log_every=10",
            f"train.eval_every={0 if steps == CALIBRATION_STEPS else steps}", "data.val_limit=64",
            *teacher, *ctx.overrides,
        ])

    ctx.say(f"tokenizer: measuring speed over {CALIBRATION_STEPS} steps ...")
    started = time.perf_counter()
    calib = _stop_if_interrupted(
        train_tokenizer(recipe(CALIBRATION_STEPS), ctx.run_dir, device=ctx.device, resume=False, live=False))
    rates = [row["images_per_s"] for row in calib.history[1:]]  # the first step pays for warm-up
    per_step = recipe(1).train.batch_size / max(statistics.median(rates), 1e-6)
    left = max(ctx.minutes * 60 - (time.perf_counter() - started), 30.0)
    steps = int(min(max(left / per_step, 2 * CALIBRATION_STEPS), 5000))
    ctx.say(f"tokenizer: {per_step:.2f} s/step here -> {steps} steps for {ctx.minutes:g} min")
    # the time limit keeps the budget when the machine gets busier than it was while calibrating
    result = _stop_if_interrupted(
        train_tokenizer(recipe(steps), ctx.run_dir, device=ctx.device, resume=True, time_limit_s=1.2 * left))
    ctx.tokenizer_path = ctx.run_dir / "model.safetensors"
    stopped = " (stopped at the time limit)" if result.stopped_early else ""
    ctx.summary.append(f"tokenizer training: {result.step} steps{stopped}, {result.seconds / 60:.1f} min, "
                       f"{result.images_per_s:.1f} images/s")


def evaluate_step(ctx: DemoContext) -> None:
    """Tokenize and reconstruct the held-out shapes and natural crops with the trained model;
    keeps the mean PSNR to compare with the default it would replace."""
    import numpy as np
    import torch

    from tokenflow_cli.data.images import list_images
    from tokenflow_cli.tokenizer.codes import read_codes
    from tokenflow_cli.tokenizer.reconstruct import reconstruct_images
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths

    tok = resolve_tokenizer(str(ctx.tokenizer_path), torch.device(ctx.device))
    psnrs = []
    for part in HELD_OUT_PARTS:
        paths = list_images(ctx.data[part])
        codes_path = ctx.out_dir / f"codes_{part}.npz"
        tokenized = tokenize_paths(tok, paths, codes_path, batch_size=16)
        codes = read_codes(codes_path)
        per_scale = [len(np.unique(codes.per_scale(k))) / tok.codebook_size for k in range(len(codes.scales))]
        recon = reconstruct_images(tok, paths, ctx.out_dir / f"recon_{part}", batch_size=16)
        psnrs.append(recon.psnr)
        ctx.summary.append(
            f"{part}: PSNR {recon.psnr:.2f} dB, codebook usage {tokenized.usage_share:.1%} of "
            f"{tok.codebook_size} (per scale {' '.join(f'{u:.0%}' for u in per_scale)}), "
            f"tokenize {tokenized.images_per_s:.0f} images/s; grid {recon.grid_path}"
        )
    ctx.held_out_psnr = float(np.mean(psnrs))


HELD_OUT_PARTS = ("shapes_val", "natural_val")


def _held_out_psnr(ctx: DemoContext, model: Path, tag: str) -> float:
    """Mean reconstruction PSNR of `model` over the demo's held-out parts (grids under OUT/<tag>_*)."""
    import numpy as np
    import torch

    from tokenflow_cli.data.images import list_images
    from tokenflow_cli.tokenizer.reconstruct import reconstruct_images
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer

    tok = resolve_tokenizer(str(model), torch.device(ctx.device))
    return float(np.mean([reconstruct_images(tok, list_images(ctx.data[part]), ctx.out_dir / f"{tag}_{part}",
                                             batch_size=16).psnr for part in HELD_OUT_PARTS]))


def install_step(ctx: DemoContext) -> None:
    """Make the trained tokenizer the default `tokenize` uses, but only when it reconstructs the
    held-out images better than the default it would replace (the shipped one, or an earlier
    demo's); either way the summary says which was kept and both figures."""
    from tokenflow_cli.checkpoint import WEIGHTS_NAME
    from tokenflow_cli.fileio import atomic_path
    from tokenflow_cli.weights import DEFAULT_TOKENIZER, tokenflow_home

    if not ctx.install:
        return
    current = DEFAULT_TOKENIZER.find()
    if current is not None:
        theirs = _held_out_psnr(ctx, current, "recon_default")
        if theirs >= ctx.held_out_psnr:
            ctx.summary.append(f"kept the default tokenizer {current}: held-out PSNR {theirs:.2f} dB >= "
                               f"{ctx.held_out_psnr:.2f} dB for the one trained here (not installed)")
            return
    target = tokenflow_home() / DEFAULT_TOKENIZER.home_name / WEIGHTS_NAME
    with atomic_path(target) as tmp:
        shutil.copyfile(ctx.tokenizer_path, tmp)
    first = DEFAULT_TOKENIZER.find()
    note = "" if first == target.parent else f" (note: {first} takes precedence)"
    was = f", replacing {current} ({theirs:.2f} dB)" if current is not None else ""
    ctx.summary.append(f"default tokenizer installed: {target} (held-out PSNR {ctx.held_out_psnr:.2f} dB{was}){note}")


DEMO_PROMPTS = ("a red circle", "two blue squares", "a yellow triangle left of a green star")


def generator_step(ctx: DemoContext) -> None:
    """Tokenize the shapes world once, train the toy generator for its budget, sample a grid,
    and install it as the default that `tokenflow generate` uses without --model."""
    import torch

    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.data.images import list_images
    from tokenflow_cli.generation.config import GeneratorRecipe
    from tokenflow_cli.generation.outputs import write_outputs
    from tokenflow_cli.generation.sampling import get_schedule
    from tokenflow_cli.generation.stage import GeneratorStage
    from tokenflow_cli.generation.text_to_image import GenerationSettings, generate_images, resolve_generator
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths
    from tokenflow_cli.train.loop import train

    if ctx.gen_minutes <= 0:
        return
    tok = resolve_tokenizer(str(ctx.tokenizer_path), torch.device(ctx.device))
    codes = ctx.out_dir / "codes_shapes.npz"
    tokenize_paths(tok, list_images(ctx.data["shapes"]), codes, batch_size=32)
    run_dir = ctx.out_dir / "generator_run"
    recipe = load_recipe(GENERATOR_RECIPE, GeneratorRecipe, overrides=[
        f"data.codes={codes}", f"data.captions={ctx.data['shapes'].parent / 'captions.jsonl'}",
        f"data.tokenizer={ctx.tokenizer_path}", f"train.seed={ctx.seed}",
        "train.eval_every=0", "train.checkpoint_every=100000",
    ])
    ctx.say(f"generator: training for {ctx.gen_minutes:g} min ...")
    result = _stop_if_interrupted(train(GeneratorStage(recipe, run_dir), recipe.train, run_dir, recipe=recipe,
                                        device=ctx.device, resume=False, live=False,
                                        time_limit_s=ctx.gen_minutes * 60))
    loaded = resolve_generator(str(run_dir), torch.device(ctx.device))
    settings = GenerationSettings(get_schedule("two-pass"), cfg=3.0, seed=ctx.seed, samples_per_prompt=4)
    samples = ctx.out_dir / "generated"
    write_outputs(samples, generate_images(loaded, list(DEMO_PROMPTS), settings), settings)
    ctx.summary.append(f"generator training: {result.step} steps, {result.seconds / 60:.1f} min; "
                       f"samples for {len(DEMO_PROMPTS)} prompts: {samples / 'grid.png'}")
    if ctx.install:
        _install_generator_if_better(ctx, loaded, run_dir, settings)


SELECTION_PROMPT_SEED = 1000  # GenEval-style prompts for choosing the default; `eval geneval` uses seed 0


def _install_generator_if_better(ctx: DemoContext, trained, run_dir: Path, settings) -> None:
    """Install the trained generator only when it scores higher than the current default on a
    small shapes-world GenEval over selection prompts (not the ones `eval geneval` reports)."""
    import torch

    from tokenflow_cli.generation.geneval import run_geneval
    from tokenflow_cli.generation.text_to_image import resolve_generator
    from tokenflow_cli.weights import DEFAULT_GENERATOR, tokenflow_home

    def score(loaded, tag: str) -> float:
        report = run_geneval(loaded, settings, ctx.out_dir / "selection" / tag, n_per_tag=2,
                             prompt_seed=SELECTION_PROMPT_SEED)
        return float(report["overall"])

    ours = score(trained, "trained")
    current = DEFAULT_GENERATOR.find()
    if current is not None:
        theirs = score(resolve_generator(str(current), torch.device(ctx.device)), "default")
        if theirs >= ours:
            ctx.summary.append(f"kept the default generator {current}: selection GenEval {theirs:.2f} >= "
                               f"{ours:.2f} for the one trained here (not installed)")
            return
    target = tokenflow_home() / DEFAULT_GENERATOR.home_name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints"))
    ctx.summary.append(f"default generator installed: {target} (selection GenEval {ours:.2f})")


SHOWCASE_QUESTIONS = (  # (question, the answer's field of the object); asked about one-object images
    ("What color is the {shape}?", "color"), ("How many {shape}s are there?", "count"),
    ("What shape is the {color} object?", "shape"),
)


def showcase_step(ctx: DemoContext) -> None:
    """What the defaults now in place do (the shipped models, or what this demo installed):
    samples for the demo prompts from the default generator and answers from the default
    understanding model on held-out one-object shapes images, beside the truth."""
    import torch

    from tokenflow_cli.data.captions import read_jsonl
    from tokenflow_cli.generation.outputs import write_outputs
    from tokenflow_cli.generation.sampling import get_schedule
    from tokenflow_cli.generation.text_to_image import GenerationSettings, generate_images, resolve_generator
    from tokenflow_cli.understanding.pipeline import Understanding
    from tokenflow_cli.weights import DEFAULT_LLAVA

    device = torch.device(ctx.device)
    loaded = resolve_generator(None, device)
    if not loaded.random_init:
        settings = GenerationSettings(get_schedule("two-pass"), cfg=3.0, seed=ctx.seed, samples_per_prompt=4)
        out = ctx.out_dir / "default_generated"
        write_outputs(out, generate_images(loaded, list(DEMO_PROMPTS), settings), settings)
        ctx.summary.append(f"default generator {loaded.source}: samples for {', '.join(map(repr, DEMO_PROMPTS))} "
                           f"in {out / 'grid.png'}")
    if DEFAULT_LLAVA.find() is None:
        ctx.summary.append("no default understanding model: `tokenflow ask` needs --model")
        return
    understanding = Understanding.from_pretrained(None, device=device)
    val_dir = ctx.out_dir / "data" / "shapes_val"
    shown = [r for r in read_jsonl(val_dir / "geneval.jsonl") if len(r["objects"]) == 1][:2]
    ctx.summary.append(f"default understanding model {understanding.model_dir}:")
    for record in shown:
        obj = {**record["objects"][0], "count": "1"}
        questions = [template.format(**obj) for template, _ in SHOWCASE_QUESTIONS]
        visual = understanding.visual_tokens([val_dir / record["image"]]).expand(len(questions), -1, -1)
        answers = understanding.model.answer(visual, questions, max_new_tokens=8)
        for question, (_, key), answer in zip(questions, SHOWCASE_QUESTIONS, answers, strict=True):
            ctx.summary.append(f"  {record['image']}: {question} -> {answer!r} (truth {obj[key]!r})")


DEMO_STEPS: list[Callable[[DemoContext], None]] = [
    prepare_data, train_tokenizer_step, evaluate_step, install_step, generator_step, showcase_step,
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenflow_cli.cli.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("demo_out"), help="demo folder")
    parser.add_argument("--minutes", type=float, default=3.5, help="tokenizer training budget")
    parser.add_argument("--gen-minutes", type=float, default=1.5, help="generator training budget (0 = skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-install", action="store_true", help="do not replace the default tokenizer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a tokenizer-recipe value (repeatable), e.g. --set train.lr=3e-4")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; fail fast instead
    ctx = DemoContext(args.output, args.minutes, args.device, args.seed, install=not args.no_install,
                      overrides=args.overrides, gen_minutes=args.gen_minutes)
    started = time.perf_counter()
    for step in DEMO_STEPS:
        step(ctx)
    print(f"\n=== demo summary ({(time.perf_counter() - started) / 60:.1f} min) ===")
    for line in ctx.summary:
        print(line)


if __name__ == "__main__":
    main()
