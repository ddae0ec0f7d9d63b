"""Networks of the visuomotor diffusion policy: image encoder, 1D conv U-Net denoiser, STEP chunk predictor.

Shapes follow Chi et al. (Diffusion Policy, RSS 2023) scaled to a 2-core CPU: a light per-camera CNN with
spatial softmax (the encoder runs once per chunk, so it is fixed cost against which few-step sampling can not
gain), and a FiLM-conditioned temporal U-Net that is the dominant cost (it runs k times per chunk). The STEP
predictor reuses the encoder's features, so warm starting adds only its own small cost.

No torchvision: image resizing/cropping is done with plain torch ops here, identical in training and inference.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vla_runtime.policies.diffusion.configuration import ModelConfig

# ---------------------------------------------------------------- image preprocessing (train == inference)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), OpenCV area resampling (~0.3 ms at 128 -> 84 px, 2.5x faster
    than torch's). The same function fills the training cache, so training and inference see identical pixels."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def center_crop(imgs: torch.Tensor, crop: int) -> torch.Tensor:
    """(..., H, W) -> (..., crop, crop) from the centre."""
    h, w = imgs.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return imgs[..., top:top + crop, left:left + crop]


def random_crop(imgs: torch.Tensor, crop: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, ..., H, W) -> (B, ..., crop, crop), one random offset per sample (shared by its frames and cameras,
    so the two history frames stay aligned and the motion between them is real)."""
    b = imgs.shape[0]
    h, w = imgs.shape[-2:]
    tops = torch.randint(0, h - crop + 1, (b,), generator=gen)
    lefts = torch.randint(0, w - crop + 1, (b,), generator=gen)
    return torch.stack([imgs[i, ..., int(t):int(t) + crop, int(l_):int(l_) + crop]
                        for i, (t, l_) in enumerate(zip(tops, lefts))])


# ---------------------------------------------------------------- encoder


class SpatialSoftmax(nn.Module):
    """Keypoints as the expected (x, y) of a per-channel softmax over the feature map (Levine et al.)."""

    def __init__(self, in_ch: int, num_kp: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, num_kp, 1)
        self.num_kp = num_kp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, 2K)
        n, _, h, w = x.shape
        logits = self.proj(x).flatten(2).float()  # (N, K, H*W), softmax in fp32
        attn = logits.softmax(-1)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)  # (H*W, 2)
        kp = attn @ grid  # (N, K, 2)
        return kp.reshape(n, -1)


