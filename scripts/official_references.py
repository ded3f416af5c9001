"""Make the official-code references in tests/data/official/ (run once, offline, in a side venv).

    python scripts/official_references.py OFFICIAL_DIR OUT_DIR

OFFICIAL_DIR is the official repository (github.com/ByteFlow-AI/TokenFlow, snapshot 9812da0)
extracted as tests/data/README.md "Official references" says, run with a side venv holding
what the official code needs (torch, transformers==4.43.4, numpy<2, einops, timm==1.0.9,
setuptools<70, ftfy, regex, sentencepiece, protobuf, safetensors, pillow, accelerate==0.33.0)
and HF_HUB_OFFLINE=1. The tests never run this script: they read what it wrote.

Everything is built by the official classes and saved by their own save paths; only sizes are
made tiny, by wrapping constructors (the official code hard-codes K = 32768 and downloads its
CLIP / SigLIP towers). Nothing official is modified or copied into this repository.

- `t2i/`: a TokenFlow-t2i folder (`LlavaLlamaForCausalLM`, Llama-style, 2 layers x 64) built as
  `train.py` builds it (LM, `[PAD]`, `initialize_vision_modules`, `initialize_vision_tokenizer`,
  which registers `image_token_start` / `image_token_end` on the causal LM), random weights,
  `save_pretrained`. `t2i_reference.npz`: the tiny official tokenizer's codebook (K = 64) as the
  official lookup returns it, prompt ids from `crop_and_encode_text_and_img`, greedy codes of
  `autoregressive_infer_cfg` with one and two passes (cfg 7.5), and teacher-forced logits.
- `llava/`: a TokenFlow-LLaVA folder (`LlavaQwenForCausalLM`, Qwen2-style, 2 layers x 64) whose
  vision tower is a tiny official TokenFlow tokenizer (SigLIP teacher, 3 layers x 64, K = 64)
  built from `llava_tokenizer.pt` and cast to bf16 as `train.py:1314` does, then
  `save_pretrained` (the copy lands in the shards as `model.vision_tower.vision_tower.*`).
  `llava_reference.npz`: what the official loader (`builder.load_pretrained_model`, which
  overwrites the tower with that copy) computes: features, indices, first-step logits and greedy
  answers via `generate` (repetition_penalty from generation_config.json), in fp32 and as the
  loader runs it (fp16); plus the same for the fp32 `.pt` tower (the tokenizer a user passes).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import shutil
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

SEED = 0
K = 64


def sha(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2, skip: tuple[str, ...] = ()) -> None:
    """Seeded random values for every float parameter (norm weights around 1), in name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name.startswith(skip) or not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g) * std
            is_norm = p.ndim == 1 and any(s in name for s in ("norm", "ln_", "layernorm", "layer_norm"))
            p.copy_((1.0 + noise) if is_norm and name.endswith("weight") else noise)


# --------------------------------------------------------------------------------------------
# The official tokenizer, made tiny
# --------------------------------------------------------------------------------------------


def tiny_tokenizer_classes(official: Path, teacher: str):
    """The official TokenFlow class with tiny sizes: a small pixel encoder/decoder (the official
    GroupNorm(32) needs 32 channels), a tiny teacher tower, a tiny semantic decoder."""
    sys.path.insert(0, str(official / "tokenflow"))
    sys.path.insert(0, str(official))
    from tokenflow.tokenizer import vq_model
    from tokenflow.tokenizer.clip import clip as official_clip
    from tokenflow.tokenizer.clip.model import VisionTransformer
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    vq_model.Encoder = partial(vq_model.Encoder, ch=32, num_res_blocks=1)
    base_decoder = vq_model.Decoder

    def decoder(**kw):  # the enhanced decoder passes its own width and depth: tiny ones instead
        kw.update(ch=32, num_res_blocks=1)
        return base_decoder(**kw)

    vq_model.Decoder = decoder
    defaults = vq_model.get_model_default_params
    vq_model.get_model_default_params = lambda: {**defaults(), "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0}
    siglip = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                image_size=384, patch_size=14)

    class TinySiglip:
        @staticmethod
        def from_pretrained(name):
            return SiglipVisionModel(siglip)

    vq_model.SiglipVisionModel = TinySiglip
    official_clip.load_clip_vision = lambda name, download_root=None: VisionTransformer(
        input_resolution=224, patch_size=16, width=64, layers=2, heads=2, output_dim=32)
    def tiny(**kw):
        kw.update(codebook_size=K, z_channels=32)  # TokenFlowFunc, with narrow levels instead of (1, 1, 2, 2, 4)
        kw.setdefault("teacher", teacher)
        return vq_model.TokenFlow(vq_model.ModelArgs(encoder_ch_mult=[1, 1, 1, 1, 1], decoder_ch_mult=[1, 1, 1, 1, 1],
                                                     **kw))

    vq_model.VQ_models["TokenFlow"] = tiny
    return vq_model


