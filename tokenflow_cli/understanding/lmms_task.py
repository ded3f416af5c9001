"""A tiny lmms-eval task from the shapes world, to run `lmms-eval --model tokenflow` offline.

    python -m tokenflow_cli.understanding.lmms_task TASK_DIR [-n IMAGES] [--size PX]
    lmms-eval --model tokenflow --model_args pretrained=RUN --tasks tokenflow_shapes_vqa \\
        --include_path TASK_DIR --output_path OUT

TASK_DIR gets the held-out shapes VQA pairs as a `datasets` DatasetDict saved to disk (split
"test": image, question, answer, type), `tokenflow_shapes_vqa.yaml` (lmms-eval's
`load_from_disk` dataset kwarg: no hub access) and the `utils.py` the YAML points at (exact match
after lower-casing and stripping punctuation, the VQA answer normalisation of `eval vqa`).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import datasets
from PIL import Image

from tokenflow_cli.data.shapes import render_shapes_world

TASK_NAME = "tokenflow_shapes_vqa"
SEED = 20_251  # a shapes world no training recipe uses

YAML = """task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

UTILS = '''"""doc_to_visual / doc_to_text / process_results of the tokenflow_shapes_vqa task."""

import re


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _normalize(text):
    return re.sub(r"[^a-z0-9 ]", "", str(text).lower()).strip()


def process_results(doc, results):
    return {"exact_match": float(_normalize(results[0]) == _normalize(doc["answer"]))}
'''


def write_shapes_task(out_dir: str | Path, n_images: int = 8, size: int = 32, seed: int = SEED) -> Path:
    """Render `n_images` shapes scenes and write the dataset, YAML and utils.py; returns the YAML."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        render_shapes_world(Path(tmp), n_images, seed=seed, size=size)
        rows = [json.loads(line) for line in (Path(tmp) / "vqa.jsonl").read_text().splitlines() if line.strip()]
        images = {}
        for row in rows:
            if row["image"] not in images:
                buffer = io.BytesIO()
                Image.open(Path(tmp) / row["image"]).convert("RGB").save(buffer, format="PNG")
                images[row["image"]] = buffer.getvalue()
    features = datasets.Features({"question_id": datasets.Value("int32"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "type": datasets.Value("string")})
    table = {"question_id": list(range(len(rows))),
             "image": [{"bytes": images[r["image"]], "path": None} for r in rows],
             "question": [r["question"] for r in rows], "answer": [str(r["answer"]) for r in rows],
             "type": [r.get("type", "") for r in rows]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(out_dir / "data"))
    (out_dir / "utils.py").write_text(UTILS)
    yaml_path = out_dir / f"{TASK_NAME}.yaml"
    yaml_path.write_text(YAML.format(task=TASK_NAME, data=out_dir / "data"))
    return yaml_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_dir", type=Path)
    parser.add_argument("-n", "--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    path = write_shapes_task(args.task_dir, args.images, args.size)
    print(f"wrote {path}")  # noqa: T201 (a script's one line of output)


if __name__ == "__main__":
    main()