class CameraEncoder(nn.Module):
    """A few strided convs + GroupNorm + spatial softmax (~12 M MACs per 64 px image), see DIFFUSION.md."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(cfg.enc_channels):
            k, s = (5, 2) if i == 0 else (3, 2 if i < 3 else 1)  # 64 px -> 32 -> 16 -> 8
            layers += [nn.Conv2d(c_in, c, k, stride=s, padding=k // 2), nn.GroupNorm(8, c), nn.ReLU(inplace=True)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.kp = SpatialSoftmax(c_in, cfg.enc_keypoints)
        self.out = nn.Sequential(nn.Linear(2 * cfg.enc_keypoints, cfg.enc_feat_dim), nn.LayerNorm(cfg.enc_feat_dim))

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # uint8/float (N, 3, h, w) -> (N, D)
        x = img.float() / 255.0 - 0.5 if img.dtype == torch.uint8 else img
        return self.out(self.kp(self.convs(x)))  # keypoints are fp32 (softmax in fp32)


# ---------------------------------------------------------------- U-Net denoiser (Chi et al.'s ConditionalUnet1D)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        arg = t.float()[:, None] * freqs[None]
        return torch.cat([arg.sin(), arg.cos()], -1)


class Conv1dBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.GroupNorm(groups, c_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class CondResBlock1D(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from the condition) between them."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, k: int, groups: int) -> None:
        super().__init__()
        self.b1 = Conv1dBlock(c_in, c_out, k, groups)
        self.b2 = Conv1dBlock(c_out, c_out, k, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.res = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # (B, C, L), (B, Dc)
        h = self.b1(x)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        h = self.b2(h * scale + bias)
        return h + self.res(x)


class ConditionalUnet1D(nn.Module):
    """Temporal U-Net over the action chunk (B, horizon, action_dim), conditioned on step + observation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dsed = cfg.time_embed_dim
        self.time_emb = SinusoidalPosEmb(dsed)
        self.time_mlp = nn.Sequential(nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed))
        cond_dim = dsed + cfg.global_cond_dim
        k, g = cfg.unet_kernel, cfg.unet_groups
        chans = [cfg.action_dim, *cfg.unet_channels]
        pairs = list(zip(chans[:-1], chans[1:]))
        self.down = nn.ModuleList()
        for i, (ci, co) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down.append(nn.ModuleList([CondResBlock1D(ci, co, cond_dim, k, g), CondResBlock1D(co, co, cond_dim, k, g),
                                             nn.Conv1d(co, co, 3, 2, 1) if not last else nn.Identity()]))
        mid = chans[-1]
        self.mid = nn.ModuleList([CondResBlock1D(mid, mid, cond_dim, k, g), CondResBlock1D(mid, mid, cond_dim, k, g)])
        self.up = nn.ModuleList()
        for ci, co in reversed(pairs[1:]):  # one upsample per downsample (the last down level has none)
            self.up.append(nn.ModuleList([CondResBlock1D(2 * co, ci, cond_dim, k, g), CondResBlock1D(ci, ci, cond_dim, k, g),
                                           nn.ConvTranspose1d(ci, ci, 4, 2, 1)]))
        start = cfg.unet_channels[0]
        self.final = nn.Sequential(Conv1dBlock(start, start, k, g), nn.Conv1d(start, cfg.action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """x (B, H, A), t (B,) int noise levels, global_cond (B, Dg) -> (B, H, A)."""
        temb = self.time_emb(t).to(global_cond.dtype)  # (B, dsed)
        cond = torch.cat([self.time_mlp(temb), global_cond], -1)  # (B, Dc)
        h = x.transpose(1, 2)  # (B, A, H)
        skips = []
        for r1, r2, down in self.down:
            h = r2(r1(h, cond), cond)
            skips.append(h)
            h = down(h)
        for r in self.mid:
            h = r(h, cond)
        for r1, r2, up in self.up:
            h = torch.cat([h, skips.pop()], 1)
            h = up(r2(r1(h, cond), cond))
        return self.final(h).transpose(1, 2)


# ---------------------------------------------------------------- STEP predictor


class Attention(nn.Module):
    """Multi-head attention on SDPA (nn.MultiheadAttention's per-call overhead is ~2x at these tiny sizes)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:  # (B, L, d), (B, N, d)
        b, n_q, d = x.shape
        q = self.q(x).reshape(b, n_q, self.h, -1).transpose(1, 2)  # (B, h, L, dh)
        k, v = self.kv(mem).reshape(b, mem.shape[1], 2, self.h, -1).permute(2, 0, 3, 1, 4)  # (B, h, N, dh) each
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n_q, d))


class CrossAttnBlock(nn.Module):
    """Pre-LN block: self-attention over chunk queries, cross-attention to observation tokens, MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.cross_attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:  # (B, H, d), (B, N, d)
        h = self.n1(q)
        q = q + self.self_attn(h, h)
        q = q + self.cross_attn(self.n2(q), mem)
        return q + self.mlp(self.n3(q))


class StepPredictor(nn.Module):
    """Predicts the next (normalised) chunk from the observation features and the previous chunk, shifted.

    Queries: the previous chunk shifted by the executed steps (its tail padded by repeating the last action),
    plus a position embedding and a 'padded' flag embedding; memory: one token per (frame, camera) feature and
    per frame state. The output is a residual on the shifted chunk, so an untrained predictor already copies
    the still-valid part of the plan.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.pred_hidden
        self.cfg = cfg
        self.cam_in = nn.Linear(cfg.enc_feat_dim, d)
        self.state_in = nn.Linear(max(cfg.state_dim, 1), d)
        n_src = len(cfg.cameras) + 1
        self.src_emb = nn.Parameter(torch.zeros(cfg.obs_horizon, n_src, d))
        self.act_in = nn.Linear(cfg.action_dim, d)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.horizon, d))
        self.pad_emb = nn.Parameter(torch.zeros(2, d))
        nn.init.normal_(self.src_emb, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.pad_emb, std=0.02)
        self.blocks = nn.ModuleList([CrossAttnBlock(d, cfg.pred_heads) for _ in range(cfg.pred_blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.action_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, obs_feats: torch.Tensor, prev_shifted: torch.Tensor, n_shift: torch.Tensor) -> torch.Tensor:
        """obs_feats (B, To, F), prev_shifted (B, H, A), n_shift (B,) executed steps -> (B, H, A)."""
        cfg = self.cfg
        b, to, _ = obs_feats.shape
        nc, dc = len(cfg.cameras), cfg.enc_feat_dim
        cams = obs_feats[..., : nc * dc].reshape(b, to, nc, dc)
        state = obs_feats[..., nc * dc:]
        if state.shape[-1] == 0:
            state = torch.zeros(b, to, 1, dtype=obs_feats.dtype, device=obs_feats.device)
        tok = torch.cat([self.cam_in(cams), self.state_in(state).unsqueeze(2)], 2)  # (B, To, nc+1, d)
        mem = (tok + self.src_emb[:to]).reshape(b, -1, tok.shape[-1])  # (B, N, d)
        pos = torch.arange(cfg.horizon, device=prev_shifted.device)
        padded = (pos[None] >= (cfg.horizon - n_shift[:, None])).long()  # (B, H) 1 where the tail was padded
        q = self.act_in(prev_shifted) + self.pos_emb[None] + self.pad_emb[padded]
        for blk in self.blocks:
            q = blk(q, mem)
        return prev_shifted + self.head(self.norm(q)).to(prev_shifted.dtype)


def shift_chunk(chunk: torch.Tensor, n: int) -> torch.Tensor:
    """Drop the first n actions of (B, H, A) (already executed) and pad the tail by repeating the last action.

    This is the predictor's view of the previous plan at the next inference: position j holds the action the
    previous chunk planned for the same control step (for j < H - n).
    """
    h = chunk.shape[1]
    n = max(0, min(int(n), h))
    if n == 0:
        return chunk.clone()
    if n == h:
        return chunk[:, -1:].expand(-1, h, -1).clone()
    return torch.cat([chunk[:, n:], chunk[:, -1:].expand(-1, n, -1)], 1)


# ---------------------------------------------------------------- the whole model


class DiffusionModel(nn.Module):
    """Encoders + denoiser + STEP predictor + normalisation stats (buffers, saved in the checkpoint)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleDict({c: CameraEncoder(cfg) for c in cfg.cameras})
        self.unet = ConditionalUnet1D(cfg)
        self.predictor = StepPredictor(cfg)
        self.register_buffer("action_min", -torch.ones(cfg.action_dim))
        self.register_buffer("action_max", torch.ones(cfg.action_dim))
        self.register_buffer("state_min", -torch.ones(cfg.state_dim))
        self.register_buffer("state_max", torch.ones(cfg.state_dim))

    # normalisation: min-max to [-1, 1]; stats computed so a constant dim maps to 0 (see train_diffusion)
    def normalize_action(self, a: torch.Tensor) -> torch.Tensor:
        return 2 * (a - self.action_min) / (self.action_max - self.action_min) - 1

    def unnormalize_action(self, a: torch.Tensor) -> torch.Tensor:
        return (a + 1) / 2 * (self.action_max - self.action_min) + self.action_min

    def normalize_state(self, s: torch.Tensor) -> torch.Tensor:
        return 2 * (s - self.state_min) / (self.state_max - self.state_min) - 1

    def encode(self, images: torch.Tensor, states: torch.Tensor, grad_last_only: bool = False) -> torch.Tensor:
        """images uint8 (B, To, Ncam, 3, c, c) already cropped, states normalised (B, To, S) -> (B, To, F).

        grad_last_only (training): older frames are encoded without autograd. The encoder still learns from
        every image (each frame is the current frame of another sample) and the backward pass - the most
        expensive part of training on CPU - shrinks by (To-1)/To. Inference output is unaffected."""
        b, to = images.shape[:2]
        feats = []
        for i, cam in enumerate(self.cfg.cameras):
            enc = self.encoders[cam]
            if grad_last_only and to > 1:
                with torch.no_grad():
                    old = enc(images[:, :-1, i].reshape(b * (to - 1), *images.shape[-3:])).reshape(b, to - 1, -1)
                cur = enc(images[:, -1, i]).reshape(b, 1, -1)
                feats.append(torch.cat([old.to(cur.dtype), cur], 1))
            else:
                feats.append(enc(images[:, :, i].reshape(b * to, *images.shape[-3:])).reshape(b, to, -1))
        return torch.cat([*(f.to(states.dtype) for f in feats), states], -1)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