def tokenizer_checkpoint(vq_model, path: Path, teacher: str, seed: int, random_codebooks: bool, **extra) -> dict:
    """Build the tiny official tokenizer (the official init under `seed`; `random_codebooks`:
    Gaussian codebook rows instead of the official near-zero uniform init) and save it as the
    official trainer does ({"model", "args", "steps"}); returns its state dict."""
    torch.manual_seed(seed)
    model = vq_model.VQ_models["TokenFlow"](teacher=teacher, **extra)
    if random_codebooks:
        with torch.no_grad():
            model.quantize.embedding_vqkd.weight.normal_()
            model.quantize.embedding_vqgan.weight.normal_()
    state = model.state_dict()
    args = argparse.Namespace(teacher=teacher, codebook_size=K, codebook_embed_dim=8, semantic_code_dim=32)
    torch.save({"model": state, "args": args, "steps": 1}, path)
    return state


# --------------------------------------------------------------------------------------------
# TokenFlow-t2i
# --------------------------------------------------------------------------------------------

T2I_TEXTS = ["a photo of a red circle", "a blue square left of a green star", "<img> two yellow triangles </img>",
             "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
             "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."]
T2I_PROMPTS = ["a photo of a red circle", "two yellow triangles left of a blue square"]


def sentencepiece_model(path: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(T2I_TEXTS * 20), model_writer=buf, vocab_size=80,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())


def build_t2i(official: Path, work: Path, out: Path) -> dict:
    vq_model = tiny_tokenizer_classes(official, "clipb_224")
    tok_path = work / "t2i_tokenizer.pt"
    vq_state = tokenizer_checkpoint(vq_model, tok_path, "clipb_224", seed=11, random_codebooks=True,
                                    enhanced_decoder=True, infer_interpolate=True, codebook_embed_dim=8)
    sys.path.insert(0, str(official / "t2i"))
    from llava_t2i.dataset.process import smart_tokenizer_and_embedding_resize
    from llava_t2i.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava_t2i.model.multimodal_encoder import vision_tokenizer
    from transformers import LlamaTokenizer

    vision_tokenizer.tokenflow_model = lambda name, pretrain_path=None: _load_tiny(vq_model, pretrain_path,
                                                                                  "clipb_224", enhanced_decoder=True,
                                                                                  infer_interpolate=True)
    spm_dir = work / "spm"
    spm_dir.mkdir(exist_ok=True)
    sentencepiece_model(spm_dir / "tokenizer.model")
    tokenizer = LlamaTokenizer(vocab_file=str(spm_dir / "tokenizer.model"), legacy=False, padding_side="right")
    config = LlavaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tokenizer_model_max_length=1024)
    model = LlavaLlamaForCausalLM(config)
    smart_tokenizer_and_embedding_resize(dict(pad_token="[PAD]"), tokenizer, model)
    args = argparse.Namespace(vision_tower=str(tok_path), mm_vision_select_layer=-1, mm_vision_select_feature="patch",
                              pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu",
                              mm_use_vq_token=True, mm_use_im_start_end=False, mm_use_im_patch_token=False,
                              tune_mm_mlp_adapter=False, mm_vision_vq_type="TOKEN_FLOW")
    model.config.mm_vision_vq_type = "TOKEN_FLOW"
    model.get_model().initialize_vision_modules(model_args=args)
    model.initialize_vision_tokenizer(args, tokenizer)
    model.config.mm_use_vq_token = True
    randomize(model, SEED)
    out.mkdir(parents=True)
    model.config.mm_vision_tower = "t2i_tokenizer.pt"  # the trainer writes its own path here
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"vq_state_sha256": sha(vq_state)}


def _load_tiny(vq_model, path, teacher, **extra):
    model = vq_model.VQ_models["TokenFlow"](teacher=teacher, **extra)
    model.load_state_dict(torch.load(path, map_location="cpu")["model"])
    model.eval()
    model.quantize.training = False
    model.train = lambda mode=True: model
    return model


