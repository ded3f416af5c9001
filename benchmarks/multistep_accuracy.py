"""Does the second pass fix a draft? Teacher-forced on held-out shapes-world images: for every
scale k the earlier scales are the ground truth, a draft of scale k is drawn with the first pass
of the two-pass preset (1200, 0.8), and scale k is re-predicted from that draft by our trained
`refine` block and by the official untrained `inplace` re-run (scale k's positions with the
running map including the draft as input). Reports the token accuracy (argmax == ground truth)
of the first pass, of the draft and of each re-prediction, per scale and over all tokens.

    python benchmarks/multistep_accuracy.py [--model RUN] [--images 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from tokenflow_cli.data.captions import read_jsonl
from tokenflow_cli.data.images import load_image, resize_center_crop, to_tensor_pm1
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.generation.model import RefineBlock
from tokenflow_cli.generation.next_scale import running_map
from tokenflow_cli.generation.sampling import get_schedule, sample_codes
from tokenflow_cli.generation.text_to_image import resolve_generator


def _held_out(loaded, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        render_shapes_world(Path(tmp), n=n, seed=seed, size=loaded.tokenizer.image_size)
        records = read_jsonl(Path(tmp) / "captions.jsonl")
        size = loaded.tokenizer.image_size
        images = torch.stack([to_tensor_pm1(resize_center_crop(load_image(Path(tmp) / r["image"]), size))
                              for r in records])
        codes = loaded.tokenizer.img_to_codes(images).indices
    return codes, [r["caption"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=12345, help="shapes-world seed (the shipped run used 0)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/multistep_accuracy.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = resolve_generator(args.model, torch.device("cpu"))
    model, tok = loaded.model, loaded.tokenizer
    codes, captions = _held_out(loaded, args.images, args.seed)
    text = loaded.prompts(captions)
    inputs = model.scale_inputs(tok, codes)
    first = model(text, inputs).logits_BLK
    g = torch.Generator().manual_seed(0)
    draft_pass = get_schedule("two-pass")[0]
    names = ["first pass", "draft", "refine", "inplace"]
    hits = {k: [0] * len(model.scales) for k in names}
    maps = running_map(model.config.next_scale_input, tok)
    for si in range(len(model.scales)):
        span = model.scale_slice(si)
        truth, logits = codes[:, span], first[:, span]
        draft = sample_codes(logits, draft_pass, generator=g)
        refined = model(text, inputs, RefineBlock(si, tok.lookup_codes(draft))).refine_logits_BlK
        replaced = list(inputs)
        if si > 0:
            replaced[si - 1] = maps.with_draft(draft, si)
        inplace = model(text, replaced).logits_BLK[:, span] if si > 0 else logits
        for name, pred in zip(names, [logits.argmax(-1), draft, refined.argmax(-1), inplace.argmax(-1)], strict=True):
            hits[name][si] = int((pred == truth).sum())
        maps.commit(truth, si)
    tokens = [codes.shape[0] * s * s for s in model.scales]
    rows = {name: {"overall": sum(h) / sum(tokens), "per_scale": [x / t for x, t in zip(h, tokens, strict=True)]}
            for name, h in hits.items()}
    print(f"generator: {loaded.source}; {codes.shape[0]} held-out images")
    print(f"{'':<12}{'all':>7}" + "".join(f"{s:>7}" for s in model.scales))
    for name, row in rows.items():
        print(f"{name:<12}{row['overall']:>7.3f}" + "".join(f"{x:>7.3f}" for x in row["per_scale"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"generator": loaded.source, "images": codes.shape[0], "scales": model.scales,
                                     "accuracy": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
