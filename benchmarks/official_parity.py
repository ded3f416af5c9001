"""Ours against the official code's own runs in tests/data/official (docs/CONVERT.md
"What is exact and what is not"): index flips per scale, feature / logit differences and equal
greedy answers for TokenFlow-LLaVA (official loader in fp32, as it runs in fp16, and with the
.pt tower instead of the embedded copy; and our `--dtype fp16` mode against the official fp16 run),
and TokenFlow-t2i teacher-forced logits and greedy codes.

    HF_HUB_OFFLINE=1 python benchmarks/official_parity.py
"""

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "understanding"), str(ROOT / "tests" / "generation")]

import numpy as np  # noqa: E402
import test_llava_official as L  # noqa: E402
import test_t2i_official as T  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tokenflow_cli.tokenizer import semantic_towers  # noqa: E402
from tokenflow_cli.tokenizer.model import load_tokenizer  # noqa: E402
from tokenflow_cli.understanding.convert import convert_llava  # noqa: E402
from tokenflow_cli.understanding.data import load_llava_image  # noqa: E402
from tokenflow_cli.understanding.features import build_feature_source  # noqa: E402
from tokenflow_cli.understanding.model import LlavaModel  # noqa: E402


def per_scale(a: torch.Tensor, b: torch.Tensor) -> str:
    out, s = [], 0
    for n in L.SCALES:
        out.append(f"{n}:{100 * float((a[:, s:s + n * n] != b[:, s:s + n * n]).float().mean()):.0f}%")
        s += n * n
    return " ".join(out)


def llava(root: Path) -> None:
    semantic_towers.SIGLIP_PRESETS[L.TOWER] = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
        image_size=384, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    folder = shutil.copytree(L.OFFICIAL / "llava", root / "hub")
    convert_llava(folder, None, root / "out", tokenizer_config=L.tiny_tokenizer_config())
    refs = {n: dict(np.load(L.OFFICIAL / f"llava_reference_{n}.npz")) for n in ("fp32", "fp16", "pt_fp32")}
    paths = []
    for i in range(2):
        paths.append(root / f"{i}.png")
        Image.fromarray(refs["fp32"][f"image_{i}"]).save(paths[-1])
    tok = load_tokenizer(str(root / "out" / "image_tokenizer.safetensors"))
    pixels = torch.stack([load_llava_image(p, 384) for p in paths])
    with torch.no_grad():
        idx = tok.img_to_codes(pixels).indices
        feats = build_feature_source(tok, "tokenflow")(pixels)
    model = LlavaModel.from_pretrained(root / "out", dtype=torch.float32).eval()
    for name, ref in refs.items():
        r_idx, r_f = torch.from_numpy(ref["indices"]), torch.from_numpy(ref["features"])
        print(f"LLaVA ours vs official {name}: index flips {per_scale(idx, r_idx)}; features max|d| "
              f"{float((feats - r_f).abs().max()):.2e} (std {float(r_f.std()):.3f})")
        worst, same, row = 0.0, 0, 0
        for image in range(2):
            for q in L.QUESTIONS:
                ids, mask = model.prompt_batch([q])
                with torch.no_grad():
                    logits = model(ids, mask, feats[image:image + 1]).logits[0, -1]
                worst = max(worst, float((logits - torch.from_numpy(ref["first_scores"][row])).abs().max()))
                answer = [int(t[0]) for t in model.generate_ids(ids, mask, feats[image:image + 1], 12)]
                same += answer == [int(i) for i in ref["answer_ids"][row] if i != -1]
                row += 1
        print(f"  first-step logits max|d| {worst:.2e} (official logit std {float(np.std(ref['first_scores'])):.2f}); "
              f"greedy answers equal {same}/6")


def llava_fp16(root: Path) -> None:
    """Our `--dtype fp16` (the release's own float16 run) against the official fp16 run."""
    from tokenflow_cli.understanding.pipeline import Understanding

    ref = dict(np.load(L.OFFICIAL / "llava_reference_fp16.npz"))
    pixels = torch.stack([load_llava_image(root / f"{i}.png", 384) for i in range(2)])
    vlm = Understanding.from_pretrained(root / "out", dtype="fp16")
    with torch.no_grad():
        feats, idx = vlm.features.encode(pixels)
    r_f = torch.from_numpy(ref["features"])
    print(f"LLaVA ours --dtype fp16 vs official fp16: index flips {per_scale(idx, torch.from_numpy(ref['indices']))} "
          f"({int((idx != torch.from_numpy(ref['indices'])).sum())} of {idx.numel()}); features max|d| "
          f"{float((feats.float() - r_f).abs().max()):.2e}")
    for name, visual in (("ours", feats), ("the official fp16 features", r_f.half())):
        worst, same, row = 0.0, 0, 0
        for image in range(2):
            for q in L.QUESTIONS:
                ids, mask = vlm.model.prompt_batch([q])
                with torch.no_grad():
                    logits = vlm.model(ids, mask, visual[image:image + 1]).logits[0, -1].float()
                worst = max(worst, float((logits - torch.from_numpy(ref["first_scores"][row])).abs().max()))
                answer = [int(t[0]) for t in vlm.model.generate_ids(ids, mask, visual[image:image + 1], 12)]
                same += answer == [int(i) for i in ref["answer_ids"][row] if i != -1]
                row += 1
        print(f"  fp16 projector + LM on {name}: first-step logits max|d| {worst:.2e}; greedy answers equal {same}/6")


def t2i(root: Path) -> None:
    class Factory:
        @staticmethod
        def mktemp(name: str) -> Path:
            return Path(tempfile.mkdtemp(dir=root))

    w = T.official_run.__wrapped__(Factory())
    loaded, ref = w["loaded"], w["ref"]
    text = loaded.prompts(T.OFFICIAL_PROMPTS)
    with torch.no_grad():
        inputs = loaded.model.scale_inputs(w["tok"], torch.from_numpy(ref["teacher_codes"]))
        logits = loaded.model(text, inputs).logits_BLK
    expected = torch.from_numpy(ref["teacher_logits"])
    print(f"t2i teacher-forced logits max|d| {float((logits - expected).abs().max()):.2e} "
          f"(max |logit| {float(expected.abs().max()):.2f})")
    negative = loaded.prompts([T.OFFICIAL_NEGATIVE_PROMPT] * 2)
    for passes in (1, 2):
        codes = loaded.model.generate(w["tok"], text, negative, T.parse_schedule(",".join(["1:0"] * passes)), cfg=7.5,
                                      generator=torch.Generator().manual_seed(0), keep_ties=True)
        equal = torch.equal(codes, torch.from_numpy(ref[f"greedy_codes_{passes}pass"]))
        print(f"t2i {passes}-pass greedy codes equal the official: {equal}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        llava(Path(tmp))
        llava_fp16(Path(tmp))
        t2i(Path(tmp))