@torch.no_grad()
def run_t2i(official: Path, work: Path, folder: Path) -> dict:
    from llava_t2i.dataset.process import crop_and_encode_text_and_img
    from llava_t2i.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    os.chdir(work)
    model = LlavaLlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                  mm_vision_tower=str(work / "t2i_tokenizer.pt")).eval()
    model.config.mm_vision_vq_type = str(model.config.mm_vision_vq_type)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=1024, padding_side="right", use_fast=False)
    model.reinit_image_token_start_end(tokenizer)
    tower = model.get_vision_tower()
    negative = T2I_TEXTS[-1]
    ids = [crop_and_encode_text_and_img(tokenizer, p, image=None, max_text_token_num=128)[0] for p in T2I_PROMPTS]
    neg = crop_and_encode_text_and_img(tokenizer, negative, image=None, max_text_token_num=128)[0]
    captured = []
    tower.decode_to_img_pt = lambda codes: (captured.append(codes.clone()), torch.zeros(len(codes), 3, 4, 4))[1]
    out = {"prompt_ids": torch.stack(ids).numpy(), "negative_ids": neg.numpy(),
           "codebook": tower.get_vq_model().quantize.get_codebook_entry(torch.arange(K)).numpy(),
           "scales": np.array(tower.scale_rq_layers), "image_token_start": int(model.image_token_start)}
    for passes in (1, 2):
        prefix = [i.clone() for i in ids] + [neg.clone()] * len(ids)
        model.autoregressive_infer_cfg(B=len(ids), prefix_text_codes=prefix, cfg=7.5, topk_list=[1] * passes,
                                       topp_list=[0.0] * passes, g_seed=None)
        out[f"greedy_codes_{passes}pass"] = captured[-1].numpy()
    codes = torch.randint(0, K, (len(ids), tower.num_patches), generator=torch.Generator().manual_seed(5))
    full = [torch.cat([i, c + model.image_token_start]) for i, c in zip(ids, codes)]
    img_ind = [torch.arange(len(i), len(i) + tower.num_patches) for i in ids]
    embeds, mask, _ = model.prepare_generation_inputs(full, img_ind_list=img_ind,
                                                      padding_value=model.image_token_start + 1,
                                                      pred_for_curr_shape=None)
    logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, return_dict=False)[0]
    P = len(ids[0])
    start = int(model.image_token_start)
    out["teacher_codes"] = codes.numpy()
    out["teacher_logits"] = logits[:, P - 1 : P - 1 + tower.num_patches, start : start + K].float().numpy()
    return out


# --------------------------------------------------------------------------------------------
# TokenFlow-LLaVA
# --------------------------------------------------------------------------------------------

LLAVA_QUESTIONS = ["What color is the star?", "How many circles are there?", "Describe the image briefly."]


