"""Dual-codebook, shared-index, multi-scale residual quantizer (TokenFlow, arXiv 2412.03069 §3).

Two codebooks of the same size K share one index. For a position with semantic part z_sem and
pixel part z_pix the index is

    i* = argmin_i ||z_sem - e_sem_i||^2 + w_dis * ||z_pix - e_pix_i||^2

(both parts and both codebooks l2-normalised by default). Quantization is VAR's next-scale
residual pyramid: the residual map is area-downsampled to s x s, quantized, the codes are
upsampled back (bicubic), added to the running sum and subtracted from the residual.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow_cli.tokenizer.config import QuantizerConfig
from tokenflow_cli.tokenizer.scales import ScaleLayout


def nearest_code(
    z_sem_Nd: torch.Tensor,
    z_pix_Nd: torch.Tensor,
    cb_sem_Kd: torch.Tensor,
    cb_pix_Kd: torch.Tensor,
    pixel_weight: float = 1.0,
    semantic_weight: float = 1.0,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Index of the joint-nearest code for every row, searched in fp32 over chunks of K.

    ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e; ||z||^2 does not change the argmin, so each chunk
    scores `||e_sem||^2 + w ||e_pix||^2 - 2 (z_sem.e_sem + w z_pix.e_pix)` with one matmul over
    the concatenated 40-dim vectors. Extra memory is N x chunk_size floats whatever K is; ties go
    to the lowest index, exactly like a plain argmin over the full distance matrix.
    """
    with torch.autocast(device_type=z_sem_Nd.device.type, enabled=False):
        z_Nc = torch.cat([semantic_weight * z_sem_Nd.float(), pixel_weight * z_pix_Nd.float()], dim=1)
        cb_Kc = torch.cat([cb_sem_Kd.float(), cb_pix_Kd.float()], dim=1)
        sq_K = semantic_weight * cb_sem_Kd.float().pow(2).sum(1) + pixel_weight * cb_pix_Kd.float().pow(2).sum(1)
        best_val = torch.full((z_Nc.shape[0],), math.inf, device=z_Nc.device)
        best_idx = torch.zeros(z_Nc.shape[0], dtype=torch.long, device=z_Nc.device)
        for start in range(0, cb_Kc.shape[0], chunk_size):
            # scores_Nk = ||e||^2 - 2 z.e for this chunk: addmm fuses the add into the matmul
            scores_Nk = torch.addmm(
                sq_K[start : start + chunk_size], z_Nc, cb_Kc[start : start + chunk_size].T, alpha=-2
            )
            val, idx = scores_Nk.min(dim=1)
            better = val < best_val  # strict: an earlier chunk wins ties
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


def plain_nearest_code(
    z_sem_Nd: torch.Tensor,
    z_pix_Nd: torch.Tensor,
    cb_sem_Kd: torch.Tensor,
    cb_pix_Kd: torch.Tensor,
    pixel_weight: float = 1.0,
    semantic_weight: float = 1.0,
) -> torch.Tensor:
    """Reference: the full N x K distance matrix and one argmin (benchmarks and tests)."""
    return nearest_code(z_sem_Nd, z_pix_Nd, cb_sem_Kd, cb_pix_Kd, pixel_weight, semantic_weight, cb_sem_Kd.shape[0])


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, H, W) sum of all scales' codes (straight-through in training)
    indices: list[torch.Tensor]  # per scale (B, s*s) int64; a dropped scale is all -1
    codebook_loss: torch.Tensor  # ||sg(f) - f_hat||^2 averaged over scales
    commit_loss: torch.Tensor  # beta * ||f - sg(f_hat)||^2 averaged over scales
    entropy_loss: torch.Tensor  # 0 unless entropy_weight > 0


