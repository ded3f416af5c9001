"""TokenFlowTokenizer: two encoders, one shared index, a multi-scale pyramid, two decoders.

    image ─┬─ semantic tower ─ semantic_proj (Linear-Tanh-Linear) ─┐  (B, d_sem, h, w)
           └─ pixel encoder ─ quant_conv (1x1) ────────────────────┴─ concat ─ quantizer
    quantized ─┬─ semantic half ─ semantic_decoder (ViT) ─ semantic_head ─> teacher space
               └─ pixel half ─ post_quant_conv ─ pixel decoder ─> image

The frozen teacher is not part of this module (the training step owns it), so a checkpoint
holds exactly what inference needs. The public face (README "Python API"):

    tok = TokenFlowTokenizer.from_pretrained()         # or a run folder, file, "toy", hub id
    codes = tok.encode(images)                         # PIL / uint8 arrays / float tensors / paths
    images = tok.decode(codes, output="pil")
    tok.save_pretrained("runs/mine")                   # model.safetensors, config in its metadata
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tokenflow_cli.checkpoint import WEIGHTS_NAME, load_state, require_kind, resolve_weights_path, save_weights
from tokenflow_cli.config import from_dict, to_dict
from tokenflow_cli.pretrained import Pretrained, Provenance
from tokenflow_cli.tokenizer.config import ModelConfig
from tokenflow_cli.tokenizer.inference import InferenceOptions, matmul_precision, options_of, prepare_for_inference
from tokenflow_cli.tokenizer.pixel import PixelDecoder, PixelEncoder, downsample_factor
from tokenflow_cli.tokenizer.preprocess import ImageInput, to_batch, to_pil
from tokenflow_cli.tokenizer.quantizer import MultiScaleDualQuantizer
from tokenflow_cli.tokenizer.scales import SCALE_CHOICES, ScaleLayout
from tokenflow_cli.tokenizer.semantic import SemanticEncoder
from tokenflow_cli.tokenizer.semantic_decoder import SemanticDecoder, task_layer
from tokenflow_cli.weights import DEFAULT_TOKENIZER


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a part runs in (parts may be cast for inference; the quantizer stays fp32)."""
    return next(module.parameters()).dtype


@dataclass
class MultiScaleCodes:
    """Shared indices of one batch, scales concatenated coarse to fine (row-major per scale)."""

    indices: torch.Tensor  # (B, L) int64
    scales: tuple[int, ...]

    def per_scale(self) -> list[torch.Tensor]:
        """[(B, s, s) for each scale]."""
        return ScaleLayout(self.scales).maps(self.indices)


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W) in about [-1, 1]
    features: torch.Tensor  # (B, C, h, w) continuous map before quantization
    quantized: torch.Tensor  # (B, C, h, w) summed codes (straight-through in training)
    semantic_pred: torch.Tensor | None  # (B, h*w, T) prediction of the teacher's tokens
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor
    codes: MultiScaleCodes


CodesLike = MultiScaleCodes | torch.Tensor  # or (B, L) indices as a tensor


