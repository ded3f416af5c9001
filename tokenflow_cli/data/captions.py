"""Captioned-image and VQA files: JSON Lines readers/writers and LLaVA conversation export.

Image paths inside a .jsonl are relative to that file's folder, so a dataset folder can move.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON Lines file (blank lines skipped); errors name the line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records one per line via a temporary file renamed at the end; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with tmp.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def load_captions(path: str | Path, field: str = "caption") -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a .jsonl with "image" and `field` entries."""
    base = Path(path).parent
    pairs = []
    for number, record in enumerate(read_jsonl(path), start=1):
        if "image" not in record or field not in record:
            raise ValueError(f'{path}: record {number} lacks "image" or "{field}"')
        pairs.append((base / record["image"], str(record[field])))
    return pairs


def british_spelling(question: str, key: str, share: float) -> str:
    """`question` with "color" spelled "colour" for a fixed `share` of keys (by a hash of `key`,
    so the same conversation always gets the same spelling)."""
    if share <= 0 or (zlib.crc32(key.encode()) % 1000) >= share * 1000:
        return question
    return question.replace("color", "colour").replace("Color", "Colour")


def export_llava(vqa_jsonl: str | Path, out_json: str | Path, colour_share: float = 0.5) -> int:
    """VQA pairs ({"image", "question", "answer"}) -> LLaVA conversation JSON; returns the count.

    One single-turn conversation per pair: [{"id", "image", "conversations": [{"from": "human",
    "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}]. Image paths are rewritten
    relative to `out_json`'s folder, LLaVA's `image_folder`. A `colour_share` of the questions
    spell "colour" (British), so a model trained on them takes either spelling; vqa.jsonl, which
    `eval vqa` scores, keeps one.
    """
    vqa_jsonl, out_json = Path(vqa_jsonl), Path(out_json)
    source_dir, target_dir = vqa_jsonl.parent.resolve(), out_json.parent.resolve()
    conversations = []
    per_image: dict[str, int] = {}
    for record in read_jsonl(vqa_jsonl):
        image = os.path.relpath(source_dir / record["image"], target_dir)
        turn = per_image.get(image, 0)
        per_image[image] = turn + 1
        conversations.append(
            {
                "id": f"{Path(image).with_suffix('').as_posix()}-{turn}",
                "image": Path(image).as_posix(),
                "conversations": [
                    {"from": "human", "value": "<image>\n" + british_spelling(
                        record["question"], f"{image}-{turn}", colour_share)},
                    {"from": "gpt", "value": str(record["answer"])},
                ],
            }
        )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(f".{out_json.name}.tmp")
    tmp.write_text(json.dumps(conversations, indent=1))
    os.replace(tmp, out_json)
    return len(conversations)


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line, blank lines and #-comments skipped) or a .jsonl with
    "prompt" (or "caption") fields."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = read_jsonl(path)
        out = [str(r.get("prompt", r.get("caption", ""))) for r in records]
        if any(not ("prompt" in r or "caption" in r) for r in records):
            raise ValueError(f"{path}: every record needs a \"prompt\" or \"caption\"")
        return out
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """The prompt lines of a GenEval metadata file, each checked for GenEval's required fields."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        problems = [f for f, kind in (("tag", str), ("prompt", str), ("include", list))
                    if not isinstance(record.get(f) if isinstance(record, dict) else None, kind)]
        if problems:
            raise ValueError(f"{path}:{number}: a GenEval line needs {', '.join(problems)} "
                             '({"tag": str, "include": [...], "prompt": str})')
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records
