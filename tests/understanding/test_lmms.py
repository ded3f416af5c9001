"""The lmms-eval model `tokenflow` (understanding/lmms.py) on the shipped toy LLaVA, against
lmms-eval's real classes: registered by entry point, generate_until answers what `ask_batch`
answers, loglikelihood is the summed log-probability of the continuation, and (slow) the
`lmms-eval` command runs a local shapes task offline. Skipped where lmms-eval is not installed
(`pip install -e ".[lmms]"`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (the [lmms] extra)")
from lmms_eval.api.instance import Instance  # noqa: E402

TOY = Path(__file__).parents[2] / "tokenflow_cli" / "assets" / "toy-llava"
pytestmark = pytest.mark.skipif(not (TOY / "llava.json").is_file(), reason="no shipped toy LLaVA")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from tokenflow_cli.understanding.lmms_task import write_shapes_task

    folder = tmp_path_factory.mktemp("lmms_task")
    write_shapes_task(folder, n_images=3, size=32)
    import datasets

    return folder, datasets.load_from_disk(str(folder / "data"))["test"]


@pytest.fixture(scope="module")
def model():
    from tokenflow_cli.understanding.lmms import TokenFlowLmms

    return TokenFlowLmms(pretrained=str(TOY), device="cpu", batch_size=4)


def _requests(kind, docs, args_of):
    return [Instance(request_type=kind, arguments=args_of(i), idx=0,
                     metadata={"task": "shapes", "doc_id": i, "repeats": 1}) for i in range(len(docs))]


def test_registered_through_lmms_evals_entry_points():
    if not any(ep.name == "tokenflow" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip("the installed tokenflow distribution predates the entry point: reinstall it")
    from lmms_eval.models import get_model

    from tokenflow_cli.understanding.lmms import TokenFlowLmms

    assert get_model("tokenflow") is TokenFlowLmms


def test_generate_until_answers_what_ask_batch_answers(model, task):
    _, docs = task
    model.task_dict = {"shapes": {"test": docs}}
    gen = {"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    requests = _requests("generate_until", docs, lambda i: (docs[i]["question"], dict(gen),
                                                           lambda d: [d["image"]], i, "shapes", "test"))
    answers = model.generate_until(requests)
    expected = model.pipe.ask_batch([d["image"] for d in docs], [d["question"] for d in docs], max_new_tokens=16)
    assert answers == [a.split("\n\n")[0] for a in expected] and all(isinstance(a, str) for a in answers)


def test_loglikelihood_is_the_continuations_summed_log_probability(model, task):
    _, docs = task
    model.task_dict = {"shapes": {"test": docs}}
    doc = docs[0]
    requests = _requests("loglikelihood", [doc], lambda i: (doc["question"], doc["answer"],
                                                           lambda d: [d["image"]], 0, "shapes", "test"))
    ((logp, greedy),) = model.loglikelihood(requests)
    llava = model.pipe.model
    prompt_BT, _ = llava.prompt_batch([doc["question"]])
    answer = llava.text_tokenizer(doc["answer"], add_special_tokens=False)["input_ids"]
    ids_BT = torch.cat([prompt_BT, torch.tensor([answer])], dim=1)
    labels = torch.full_like(ids_BT, -100)
    labels[0, prompt_BT.shape[1]:] = ids_BT[0, prompt_BT.shape[1]:]
    with torch.no_grad():
        loss = llava(ids_BT, visual_features=model.pipe.visual_tokens([doc["image"]]), labels=labels).loss
    assert logp == pytest.approx(-float(loss) * len(answer), rel=1e-4) and logp < 0
    said = model.pipe.ask_batch([doc["image"]], [doc["question"]], max_new_tokens=len(answer))[0]
    assert greedy == (llava.text_tokenizer(said, add_special_tokens=False)["input_ids"] == answer)


def test_several_images_use_the_first_and_beams_are_refused(model, task):
    _, docs = task
    model.task_dict = {"shapes": {"test": docs}}
    blank = Image.new("RGB", (32, 32))
    two = _requests("generate_until", docs[:1], lambda i: (docs[0]["question"], {"max_new_tokens": 4},
                                                          lambda d: [d["image"], blank], 0, "shapes", "test"))
    one = _requests("generate_until", docs[:1], lambda i: (docs[0]["question"], {"max_new_tokens": 4},
                                                          lambda d: [d["image"]], 0, "shapes", "test"))
    assert model.generate_until(two) == model.generate_until(one)
    beams = _requests("generate_until", docs[:1], lambda i: (docs[0]["question"], {"num_beams": 3},
                                                            lambda d: [d["image"]], 0, "shapes", "test"))
    with pytest.raises(ValueError, match="beam"):
        model.generate_until(beams)


@pytest.mark.slow
def test_lmms_eval_command_runs_the_local_task_offline(task, tmp_path):
    """The whole stack: lmms-eval's CLI, its task loader (load_from_disk), our plugin, its metrics."""
    folder, docs = task
    exe = shutil.which("lmms-eval", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no lmms-eval executable beside this Python")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([exe, "--model", "tokenflow", "--model_args", f"pretrained={TOY},device=cpu",
                             "--tasks", "tokenflow_shapes_vqa", "--include_path", str(folder), "--batch_size", "8",
                             "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (found,) = list((tmp_path / "out").rglob("*_results.json"))
    scores = json.loads(found.read_text())["results"]["tokenflow_shapes_vqa"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
