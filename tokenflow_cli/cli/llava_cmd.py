"""`ask` (and `finetune-llava`): the understanding model from the command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import DeviceOpt, SeedOpt, app, console, err_console, fail

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


def quiet_transformers() -> None:
    """No tqdm bars or advisory warnings from transformers inside our own output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_for_inference(model: str | None, tokenizer: str | None, device: str):
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.understanding import load_understanding

    quiet_transformers()
    try:
        loaded = load_understanding(model, resolve_device(device), tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    for warning in loaded.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
    return loaded


@app.command("ask")
def ask_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    question: Annotated[str, typer.Argument(help="Question about the image.")],
    model: LlavaModelOpt = None,
    tokenizer: TokenizerOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer in tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; > 0 samples.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Answer a question about an image, streaming the answer as it is generated."""
    import torch

    from tokenflow_cli.data.images import ImageLoadError

    loaded = load_for_inference(model, tokenizer, device)
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
        "model": str(loaded.model_dir),
        "tokenizer": loaded.tokenizer_source,
        "features": loaded.model.config.features,
        "temperature": temperature,
        "seconds": round(time.perf_counter() - start, 3),
        "warnings": loaded.warnings,
    }
    console.print_json(json.dumps(record))