def llava_images() -> list:
    """Two fixed images (one not square, so the official pad-to-square matters)."""
    from PIL import Image

    y, x = np.mgrid[0:300, 0:420]
    a = np.stack([(x * 255 // 420), (y * 255 // 300), ((x + y) % 97) * 2], -1).astype(np.uint8)
    y, x = np.mgrid[0:256, 0:256]
    b = np.stack([((x // 32 + y // 32) % 2) * 200 + 30, (np.sin(x / 9.0) * 100 + 120), (y % 64) * 3], -1)
    return [Image.fromarray(a), Image.fromarray(b.astype(np.uint8))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["What color is the star? The star is red.", "How many circles are there? There are two circles.",
         "Is there a blue square at the top left? Yes, there is a blue square.",
         "Describe the image briefly. A green triangle and a yellow circle on grey."]


def text_tokenizer(out: Path):
    """A tiny byte-level BPE with Qwen2.5's special tokens (the release ships Qwen2.5's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.save_pretrained(out)


def build_llava(official: Path, work: Path, out: Path) -> dict:
    vq_model = tiny_tokenizer_classes(official, "siglip_384")
    tok_path = work / "llava_tokenizer.pt"
    vq_state = tokenizer_checkpoint(vq_model, tok_path, "siglip_384", seed=21, random_codebooks=False)
    sys.path.insert(0, str(official / "i2t"))
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM
    from llava.model.multimodal_encoder import vision_tokenizer
    from transformers import AutoTokenizer

    vision_tokenizer.tokenflow_model = lambda name, codebook_size, teacher, pretrain_path=None: _load_tiny(
        vq_model, pretrain_path, teacher)
    text_tokenizer(work / "text_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(work / "text_tokenizer")
    config = LlavaQwenConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=2048, max_window_layers=2,
                             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                             vocab_size=len(tokenizer) + 8, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    model = LlavaQwenForCausalLM(config)  # train.py: the LM first (from_pretrained of Qwen2.5) ...
    randomize(model, SEED + 1, std=0.4)
    vq_type = vision_tokenizer.VQType.TOKENFLOW
    args = argparse.Namespace(vision_tower=str(tok_path), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                              pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat",
                              mm_projector_type="mlp2x_gelu", mm_vision_vq_type=vq_type)
    model.get_model().initialize_vision_modules(model_args=args)  # ... then the tower from the .pt (train.py:1308)
    randomize(model.get_model().mm_projector, SEED + 2, std=0.3)
    model.config.update(dict(image_aspect_ratio="pad", mm_use_im_patch_token=False, mm_use_im_start_end=False,
                             mm_vision_vq_type=vq_type.name, tokenizer_model_max_length=2048,
                             tokenizer_padding_side="right"))  # train.py:1341-1353
    model.get_model().vision_tower.to(dtype=torch.bfloat16)  # train.py:1314 with --bf16
    model.generation_config.repetition_penalty = 1.05  # Qwen2.5-Instruct's value
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    model.generation_config.do_sample = False
    out.mkdir(parents=True)
    model.config.mm_vision_tower = "llava_tokenizer.pt"  # the trainer writes its own path here
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"pt_state_sha256": sha(vq_state)}


@torch.no_grad()
def run_llava(official: Path, work: Path, folder: Path, dtype: torch.dtype, tower_from_pt: bool) -> dict:
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model import builder

    os.chdir(work)  # config.json names the tokenizer .pt relative to here
    run = Path(work / "llava_run")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(folder, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["mm_vision_tower"] = str(work / "llava_tokenizer.pt")
    (run / "config.json").write_text(json.dumps(cfg))
    # the loader forces float16 (builder.py:43, and the tower at its end); for another `dtype` its
    # module sees a torch whose float16 is `dtype`
    builder.torch = types.SimpleNamespace(**{**vars(torch), "float16": dtype})
    try:
        tokenizer, model, processor, _ = builder.load_pretrained_model(str(run), None, "llava_qwen", device="cpu",
                                                                       device_map="cpu")
    finally:
        builder.torch = torch
    tower = model.get_vision_tower()
    if tower_from_pt:  # the tokenizer a user passes: the .pt as built, fp32, not the embedded copy
        tower.vision_tower.load_state_dict(torch.load(work / "llava_tokenizer.pt")["model"])
    tower.vision_tower.to(dtype)
    model.eval()
    images = process_images(llava_images(), processor, model.config).to(dtype)
    feats, _, idx = tower.vision_tower.encode(images)
    out = {"image_0": np.asarray(llava_images()[0]), "image_1": np.asarray(llava_images()[1]),
           "indices": idx.numpy(), "features": feats.flatten(2).transpose(1, 2).float().numpy()}
    answers, first_logits, prompt_ids = [], [], []
    for image in images:
        for q in LLAVA_QUESTIONS:
            conv = copy.deepcopy(conv_templates["qwen_2_5"])
            conv.append_message(conv.roles[0], "<image>\n" + q)
            conv.append_message(conv.roles[1], None)
            ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
            prompt_ids.append(ids[0].tolist())
            generated = model.generate(ids, images=image[None], image_sizes=[(384, 384)], do_sample=False,
                                       temperature=0, top_p=None, num_beams=1, max_new_tokens=12, use_cache=True,
                                       pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                       return_dict_in_generate=True)
            answers.append(generated.sequences[0].tolist())
            first_logits.append(generated.scores[0][0].float().numpy())
    out["first_scores"] = np.stack(first_logits)  # after the repetition penalty (none at step 0)
    out["answer_ids"] = np.array([a + [-1] * (12 - len(a)) for a in answers])
    out["prompt_ids"] = np.array([p + [-1] * (max(map(len, prompt_ids)) - len(p)) for p in prompt_ids])
    out["answers"] = np.array([tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("official", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("official-work"))
    args = parser.parse_args()
    official, out, work = args.official.resolve(), args.out.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.serialization.add_safe_globals([argparse.Namespace])  # the official checkpoints pickle their args
    info = {"official_snapshot": "9812da01c0695f4989060cc4eea053715e9e4441", "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    info["t2i"] = build_t2i(official, work, out / "t2i")
    np.savez_compressed(out / "t2i_reference.npz", **run_t2i(official, work, out / "t2i"))
    info["llava"] = build_llava(official, work, out / "llava")
    runs = {"fp32": (torch.float32, False), "fp16": (torch.float16, False), "pt_fp32": (torch.float32, True)}
    for name, (dtype, from_pt) in runs.items():
        result = run_llava(official, work, out / "llava", dtype, from_pt)
        np.savez_compressed(out / f"llava_reference_{name}.npz", **result)
    (out / "made_with.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