class TokenFlowTokenizer(nn.Module, Pretrained):
    """The image tokenizer. `provenance` says where its weights came from (set by
    `from_pretrained`; a model built from a config is random init); with
    `towers_from_checkpoint` the semantic tower is built without its pretrained source, because
    a checkpoint's weights replace it (loading needs no teacher file and never downloads)."""

    defaults = DEFAULT_TOKENIZER

    def __init__(self, cfg: ModelConfig, *, provenance: Provenance | None = None,
                 towers_from_checkpoint: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.provenance = provenance or Provenance.built(f"tokenizer {cfg.name}")
        q = cfg.quantizer
        self.pixel_encoder = PixelEncoder(cfg.pixel)
        self.quant_conv = nn.Conv2d(cfg.pixel.z_channels, q.pixel_dim, 1)
        self.semantic_encoder = SemanticEncoder(cfg.semantic_encoder, cfg.image_size,
                                                weights_from_checkpoint=towers_from_checkpoint)
        width = self.semantic_encoder.width
        self.semantic_proj = task_layer(width, width, q.semantic_dim)
        self.quantizer = MultiScaleDualQuantizer(q)
        self.post_quant_conv = nn.Conv2d(q.pixel_dim, cfg.pixel.z_channels, 1)
        self.pixel_decoder = PixelDecoder(cfg.pixel)
        dec_width = cfg.semantic_decoder.width
        self.semantic_decoder = SemanticDecoder(cfg.semantic_decoder, q.semantic_dim)
        self.semantic_head = task_layer(dec_width, dec_width, cfg.teacher.dim)
        self._check_grids()

    def _check_grids(self) -> None:
        cfg = self.config
        pixel_grid = self.pixel_size // downsample_factor(cfg.pixel)
        semantic_grid = self.semantic_encoder.grid_size(cfg.image_size)
        if not (pixel_grid == semantic_grid == self.grid):
            raise ValueError(
                f"grids disagree: pixel branch {pixel_grid}, semantic branch {semantic_grid}, "
                f"last scale {self.grid} (image_size {cfg.image_size}, pixel_input_size {self.pixel_size})"
            )

    # ---- facts --------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The weights file it was loaded from, or what was built (see `provenance`)."""
        return self.provenance.source

    @property
    def random_init(self) -> bool:
        return self.provenance.random_init

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.config.quantizer.scales)

    @property
    def grid(self) -> int:
        return self.scales[-1]

    @property
    def num_tokens(self) -> int:
        return ScaleLayout(self.scales).num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def code_dim(self) -> int:
        return self.quantizer.code_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def pixel_size(self) -> int:
        return self.config.pixel_input_size or self.config.image_size

    # ---- encode -------------------------------------------------------------------------

    def encode_features(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> continuous (B, d_sem + d_pix, h, w) map, semantic channels first."""
        pix_in = img_B3HW
        if self.pixel_size != img_B3HW.shape[-1]:
            pix_in = F.interpolate(img_B3HW, size=(self.pixel_size, self.pixel_size), mode="bicubic")
        f_pix = self.quant_conv(self.pixel_encoder(pix_in.to(_weight_dtype(self.quant_conv))))
        if self.config.quantizer.use_semantic:
            f_tok = self.semantic_encoder(img_B3HW).permute(0, 2, 3, 1)  # (B, h, w, D)
            f_sem = self.semantic_proj(f_tok).permute(0, 3, 1, 2)
        else:  # ablation: the semantic half is off, the index comes from the pixel distance alone
            B, _, h, w = f_pix.shape
            f_sem = f_pix.new_zeros(B, self.config.quantizer.semantic_dim, h, w)
        return torch.cat([f_sem.to(f_pix.dtype), f_pix], dim=1)

    def img_to_codes(self, img_B3HW: torch.Tensor) -> MultiScaleCodes:
        """Images -> shared multi-scale indices (never drops a scale)."""
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            with matmul_precision(options_of(self).tf32):
                out = self.quantizer(self.encode_features(img_B3HW))
        finally:
            self.quantizer.train(was_training)
        return MultiScaleCodes(torch.cat(out.indices, dim=1), self.scales)

    # ---- decode -------------------------------------------------------------------------

    def _indices(self, codes: MultiScaleCodes | torch.Tensor) -> torch.Tensor:
        return codes.indices if isinstance(codes, MultiScaleCodes) else codes

    def codes_to_features(self, codes: MultiScaleCodes | torch.Tensor) -> torch.Tensor:
        """Indices -> the continuous final quantized map (B, C, h, w): the understanding input."""
        return self.quantizer.indices_to_features(self._indices(codes), self.grid)

    def codes_to_semantic_features(self, codes: MultiScaleCodes | torch.Tensor) -> torch.Tensor:
        return self.codes_to_features(codes)[:, : self.config.quantizer.semantic_dim]

    def codes_to_pixel_features(self, codes: MultiScaleCodes | torch.Tensor) -> torch.Tensor:
        return self.codes_to_features(codes)[:, self.config.quantizer.semantic_dim :]

    def features_to_img(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Quantized map -> image via the pixel half (resized back for siglip's 432 branch)."""
        f_pix = f_BChw[:, self.config.quantizer.semantic_dim :]
        img = self.pixel_decoder(self.post_quant_conv(f_pix.to(_weight_dtype(self.post_quant_conv))))
        if img.shape[-1] != self.image_size:
            img = F.interpolate(img, size=(self.image_size, self.image_size), mode="bicubic")
        return img.to(f_BChw.dtype)  # the features' dtype, whatever the decoder runs in

    def features_to_semantic(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Quantized map -> predicted teacher tokens (B, h*w, T)."""
        f_sem = f_BChw[:, : self.config.quantizer.semantic_dim]
        tokens = self.semantic_head(self.semantic_decoder(f_sem.to(_weight_dtype(self.semantic_head))))
        return tokens.to(f_BChw.dtype)

    def codes_to_img(self, codes: MultiScaleCodes | torch.Tensor) -> torch.Tensor:
        with matmul_precision(options_of(self).tf32):
            return self.features_to_img(self.codes_to_features(codes))

    def lookup_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """(B, l) indices -> (B, l, C) normalised concatenated code vectors."""
        return self.quantizer.lookup(idx_Bl)

    def next_scale_inputs(self, codes: MultiScaleCodes | torch.Tensor) -> list[torch.Tensor]:
        """Generator inputs for scales 1..N-1: [(B, s_k^2, C)] (scale 0 gets the start token)."""
        return self.quantizer.next_scale_inputs(self._indices(codes), self.grid)

    # ---- the front door: images in, codes, images and features out ---------------------------

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """PIL images, paths, uint8 (H, W, 3) arrays or float (3, H, W) tensors in [-1, 1] (one,
        a list, or a batch) -> (B, 3, H, W) in [-1, 1] on the model's device: the official
        resize of the short side and centre crop."""
        return to_batch(images, self.image_size).to(self.device)

    @torch.no_grad()
    def encode(self, images: ImageInput) -> MultiScaleCodes:
        """Images (anything `preprocess` takes) -> shared multi-scale indices (B, L)."""
        return self.img_to_codes(self.preprocess(images))

    @torch.no_grad()
    def decode(self, codes: CodesLike, output: str = "tensor") -> torch.Tensor | list[Image.Image]:
        """Codes (MultiScaleCodes, or (B, L) indices as a tensor or array) -> images: a float
        (B, 3, H, W) tensor in about [-1, 1] (`output="tensor"`) or RGB PIL images ("pil")."""
        if output not in ("tensor", "pil"):
            raise ValueError(f"output must be 'tensor' or 'pil', got {output!r}")
        img = self.codes_to_img(self._as_indices(codes)).float()
        return to_pil(img) if output == "pil" else img

    @torch.no_grad()
    def features(self, codes: CodesLike, scales: str = "final") -> torch.Tensor | list[torch.Tensor]:
        """Continuous code features, C = d_sem + d_pix channels, semantic first:
        `scales="final"` the final quantized map (B, C, h, w), every scale's codes upsampled and
        summed (the understanding input); `"all"` per scale k the running sum of scales <= k
        area-downsampled to [(B, C, s_k, s_k)] (the last equals "final"); `"residual"` each
        scale's own code vectors [(B, C, s_k, s_k)]. Lists run coarse to fine."""
        if scales not in SCALE_CHOICES:
            raise ValueError(f"scales must be one of {SCALE_CHOICES}, got {scales!r}")
        idx_BL = self._as_indices(codes)
        if scales == "final":
            return self.codes_to_features(idx_BL)
        return self.quantizer.indices_to_scale_maps(idx_BL, self.grid, running_sum=scales == "all")

    def _as_indices(self, codes: CodesLike) -> torch.Tensor:
        idx = torch.as_tensor(self._indices(codes) if isinstance(codes, MultiScaleCodes) else codes)
        if idx.ndim != 2 or idx.shape[1] != self.num_tokens:
            raise ValueError(f"codes must be (B, {self.num_tokens}) indices for scales {self.scales}; "
                             f"got {tuple(idx.shape)}")
        return idx.long().to(self.device)

    # ---- loading and saving (one folder format: model.safetensors, the config in its metadata) ---

    @classmethod
    def _load(cls, path: Path, device: str | torch.device = "cpu", dtype: str | None = None) -> TokenFlowTokenizer:
        """A tokenizer checkpoint (a .safetensors file or a run folder) rebuilt from its own
        config; `dtype` (fp32 | bf16 | fp16 | tf32) readies it for inference at that precision."""
        weights = resolve_weights_path(path)
        state, meta = load_state(weights, device="cpu")
        cfg = from_dict(ModelConfig, require_kind(meta, weights, "tokenizer"), source=str(weights))
        tok = cls(cfg, provenance=Provenance(str(weights)), towers_from_checkpoint=True)
        tok.load_state_dict(state, strict=True)
        tok = tok.to(device).eval()
        return prepare_for_inference(tok, InferenceOptions.from_name(dtype)) if dtype else tok

    def _save_pretrained(self, save_directory: Path) -> None:
        self.save_checkpoint(Path(save_directory) / WEIGHTS_NAME)

    def save_checkpoint(self, path: str | Path) -> None:
        """The weights as one .safetensors file that rebuilds itself (the config in its metadata)."""
        save_weights(self.state_dict(), Path(path), to_dict(self.config), kind="tokenizer")

    # ---- training / eval forward ----------------------------------------------------------

    def forward(self, img_B3HW: torch.Tensor, decode_semantic: bool = True) -> TokenizerOutput:
        f = self.encode_features(img_B3HW)
        q = self.quantizer(f)
        semantic_pred = None
        if decode_semantic and self.config.quantizer.use_semantic:
            semantic_pred = self.features_to_semantic(q.quantized)
        indices = torch.cat(q.indices, dim=1)
        return TokenizerOutput(
            reconstruction=self.features_to_img(q.quantized),
            features=f,
            quantized=q.quantized,
            semantic_pred=semantic_pred,
            codebook_loss=q.codebook_loss,
            commit_loss=q.commit_loss,
            entropy_loss=q.entropy_loss,
            codes=MultiScaleCodes(indices, self.scales),
        )

    @property
    def random_init_parts(self) -> list[str]:
        """Components whose pretrained weights were not loaded (to be said in output)."""
        return ["semantic_encoder"] if getattr(self.semantic_encoder, "random_init", False) else []


def build_tokenizer(cfg: ModelConfig) -> TokenFlowTokenizer:
    return TokenFlowTokenizer(cfg)


def load_tokenizer(path_or_dir: str | Path, device: str | torch.device = "cpu") -> TokenFlowTokenizer:
    """A tokenizer checkpoint (file or run folder): `TokenFlowTokenizer.from_pretrained` for a path."""
    return TokenFlowTokenizer.from_pretrained(Path(path_or_dir), device=device)
