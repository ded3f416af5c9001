"""The tokenizer's recipe schema (`kind: tokenizer`): model parts, data, losses, training.

Field names follow the official code where it has one; every field carries a comment. The
generic parts (`TrainConfig`, `EvalConfig`, the loader) live in `tokenflow_cli.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenflow_cli.config import EvalConfig, TrainConfig, register_recipe_kind


@dataclass
class PixelConfig:
    """VQGAN-style pixel encoder and decoder (the official VQGAN layout, key for key)."""

    in_channels: int = 3  # RGB
    base_channels: int = 128  # encoder width of the first level
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # per level; downsampling = 2**(levels-1)
    encoder_res_blocks: int = 2  # residual blocks per encoder level
    decoder_base_channels: int = 128  # 256 in the "enhanced" decoder
    decoder_res_blocks: int = 3  # 5 in the "enhanced" decoder
    z_channels: int = 256  # encoder output width before quant_conv
    attn_at_lowest: bool = True  # self-attention after each res block of the deepest level
    norm_groups: int = 32  # GroupNorm groups (eps 1e-6)
    dropout: float = 0.0  # dropout inside residual blocks


@dataclass
class SemanticEncoderConfig:
    """The semantic tower (CLIP/SigLIP), initialised from the teacher and trained."""

    backend: str = "open_clip"  # "open_clip" or "hf_siglip" (transformers SiglipVisionModel)
    model_name: str = "ViT-B-16"  # open_clip model name (built-in or registered tiny config)
    pretrained: str = ""  # open_clip tag, or a local .pt/.safetensors/HF folder; "" = random init
    native_size: int = 224  # image size the tower's position embeddings were trained at
    feature_layer: int = -1  # -1: last block (+ ln_post for CLIP); -2: penultimate hidden state
    input_norm: str = "none"  # on the [-1,1] image: "none" (official clipb), "clip_mean_std", "clamp"
    trainable: bool = True  # False freezes the tower (projection heads still train)
    quick_gelu: bool = False  # open_clip: OpenAI CLIP weights need QuickGELU (the "openai" tag sets it)


@dataclass
class TeacherConfig:
    """Frozen teacher whose features the semantic decoder regresses (training only)."""

    enabled: bool = True  # False drops the semantic loss (and the teacher) entirely
    backend: str = "open_clip"  # as SemanticEncoderConfig.backend
    model_name: str = "ViT-B-16"
    pretrained: str = ""  # "" = same source as the semantic encoder
    input_norm: str = "clip_mean_std"  # the official loss feeds CLIP mean/std to its teacher
    feature: str = "proj_tokens"  # "proj_tokens" (ln_post + proj, CLIP) or "penultimate" (SigLIP)
    dim: int = 512  # teacher feature size T (512 for CLIP-B/16, 1152 for SigLIP-so400m)


@dataclass
class QuantizerConfig:
    """Dual-codebook, shared-index, multi-scale residual quantizer."""

    codebook_size: int = 32768  # K, the same for both codebooks (one shared index)
    semantic_dim: int = 32  # d_sem
    pixel_dim: int = 8  # d_pix
    scales: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14, 16)  # side of each token map
    pixel_weight: float = 1.0  # w_dis in argmin(d_sem + w_dis * d_pix)
    use_semantic: bool = True  # False: index chosen by the pixel distance alone (ablation)
    l2_normalize: bool = True  # l2-normalise both halves and both codebooks
    commitment_beta: float = 0.25
    entropy_weight: float = 0.0  # 0 turns the entropy loss off
    entropy_temperature: float = 0.01
    scale_drop_prob: float = 0.1  # training: drop one random non-first scale with this prob
    downsample_mode: str = "area"  # residual -> s x s
    upsample_mode: str = "bicubic"  # s x s codes -> final grid
    search_chunk_size: int = 8192  # codebook rows per distance chunk (bounds extra memory)
    usage_window: int = 1000  # steps a code counts as "recently used" for dead-code restart


@dataclass
class SemanticDecoderConfig:
    """BEiT-v2 style ViT from quantized semantic codes back to the teacher's feature space."""

    width: int = 768  # D (the semantic tower width in the official models)
    depth: int = 3
    heads: int = 12
    mlp_ratio: float = 4.0
    grid_size: int = 14  # trained grid of its position embeddings (resized otherwise)


@dataclass
class ModelConfig:
    """The whole tokenizer."""

    name: str = "tokenflow"  # free-form identifier stored in checkpoints and codes files
    image_size: int = 256  # resolution of `tokenize`/`reconstruct` inputs
    pixel_input_size: int = 0  # pixel branch resizes to this first (siglip: 432); 0 = image_size
    pixel: PixelConfig = field(default_factory=PixelConfig)
    semantic_encoder: SemanticEncoderConfig = field(default_factory=SemanticEncoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semantic_decoder: SemanticDecoderConfig = field(default_factory=SemanticDecoderConfig)


@dataclass
class DataConfig:
    train: str = ""  # folder, glob, file list (.txt) or .jsonl with an "image" field
    val: str = ""  # held-out images for periodic eval ("" = a slice of train)
    captions: str = ""  # .jsonl with {"image", "caption"} (generator, teacher)
    image_size: int = 256  # training crop size
    random_resized_crop: tuple[float, float] = (0.8, 1.0)  # area range; (1, 1) = resize+centre
    hflip: bool = True
    num_workers: int = 0
    val_limit: int = 64  # images used by the periodic eval


@dataclass
class LossConfig:
    l2_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"  # lpips backbone: "vgg" or "alex"
    lpips_random_backbone: bool = False  # allow a random backbone (tests only; labelled)
    gan_weight: float = 0.5
    gan_start_step: int = 20000  # discriminator and generator GAN loss start here
    gan_adaptive_weight: bool = False  # VQGAN's adaptive weight from last-layer gradients
    disc_layers: int = 3  # PatchGAN depth
    disc_channels: int = 64
    disc_lr: float = 1e-4
    semantic_weight: float = 1.0  # weight of 1 - cos(pred, teacher)
    vq_weight: float = 1.0  # codebook + beta * commitment


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """The generic training settings plus what only the tokenizer stage uses."""

    dead_code_restart_steps: int = 0  # 0 disables; else re-seed codes unused this many steps
    kmeans_init: bool = False  # k-means init of both codebooks from the first batch
    loss: LossConfig = field(default_factory=LossConfig)


@register_recipe_kind("tokenizer")
@dataclass
class TokenizerRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
