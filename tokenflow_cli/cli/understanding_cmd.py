"""The understanding model's commands: `ask` and `finetune-llava`, thin layers over
tokenflow_cli.understanding (pipeline, stage). `eval vqa` is in eval_cmd.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import (
    DeviceOpt,
    RecipeArg,
    ResumeOpt,
    SeedOpt,
    SetOpt,
    app,
    console,
    err_console,
    fail,
    quiet_transformers,
)
from tokenflow_cli.cli.models import load_for_inference, precision_name, use_decoding
from tokenflow_cli.cli.training import run_training

LlavaModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Understanding model folder or finetune run folder "
        "(default: $TOKENFLOW_LLAVA or ~/.cache/tokenflow/llava).",
    ),
]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer checkpoint to use instead of the one the model names.")
]
RepetitionPenaltyOpt = Annotated[
    float | None,
    typer.Option("--repetition-penalty", min=1e-6,
                 help="Override the model folder's generation_config.json value (the release's evaluation uses it).")
]
LlmDtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        callback=precision_name,
        help="auto (the precision the model records, bf16 for a converted release) | fp32 | bf16: the LLM's "
        "weights, projector and image tokenizer in fp32 (the official computation) | fp16: the release as its "
        "own loader runs it (LLM, projector, image tokenizer and code search in float16).",
    ),
]


def inference_settings(loaded, **sampling) -> dict:
    """Which model, precision and settings an answer came from (printed and put in JSON)."""
    model = loaded.model
    return {
        "model": str(loaded.model_dir),
        "llm": model.lm.config.model_type,
        "dtype": loaded.dtype,
        "device": str(next(model.parameters()).device),
        "tokenizer": loaded.tokenizer_source,
        "features": model.config.features,
        "feature_scales": model.config.feature_scales,
        "visual_tokens": model.num_visual_tokens,
        "template": model.config.chat_template,
        **sampling,
        **model.decoding.describe(),
    }


def settings_line(settings: dict) -> str:
    shown = {k: v for k, v in settings.items() if k not in ("model", "tokenizer")}
    return f"model {settings['model']} (tokenizer {settings['tokenizer']}): " + ", ".join(
        f"{k} {v}" for k, v in shown.items()
    )


@app.command("ask")
def ask_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    question: Annotated[str, typer.Argument(help="Question about the image.")],
    model: LlavaModelOpt = None,
    tokenizer: TokenizerOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer in tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; > 0 samples.")] = 0.0,
    repetition_penalty: RepetitionPenaltyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: LlmDtypeOpt = "auto",
) -> None:
    """Answer a question about an image, streaming the answer as it is generated (which model,
    precision and settings it used go to stderr)."""
    from tokenflow_cli.data.images import ImageLoadError, load_image

    try:
        load_image(image)  # before any model (and torch) is loaded
    except ImageLoadError as err:
        raise fail(str(err)) from None
    import torch

    loaded = load_for_inference(model, tokenizer, device, dtype)
    use_decoding(loaded, repetition_penalty)
    sampling = {"temperature": temperature, "max_new_tokens": max_new_tokens}
    settings = inference_settings(loaded, **sampling, **({"seed": seed} if temperature > 0 else {}))
    err_console.print(settings_line(settings), highlight=False, soft_wrap=True)  # stdout: the answer only
    try:
        visual_1NC = loaded.visual_tokens([image])
    except ImageLoadError as err:
        raise fail(str(err)) from None
    generator = torch.Generator(visual_1NC.device).manual_seed(seed) if temperature > 0 else None
    start = time.perf_counter()
    pieces = []
    for piece in loaded.model.stream_answer(visual_1NC, question, max_new_tokens, temperature, generator):
        pieces.append(piece)
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    answer = "".join(pieces)
    if not as_json:
        sys.stdout.write("\n")
        return
    record = {
        "image": str(image),
        "question": question,
        "answer": answer,
        **settings,
        "seconds": round(time.perf_counter() - start, 3),
        "warnings": loaded.warnings,
    }
    console.print_json(json.dumps(record))


@app.command("finetune-llava")
def finetune_llava_cmd(
    recipe: RecipeArg,
    stage: Annotated[int, typer.Option("--stage", help="1: projector only; 2: LLM + projector.")] = 1,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run folder (default runs/llava-stage<N>).")
    ] = None,
    init: Annotated[
        str | None, typer.Option("--init", help="Start from this model or run folder (stage 2: the stage-1 run).")
    ] = None,
    set_: SetOpt = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            callback=precision_name,
            help="LLM weights (model.llm_dtype): fp32 | bf16 | fp16 (default: the recipe's).",
        ),
    ] = None,
) -> None:
    """LLaVA-style finetuning on frozen TokenFlow features (checkpoints, resume, torchrun)."""
    from tokenflow_cli.understanding.config import LlavaRecipe, validate

    def train(r, run_dir: Path):
        from tokenflow_cli.understanding.stage import finetune_llava

        quiet_transformers()
        return finetune_llava(r, stage, run_dir, device=device, resume=resume)

    if stage not in (1, 2):
        raise fail(f"--stage must be 1 or 2, got {stage}")
    overrides = list(set_ or []) + ([f"model.init={init}"] if init else [])
    overrides += [f"model.llm_dtype={dtype}"] if dtype and dtype != "auto" else []
    run = run_training(recipe, LlavaRecipe, overrides, output, lambda r: f"llava-stage{stage}", train,
                       validate=validate)
    if run is None:  # rank 0 reports under torchrun
        return
    (result, final), run_dir = run.result, run.run_dir
    last = result.history[-1] if result.history else {}
    figures = [f"loss {last['loss']:.4g}"] if "loss" in last else []
    figures += [f"{k} {v:.4g}" for k, v in result.last_eval.items() if k != "step"]
    console.print(
        f"stage {stage}: {result.step} steps in {result.seconds:.0f}s" + (f" ({', '.join(figures)})" if figures else "")
    )
    if final is not None:
        console.print(f"model: [bold]{final}[/] (transformers format; `tokenflow ask IMAGE Q --model {run_dir}`)")
    else:
        console.print(f"stopped early; resume with the same command (checkpoint {result.checkpoint})")