class MultiScaleDualQuantizer(nn.Module):
    """Shared-index dual codebooks quantized over a next-scale pyramid."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scales = tuple(cfg.scales)
        self.semantic_codebook = nn.Embedding(cfg.codebook_size, cfg.semantic_dim)
        self.pixel_codebook = nn.Embedding(cfg.codebook_size, cfg.pixel_dim)
        for table in (self.semantic_codebook, self.pixel_codebook):
            if cfg.l2_normalize:  # Gaussian rows: uniform directions on the sphere after norm
                nn.init.normal_(table.weight)
            else:  # VQGAN's init for unnormalised codebooks
                nn.init.uniform_(table.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        # usage statistics live in buffers so state_dict() is the whole state
        self.register_buffer("usage_counts", torch.zeros(len(self.scales), cfg.codebook_size, dtype=torch.long))
        self.register_buffer("last_used_step", torch.zeros(cfg.codebook_size, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def code_dim(self) -> int:
        return self.cfg.semantic_dim + self.cfg.pixel_dim

    # ---- code vectors -------------------------------------------------------------------

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.cfg.l2_normalize else x

    def codebooks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (normalised) semantic and pixel tables, (K, d_sem) and (K, d_pix)."""
        return self._norm(self.semantic_codebook.weight), self._norm(self.pixel_codebook.weight)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> concatenated code vectors (..., d_sem + d_pix), semantic first."""
        sem, pix = self.codebooks()
        return torch.cat([sem[idx], pix[idx]], dim=-1)

    def indices_to_map(self, idx_Bl: torch.Tensor, side: int) -> torch.Tensor:
        """(B, s*s) -> (B, C, s, s) code map."""
        return self.lookup(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.code_dim, side, side)

    def upsample(self, f_BCss: torch.Tensor, side: int) -> torch.Tensor:
        if f_BCss.shape[-1] == side:
            return f_BCss
        return F.interpolate(f_BCss, size=(side, side), mode=self.cfg.upsample_mode)

    def downsample(self, f_BChw: torch.Tensor, side: int) -> torch.Tensor:
        if f_BChw.shape[-1] == side:
            return f_BChw
        return F.interpolate(f_BChw, size=(side, side), mode=self.cfg.downsample_mode)

    # ---- search -------------------------------------------------------------------------

    def search(self, r_BCss: torch.Tensor) -> torch.Tensor:
        """Residual map at one scale -> shared indices (B, s*s)."""
        B, _, s, _ = r_BCss.shape
        z_Nc = r_BCss.permute(0, 2, 3, 1).reshape(B * s * s, -1)
        z_sem, z_pix = z_Nc.split([self.cfg.semantic_dim, self.cfg.pixel_dim], dim=1)
        sem, pix = self.codebooks()
        idx_N = nearest_code(
            self._norm(z_sem),
            self._norm(z_pix),
            sem.detach(),
            pix.detach(),
            pixel_weight=self.cfg.pixel_weight,
            semantic_weight=1.0 if self.cfg.use_semantic else 0.0,
            chunk_size=self.cfg.search_chunk_size,
        )
        return idx_N.view(B, s * s)

    # ---- forward ------------------------------------------------------------------------

    def forward(self, f_BChw: torch.Tensor) -> QuantizerOutput:
        side = f_BChw.shape[-1]
        f = f_BChw.float()
        f_hat = torch.zeros_like(f)
        residual = f.detach().clone() if self.training else f.clone()
        drop = self._scale_to_drop()
        indices: list[torch.Tensor] = []
        codebook_loss = commit_loss = entropy_loss = f.new_zeros(())
        used = 0
        for si, s in enumerate(self.scales):
            if si == drop:
                indices.append(torch.full((f.shape[0], s * s), -1, dtype=torch.long, device=f.device))
                continue
            r_s = self.downsample(residual, s)
            idx_Bl = self.search(r_s)
            up = self.upsample(self.indices_to_map(idx_Bl, s), side)
            f_hat = f_hat + up
            residual = residual - up.detach() if self.training else residual - up
            indices.append(idx_Bl)
            used += 1
            if self.training:
                codebook_loss = codebook_loss + F.mse_loss(f_hat, f.detach())
                commit_loss = commit_loss + self.cfg.commitment_beta * F.mse_loss(f_hat.detach(), f)
                if self.cfg.entropy_weight > 0:
                    entropy_loss = entropy_loss + self._entropy(r_s)
                self._count_usage(si, idx_Bl)
        if self.training:
            self.step += 1
            codebook_loss, commit_loss, entropy_loss = (
                x / max(used, 1) for x in (codebook_loss, commit_loss, entropy_loss)
            )
            f_hat = f + (f_hat - f).detach()  # straight-through estimator
        return QuantizerOutput(
            f_hat.to(f_BChw.dtype), indices, codebook_loss, commit_loss, self.cfg.entropy_weight * entropy_loss
        )

    def _scale_to_drop(self) -> int:
        """Training: with probability p one random non-first scale is skipped (official recipe)."""
        if not self.training or len(self.scales) < 2 or random.random() >= self.cfg.scale_drop_prob:
            return -1
        return random.randrange(1, len(self.scales))

    @torch.no_grad()
    def _count_usage(self, si: int, idx_Bl: torch.Tensor) -> None:
        flat = idx_Bl.reshape(-1)
        self.usage_counts[si] += torch.bincount(flat, minlength=self.cfg.codebook_size)
        self.last_used_step[flat] = self.step

    def _entropy(self, r_BCss: torch.Tensor, max_tokens: int = 4096) -> torch.Tensor:
        """Per-token entropy minus the entropy of the mean assignment (on <= max_tokens rows).

        Sub-sampling keeps the soft (N, K) assignment bounded for K = 131072.
        """
        z = r_BCss.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        if z.shape[0] > max_tokens:
            z = z[torch.randperm(z.shape[0], device=z.device)[:max_tokens]]
        z_sem, z_pix = z.split([self.cfg.semantic_dim, self.cfg.pixel_dim], dim=1)
        sem, pix = self.codebooks()
        dist = torch.cdist(self._norm(z_sem), sem).pow(2) + self.cfg.pixel_weight * torch.cdist(
            self._norm(z_pix), pix
        ).pow(2)
        prob = (-dist / self.cfg.entropy_temperature).softmax(dim=1)
        per_token = -(prob * prob.clamp_min(1e-8).log()).sum(1).mean()
        mean = prob.mean(0)
        return per_token + (mean * mean.clamp_min(1e-8).log()).sum()

    # ---- decoding helpers -----------------------------------------------------------------

    def split_indices(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flat (B, L) -> per-scale (B, s*s); L must fill a prefix of the scale list exactly."""
        return ScaleLayout(self.scales).split(idx_BL)

    def indices_to_features(self, idx_BL: torch.Tensor, side: int) -> torch.Tensor:
        """Flat indices -> summed code map (B, C, side, side), as encode produced it."""
        f_hat = None
        for idx_Bl, s in zip(self.split_indices(idx_BL), self.scales):
            up = self.upsample(self.indices_to_map(idx_Bl, s), side)
            f_hat = up if f_hat is None else f_hat + up
        return f_hat

    def indices_to_scale_maps(self, idx_BL: torch.Tensor, side: int, running_sum: bool) -> list[torch.Tensor]:
        """Flat indices -> one map per scale [(B, C, s_k, s_k)], coarse to fine. `running_sum`:
        the sum of scales <= k, each upsampled to the final grid `side` (as encode builds it),
        area-downsampled back to s_k (the last map is the summed map when s_N == side); else
        scale k's own code vectors."""
        maps, f_hat = [], None
        for si, idx_Bl in enumerate(self.split_indices(idx_BL)):
            s = self.scales[si]
            if running_sum:
                f_hat = self.accumulate(f_hat, idx_Bl, si, side)
                maps.append(self.downsample(f_hat, s))
            else:
                maps.append(self.indices_to_map(idx_Bl, s))
        return maps

    def next_scale_inputs(self, idx_BL: torch.Tensor, side: int) -> list[torch.Tensor]:
        """VAR teacher-forcing inputs: for k = 1..N-1 the running sum of scales < k, upsampled to
        the final grid and area-downsampled to s_k x s_k, as (B, s_k*s_k, C)."""
        inputs = []
        f_hat = None
        per_scale = self.split_indices(idx_BL)
        for si in range(len(self.scales) - 1):
            f_hat = self.accumulate(f_hat, per_scale[si], si, side)
            inputs.append(self.scale_input(f_hat, si + 1))
        return inputs

    def accumulate(self, f_hat: torch.Tensor | None, idx_Bl: torch.Tensor, si: int, side: int) -> torch.Tensor:
        """Add scale si's codes (upsampled to the final grid) to the running sum."""
        up = self.upsample(self.indices_to_map(idx_Bl, self.scales[si]), side)
        return up if f_hat is None else f_hat + up

    def scale_input(self, f_hat_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """Running sum -> the generator's input tokens for scale si, (B, s*s, C)."""
        s = self.scales[si]
        return self.downsample(f_hat_BChw, s).flatten(2).transpose(1, 2)

    # ---- codebook health ----------------------------------------------------------------

    def usage_share(self) -> torch.Tensor:
        """Per scale, the share of codes hit at least once since the counts were reset."""
        return (self.usage_counts > 0).float().mean(dim=1)

    @torch.no_grad()
    def restart_dead_codes(self, f_Nc: torch.Tensor, max_idle_steps: int) -> int:
        """Re-seed codes unused for `max_idle_steps` from recent encoder outputs f_Nc (both halves
        together, so the shared index stays meaningful). Returns how many were restarted."""
        dead = (self.step - self.last_used_step) > max_idle_steps
        n_dead = int(dead.sum())
        if n_dead == 0 or f_Nc.shape[0] == 0:
            return 0
        pick = torch.randint(0, f_Nc.shape[0], (n_dead,), device=f_Nc.device)
        sample = f_Nc[pick].float()
        sample = sample + 1e-3 * torch.randn_like(sample)
        sem, pix = sample.split([self.cfg.semantic_dim, self.cfg.pixel_dim], dim=1)
        self.semantic_codebook.weight.data[dead] = sem.to(self.semantic_codebook.weight.dtype)
        self.pixel_codebook.weight.data[dead] = pix.to(self.pixel_codebook.weight.dtype)
        self.last_used_step[dead] = self.step
        return n_dead

    @torch.no_grad()
    def kmeans_init(self, f_Nc: torch.Tensor, iters: int = 10) -> None:
        """Initialise both codebooks with k-means centroids of the first batch's features."""
        x = f_Nc.float()
        sem, pix = x.split([self.cfg.semantic_dim, self.cfg.pixel_dim], dim=1)
        x = torch.cat([self._norm(sem), self._norm(pix)], dim=1)
        K = self.cfg.codebook_size
        centroids = x[torch.randint(0, x.shape[0], (K,), device=x.device)].clone()
        for _ in range(iters):
            assign = nearest_code(
                x[:, : self.cfg.semantic_dim],
                x[:, self.cfg.semantic_dim :],
                centroids[:, : self.cfg.semantic_dim],
                centroids[:, self.cfg.semantic_dim :],
                self.cfg.pixel_weight,
                chunk_size=self.cfg.search_chunk_size,
            )
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=K).unsqueeze(1)
            filled = counts.squeeze(1) > 0
            centroids[filled] = sums[filled] / counts[filled]
        c_sem, c_pix = centroids.split([self.cfg.semantic_dim, self.cfg.pixel_dim], dim=1)
        self.semantic_codebook.weight.data.copy_(c_sem)
        self.pixel_codebook.weight.data.copy_(c_pix)
