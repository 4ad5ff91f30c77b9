"""The one shared module of the distillation references: diffusion math, networks, teachers, data,
checkpoints, evaluation and the standard training loop. Method files import it; it imports none of them.

Sections, in order:
  math          noise schedules (alpha, sigma, logsnr, the network's time input), eps/x/v conversions,
                DDIM and ancestral steps, Gaussian KL, the progressive-distillation target, timestep sequences
  nets          one U-Net (Ho et al. DDPM and the ADM family), a DiT-style ViT, presets, key maps
  teachers      load_teacher(spec) -> (net, info) for hub ids, diffusers dirs, original and our checkpoints
  data          cifar10, folder:PATH, shapes; whole datasets as uint8 tensors on the device
  checkpoints   one self-describing file, written atomically; every checkpoint is also a teacher
  evaluation    per-seed noise, samplers, teacher fidelity, FID/IS through clean-fid, PNG grids
  training      config -> flags, run directory contract, EMA, standard diffusion training (Alg. 1)

Conventions: images are NCHW float in [-1, 1] (uint8 only at the edges); schedule algebra runs in float64
and is cast to float32; `t` is in the schedule's own units (integer timesteps for discrete schedules,
[0, 1] for the continuous one); `schedule.net_time(t)` is what the network is fed.
"""
import argparse
import dataclasses
from dataclasses import asdict, dataclass, fields
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ================================================================================================
# math
# ================================================================================================


class Schedule:
    """A variance-preserving noise schedule, z_t = alpha_t x + sigma_t eps with alpha^2 + sigma^2 = 1.

    Everything derives from the log-SNR, lambda_t = log(alpha_t^2 / sigma_t^2):
    alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t) (Kingma et al. 2021; Salimans & Ho sec. 2).

    kind = 'linear'        Ho et al. 2020: beta linear from beta_start to beta_end, T steps; t in {0..T-1}
           'cosine'        Nichol & Dhariwal 2021 eq. 17 (s = 0.008, beta clipped at 0.999); t in {0..T-1}
           'cosine_logsnr' Salimans & Ho's code: lambda(t) = -2 log tan(a t + b), clipped to
                           [logsnr_min, logsnr_max]; continuous t in [0, 1]
    Discrete schedules accept fractional t (log-SNR interpolated linearly between integer timesteps,
    exact at integers). `t_scale` is the factor between t and the network's time input (improved-diffusion
    feeds t * 1000 / T). The continuous schedule feeds the network 1000 * arctan(exp(-lambda/2)) / (pi/2),
    the 'inv_cos' input of Salimans & Ho's code, which recovers 1000 t.
    """

    def __init__(self, kind="linear", T=1000, beta_start=1e-4, beta_end=0.02, cosine_s=0.008,
                 logsnr_min=-20.0, logsnr_max=20.0, t_scale=1.0):
        if kind not in ("linear", "cosine", "cosine_logsnr"):
            raise ValueError(f"unknown schedule {kind!r}: expected linear, cosine or cosine_logsnr")
        self.kind, self.T, self.t_scale = kind, T, t_scale
        self.beta_start, self.beta_end, self.cosine_s = beta_start, beta_end, cosine_s
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        if kind == "linear":
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
            self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))
        elif kind == "cosine":
            f = np.cos((np.arange(T + 1, dtype=np.float64) / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
            self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))
        if kind != "cosine_logsnr":
            ac = self.alphas_cumprod
            self.logsnr_table = torch.log(ac) - torch.log1p(-ac)  # (T,) float64

    @property
    def discrete(self):
        return self.kind != "cosine_logsnr"

    def spec(self):
        """JSON-serialisable arguments that rebuild this schedule: Schedule(**spec)."""
        keys = ("kind", "T", "beta_start", "beta_end", "t_scale") if self.kind == "linear" else \
               ("kind", "T", "cosine_s", "t_scale") if self.kind == "cosine" else \
               ("kind", "logsnr_min", "logsnr_max")
        return {k: getattr(self, k) for k in keys}

    def logsnr(self, t):
        """lambda_t in float64, same shape as t."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "cosine_logsnr":
            b = math.atan(math.exp(-0.5 * self.logsnr_max))
            a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
            return -2.0 * torch.log(torch.tan(a * t + b))
        table = self.logsnr_table.to(t.device)
        t = t.clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        w = t - lo
        return (1 - w) * table[lo] + w * table[lo + 1]

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) as float32 tensors shaped like t."""
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt().float(), torch.sigmoid(-lam).sqrt().float()

    def net_time(self, t):
        """The time value the network is fed for time t (float32)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "cosine_logsnr":
            lam = self.logsnr(t).clamp(-20.0, 20.0)
            return (torch.atan(torch.exp(-0.5 * lam)) / (math.pi / 2) * 1000.0).float()
        return (t * self.t_scale).float()

    def time(self, u):
        """Map the unit interval (u = 1 pure noise, u = 0 data) to this schedule's time units."""
        return u * (self.T - 1) if self.discrete else u


def bcast(v, x):
    """Reshape a per-sample value (B,) or scalar so it broadcasts against an image batch x (B,C,H,W)."""
    v = torch.as_tensor(v, device=x.device, dtype=x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


# Parameterisations (Salimans & Ho sec. 4, app. D). alpha, sigma broadcast against z.
def x_from_eps(z, eps, alpha, sigma):
    return (z - sigma * eps) / alpha


def eps_from_x(z, x, alpha, sigma):
    return (z - alpha * x) / sigma


def x_from_v(z, v, alpha, sigma):
    return alpha * z - sigma * v          # eq. 30: x = cos(phi) z - sin(phi) v


def eps_from_v(z, v, alpha, sigma):
    return sigma * z + alpha * v


def v_from_x_eps(x, eps, alpha, sigma):
    return alpha * eps - sigma * x        # eq. 26: v = cos(phi) eps - sin(phi) x


PARAMS = ("eps", "x", "v", "both")


def x_eps_from_output(out, z, alpha, sigma, param):
    """Network output -> (x_pred, eps_pred). `out` may carry extra channels (learned variance) after
    the mean channels; 'both' reads out[:, :C] as x and out[:, C:2C] as eps and mixes them as
    x = sigma^2 x_direct + alpha^2 x(eps) (Salimans & Ho sec. 4, third option)."""
    C = z.shape[1]
    if param == "eps":
        eps = out[:, :C]
        return x_from_eps(z, eps, alpha, sigma), eps
    if param == "x":
        x = out[:, :C]
        return x, eps_from_x(z, x, alpha, sigma)
    if param == "v":
        v = out[:, :C]
        return x_from_v(z, v, alpha, sigma), eps_from_v(z, v, alpha, sigma)
    if param == "both":
        x = sigma ** 2 * out[:, :C] + alpha ** 2 * x_from_eps(z, out[:, C:2 * C], alpha, sigma)
        return x, eps_from_x(z, x, alpha, sigma)
    raise ValueError(f"unknown parameterisation {param!r}: expected one of {PARAMS}")


def denoise(net, schedule, param, z, t, clip=False):
    """One network call at time t (scalar or (B,)): returns (x_pred, eps_pred) in float32.
    With clip, x_pred is clipped to [-1, 1] and eps re-derived from it (as Salimans & Ho's sampler)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])
    alpha, sigma = (bcast(v, z) for v in schedule.alpha_sigma(t))
    out = net(z, schedule.net_time(t).to(z.device)).float()
    x, eps = x_eps_from_output(out, z, alpha, sigma, param)
    if clip:
        x = x.clamp(-1, 1)
        eps = eps_from_x(z, x, alpha, sigma)
    return x, eps


def ddim_step(x_pred, eps_pred, alpha_s, sigma_s):
    """Deterministic DDIM (Song et al. 2021 eq. 12 with eta = 0; Salimans & Ho eq. 8):
    z_s = alpha_s x_pred + sigma_s eps_pred. With (alpha_s, sigma_s) = (1, 0) it returns x_pred."""
    return alpha_s * x_pred + sigma_s * eps_pred


def ddim_eta_step(x_pred, eps_pred, alpha_t, sigma_t, alpha_s, sigma_s, eta, noise):
    """DDIM with eta > 0 (Song et al. 2021 eq. 12, 16): sigma_eta = eta sqrt(s_s^2/s_t^2) sqrt(1 - a_t^2/a_s^2)."""
    sig_eta = eta * (sigma_s / sigma_t) * (1 - (alpha_t / alpha_s) ** 2).clamp_min(0).sqrt()
    return alpha_s * x_pred + (sigma_s ** 2 - sig_eta ** 2).clamp_min(0).sqrt() * eps_pred + sig_eta * noise


def posterior(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s):
    """q(z_s | z_t, x) for s < t (Kingma et al. 2021; Salimans & Ho sec. 2):
    mean = r (alpha_s/alpha_t) z_t + (1 - r) alpha_s x,  r = exp(lambda_t - lambda_s).
    Returns (mean, var_small, var_large): var_small = (1 - r) sigma_s^2 is the posterior variance
    (beta~_t of Ho et al.), var_large = (1 - r) sigma_t^2 (beta_t for adjacent discrete steps)."""
    r = (alpha_t * sigma_s) ** 2 / (sigma_t * alpha_s) ** 2
    mean = r * (alpha_s / alpha_t) * z_t + (1 - r) * alpha_s * x_pred
    return mean, (1 - r) * sigma_s ** 2, (1 - r) * sigma_t ** 2


def ancestral_logvar(var_small, var_large, var_type, v=None):
    """Log-variance of an ancestral step: 'fixed_small', 'fixed_large' (Ho et al. 2020 sec. 3.2) or
    'learned_range', log Sigma = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1)/2
    (Nichol & Dhariwal 2021 eq. 15, v the network's extra output channels in [-1, 1])."""
    log_small = torch.log(var_small.clamp_min(1e-20))
    log_large = torch.log(var_large.clamp_min(1e-20))
    if var_type == "fixed_small":
        return log_small
    if var_type == "fixed_large":
        return log_large
    if var_type == "learned_range":
        frac = (v + 1) / 2
        return frac * log_large + (1 - frac) * log_small
    raise ValueError(f"unknown variance type {var_type!r}: expected fixed_small, fixed_large or learned_range")


def ancestral_step(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s, noise, var_type="fixed_small", v=None):
    """One stochastic step z_t -> z_s: posterior mean plus exp(logvar/2) noise; no noise into the data
    (sigma_s = 0)."""
    mean, var_small, var_large = posterior(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s)
    logvar = ancestral_logvar(var_small, var_large, var_type, v)
    return mean + (sigma_s > 0).float() * torch.exp(0.5 * logvar) * noise


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats (divide by ln 2 for bits)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def pd_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp):
    """Progressive-distillation target x~ (Salimans & Ho app. G, eq. 43): the x that makes one student
    DDIM step t -> t'' land exactly on the teacher's two-step result z_t''.
    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).
    When t'' is the end of sampling (alpha, sigma) = (1, 0), x~ = z_t'' = the teacher's last x_pred."""
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


def ddim_timesteps(T, steps, skip="uniform"):
    """Descending integer timesteps for a `steps`-step DDIM chain over a T-step discrete model.
    uniform  range(0, T, T//steps)  (DDIM paper / ermongroup; identical to diffusers 'leading')
    quad     int(linspace(0, sqrt(0.8 T), steps)^2)  (ermongroup 'quad', used by Luhman & Luhman; starts at 0.8 T)
    trailing round(arange(T, 0, -T/steps)) - 1  (starts at T - 1)
    linspace round(linspace(0, T - 1, steps))"""
    if skip == "uniform":
        seq = np.arange(0, T, T // steps)
    elif skip == "quad":
        seq = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
    elif skip == "trailing":
        seq = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[::-1] - 1
    elif skip == "linspace":
        seq = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
    else:
        raise ValueError(f"unknown skip {skip!r}: expected uniform, quad, trailing or linspace")
    return [int(t) for t in seq[::-1]]


def unit_grid(steps):
    """Salimans & Ho's continuous N-step grid, descending: t_i = i/N for i = N..1 (the step from 1/N
    goes to the data)."""
    return [i / steps for i in range(steps, 0, -1)]


def sampler_times(schedule, steps, skip="uniform"):
    """The times of a `steps`-step deterministic sampler in the schedule's own units."""
    if schedule.discrete and skip != "unit":
        return ddim_timesteps(schedule.T, steps, skip)
    return [schedule.time(u) for u in unit_grid(steps)]


@torch.no_grad()
def ddim_sample(net, schedule, param, z, times, clip=False, eta=0.0, generator=None):
    """DDIM from noise z at times[0] through times[1:], then one last step to the data (alpha = 1,
    sigma = 0) that returns the final x_pred, as in ermongroup/ddim and Salimans & Ho's sampler.
    Repeated times (the quad sequence has some) are identity steps."""
    for i, t in enumerate(times):
        x, eps = denoise(net, schedule, param, z, t, clip=clip)
        if i + 1 == len(times):
            return x
        alpha_s, sigma_s = schedule.alpha_sigma(times[i + 1])
        if eta > 0:
            alpha_t, sigma_t = schedule.alpha_sigma(t)
            noise = torch.randn(z.shape, generator=generator, device=z.device)
            z = ddim_eta_step(x, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta, noise)
        else:
            z = ddim_step(x, eps, alpha_s, sigma_s)
    return z


# ================================================================================================
# nets
# ================================================================================================
# Both networks take (x, t): x is (B, C, H, W); t is a float tensor (B,) or a scalar, in the time
# units of the model's own training code (Ho et al. and DDPM-IP: integer 0..T-1 as float;
# improved-diffusion with rescale_timesteps: t * 1000 / T). Fractional t is fine everywhere.


def timestep_embedding(t, dim, order="cos_sin"):
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), computed in fp32.
    'cos_sin' (ADM, DiT): [cos, sin] with frequencies 10000^(-k/half).
    'sin_cos' (Ho et al.; diffusers flip_sin_to_cos=False, freq_shift=1): [sin, cos], 10000^(-k/(half-1))."""
    half = dim // 2
    divisor = half if order == "cos_sin" else half - 1
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / divisor)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if order == "cos_sin" else [args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


def _batch_t(t, x):
    """t as a float32 tensor of shape (B,) on x's device; a scalar or a 1-element t is broadcast."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)
    return t.expand(x.shape[0]) if t.numel() == 1 else t


def _attend(qkv, heads):
    """Multi-head softmax attention. qkv: (B, T, 3C), laid out as [q | k | v], each split into heads
    of C/heads channels. Returns (B, T, C). Scale (C/heads)^-1/2 as in all source models."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C3 // 3)


# ---- U-Net -----------------------------------------------------------------------------------

@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3            # 6 for ADM's learned variance: [eps, v]
    ch: int = 128                    # base channels; the time MLP is ch -> 4ch -> 4ch
    ch_mult: tuple = (1, 2, 2, 2)    # channels per resolution level, times ch
    num_res_blocks: int = 2          # per level on the way down (num_res_blocks + 1 on the way up)
    attn_resolutions: tuple = (16,)  # resolutions (pixels) that get attention after every res block
    num_heads: int = 1
    num_head_channels: int = -1      # > 0: heads = channels // num_head_channels (overrides num_heads)
    dropout: float = 0.0
    scale_shift: bool = False        # ADM: GN(h) * (1 + scale) + shift; Ho: GN(h + emb)
    resblock_updown: bool = False    # BigGAN-style res blocks do the resampling (DDPM-IP, PD)
    down_pad: str = "asym"           # conv downsampling: 'asym' (Ho: pad right/bottom) | 'sym' (ADM: pad 1)
    time_emb: str = "sin_cos"        # 'sin_cos' (Ho) | 'cos_sin' (ADM)
    norm_eps: float = 1e-6           # GroupNorm eps: Ho 1e-6, ADM 1e-5
    norm_groups: int = 32            # GroupNorm groups (32 in every published model)
    qkv_layout: str = "separate"     # fused ADM qkv order in checkpoints: 'legacy' (per head [q,k,v]) | 'new'


def _heads(cfg, channels):
    if cfg.num_head_channels > 0:
        if channels % cfg.num_head_channels:
            raise ValueError(f"num_head_channels={cfg.num_head_channels} does not divide {channels} channels")
        return channels // cfg.num_head_channels
    return cfg.num_heads


class ResBlock(nn.Module):
    """GN -> SiLU -> [resample] -> conv -> add time (or scale-shift) -> GN -> SiLU -> dropout -> conv,
    plus a skip (1x1 conv where the channel count changes). resample 'down' (avg-pool) / 'up'
    (nearest) is applied to both paths after the first GN+SiLU, as in BigGAN/ADM."""

    def __init__(self, c_in, c_out, emb_dim, cfg, resample=None):
        super().__init__()
        self.scale_shift, self.resample = cfg.scale_shift, resample
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out if cfg.scale_shift else c_out)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(x))
        if self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv1(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over the H*W positions with a residual: x + proj(attn(GN(x)))."""

    def __init__(self, channels, heads, cfg):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # rows [q | k | v], each split into heads
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.proj(_attend(self.qkv(h), self.heads))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """3x3 stride-2 conv; 'asym' pads right/bottom by one (Ho et al.), 'sym' pads 1 all round (ADM)."""

    def __init__(self, channels, pad):
        super().__init__()
        self.asym = pad == "asym"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asym else 1)

    def forward(self, x, emb=None):  # emb: same call as a resampling ResBlock
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asym else x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the U-Net: res blocks, optional attention after each, optional resampler."""

    def __init__(self, res, attn, resample):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn) if attn else None
        self.resample = resample


class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020) with the ADM options (Dhariwal & Nichol 2021). Skips are pushed after
    the stem, after every down res block (+attention) and after every downsampler; each up res block
    concatenates one. `down` runs from full resolution, `up` from the coarsest level (forward order).
    zero_init: ADM's zero init of each res block's last conv, attention output and the output conv
    (for training from scratch; loaded checkpoints overwrite it)."""

    def __init__(self, cfg: UNetConfig, zero_init=False):
        super().__init__()
        self.config = cfg
        ch, L, R = cfg.ch, len(cfg.ch_mult), cfg.num_res_blocks
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attention(level, c, n):  # n attention blocks if this level's resolution has attention
            if cfg.image_size >> level not in cfg.attn_resolutions:
                return None
            return [Attention(c, _heads(cfg, c), cfg) for _ in range(n)]

        skips, c = [ch], ch  # channels of the skip stack
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            res = []
            for _ in range(R):
                res.append(ResBlock(c, ch * mult, emb_dim, cfg))
                c = ch * mult
                skips.append(c)
            resample = None
            if i < L - 1:
                resample = ResBlock(c, c, emb_dim, cfg, "down") if cfg.resblock_updown else Downsample(c, cfg.down_pad)
                skips.append(c)
            self.down.append(Level(res, attention(i, c, R), resample))

        self.mid_res1 = ResBlock(c, c, emb_dim, cfg)
        self.mid_attn = Attention(c, _heads(cfg, c), cfg)
        self.mid_res2 = ResBlock(c, c, emb_dim, cfg)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            res = []
            for _ in range(R + 1):
                res.append(ResBlock(c + skips.pop(), ch * mult, emb_dim, cfg))
                c = ch * mult
            resample = None
            if i > 0:
                resample = ResBlock(c, c, emb_dim, cfg, "up") if cfg.resblock_updown else Upsample(c)
            self.up.append(Level(res, attention(i, c, R + 1), resample))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        if zero_init:
            last = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
            last += [m.proj for m in self.modules() if isinstance(m, Attention)] + [self.conv_out]
            for layer in last:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(_batch_t(t, x), self.config.ch, self.config.time_emb).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = block(h, emb)
                if level.attn is not None:
                    h = level.attn[j](h)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h, emb)
                hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for level in self.up:
            for j, block in enumerate(level.res):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
                if level.attn is not None:
                    h = level.attn[j](h)
            if level.resample is not None:
                h = level.resample(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- DiT-style ViT (Peebles & Xie 2023), unconditional --------------------------------------

@dataclass
class DiTConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3   # 6 for learned variance
    patch_size: int = 2
    hidden: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0


def _pos_embed_2d(dim, grid):
    """Fixed 2D sin-cos position embedding (grid*grid, dim): half the channels encode the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]       # (grid, dim/4)
    emb1d = torch.cat([pos.sin(), pos.cos()], dim=1)                            # (grid, dim/2)
    rows = emb1d[:, None, :].expand(grid, grid, -1)
    cols = emb1d[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=2).reshape(grid * grid, dim).float()


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero: the time embedding sets shift/scale/gate of both branches."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=2)
        x = x + gate1 * self.proj(_attend(self.qkv(_modulate(self.norm1(x), shift1, scale1)), self.heads))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Patchify (conv) + fixed 2D sin-cos positions -> adaLN-Zero blocks -> final adaLN layer -> unpatchify.
    With the adaLN-Zero init (zeroed modulation and output layers) the output is exactly zero at init."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        p, D = cfg.patch_size, cfg.hidden
        self.patch = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.register_buffer("pos", _pos_embed_2d(D, cfg.image_size // p), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, p * p * cfg.out_channels)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(D, -1))
        nn.init.zeros_(self.patch.bias)
        for lin in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[1] for b in self.blocks] + [self.ada_out[1], self.out]:  # adaLN-Zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t):
        B, _, H, W = x.shape
        p, C = self.config.patch_size, self.config.out_channels
        c = self.time_mlp(timestep_embedding(_batch_t(t, x), 256, "cos_sin").to(x.dtype))
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=2)
        h = self.out(_modulate(self.norm_out(h), shift, scale))  # (B, T, p*p*C)
        h = h.view(B, H // p, W // p, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(B, C, H, W)


# ---- presets, build_net / net_config ---------------------------------------------------------

_ADM = dict(scale_shift=True, time_emb="cos_sin", norm_eps=1e-5)
UNET_PRESETS = {
    # Ho et al. CIFAR-10 (= diffusers google/ddpm-cifar10-32, pesser/ermongroup ports): 35,746,307 params
    "ddpm_cifar10": UNetConfig(dropout=0.1),
    # DDIM CelebA 64x64 (ermongroup/ddim, Luhman & Luhman's CelebA teacher): 78,700,803 params
    "ddim_celeba64": UNetConfig(image_size=64, ch_mult=(1, 2, 2, 2, 4), dropout=0.1),
    # Ho et al. 256 px (diffusers google/ddpm-{cat,church,bedroom,celebahq}-256): 113,673,219 params
    "ddpm_256": UNetConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4)),
    # DDPM-IP ADM baseline = DKDM CIFAR-10 / ImageNet-32 teacher (57M-CNN.yaml): 57,094,662 params
    "adm_cifar10_57m": UNetConfig(out_channels=6, num_res_blocks=3, attn_resolutions=(16, 8), num_head_channels=32,
                                  dropout=0.3, resblock_updown=True, qkv_layout="new", **_ADM),
    # DDPM-IP CelebA 64 teacher of DKDM (295M-CNN.yaml)
    "adm_celeba64_295m": UNetConfig(image_size=64, out_channels=6, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                                    attn_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                                    resblock_updown=True, qkv_layout="new", **_ADM),
    # improved-diffusion cifar10_uncond_50M_500K (t fed as t*1000/4000): 52,546,438 params
    "iddpm_cifar10": UNetConfig(out_channels=6, num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4,
                                dropout=0.3, down_pad="sym", qkv_layout="legacy", **_ADM),
    # Salimans & Ho progressive distillation CIFAR-10 base model
    "pd_cifar10": UNetConfig(ch=256, ch_mult=(1, 1, 1), num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.2,
                             resblock_updown=True, **_ADM),
    # CPU tests
    "tiny": UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2,
                       resblock_updown=True, norm_groups=8, **_ADM),
}
DIT_PRESETS = {
    "dit_s2": DiTConfig(hidden=384, depth=12, num_heads=6, patch_size=2),
    "dit_b2": DiTConfig(hidden=768, depth=12, num_heads=12, patch_size=2),
    "dit_tiny": DiTConfig(image_size=16, hidden=64, depth=2, num_heads=2, patch_size=2),
}


def unet_config(name) -> UNetConfig:
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset '{name}'; expected one of {', '.join(UNET_PRESETS)}")
    return UNET_PRESETS[name]


def dit_config(name) -> DiTConfig:
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset '{name}'; expected one of {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[name]


def net_preset(name) -> dict:
    """build_net() dict of a U-Net or DiT preset."""
    if name in UNET_PRESETS:
        return {"arch": "unet", **_jsonable(asdict(UNET_PRESETS[name]))}
    if name in DIT_PRESETS:
        return {"arch": "dit", **_jsonable(asdict(DIT_PRESETS[name]))}
    raise ValueError(f"unknown network preset '{name}'; expected one of {', '.join([*UNET_PRESETS, *DIT_PRESETS])}")


def _jsonable(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _make_config(cls, d):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected some of {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_net(cfg: dict, zero_init=False) -> nn.Module:
    """cfg = {'arch': 'unet'|'dit', **config fields} (missing fields take the dataclass defaults).
    zero_init applies to the U-Net only (DiT always uses its adaLN-Zero init)."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if arch == "unet":
        return UNet(_make_config(UNetConfig, cfg), zero_init=zero_init)
    if arch == "dit":
        return DiT(_make_config(DiTConfig, cfg))
    raise ValueError(f"network config has arch={arch!r}; expected 'unet' or 'dit'")


def net_config(net) -> dict:
    """JSON-serialisable dict that rebuilds `net` with build_net (stored in checkpoints)."""
    return {"arch": "unet" if isinstance(net, UNet) else "dit", **_jsonable(asdict(net.config))}


def make_net(preset, **overrides):
    """A network from a preset name (NET_PRESETS) with some config fields overridden (None = keep).
    Fields a network type does not have (dropout for the DiT) are ignored."""
    cfg = net_preset(preset)
    cfg.update({k: v for k, v in overrides.items() if v is not None and k in cfg})
    return build_net(cfg, zero_init=True)

# ================================================================================================
# teachers
# ================================================================================================

# ---- key maps: diffusers / ermongroup (Ho et al. ports) / guided-diffusion <-> ours ----------
# One table drives all maps: _unet_modules lists every parametrised module of UNet(cfg) with a
# format-neutral place; a per-format function names that place; per-kind tables name the leaves.
# Each of our tensors corresponds to one checkpoint tensor (with 1x1 conv dims squeezed), except the
# attention qkv, which is three tensors (diffusers, ermongroup) or one fused tensor in a head order.

FORMAT_NAMES = {"diffusers": "diffusers", "ermongroup": "ermongroup/pesser", "guided": "guided-diffusion"}


def _unet_modules(cfg):
    """(our module path, kind, place) for every parametrised module of UNet(cfg), in forward order."""
    L, R = len(cfg.ch_mult), cfg.num_res_blocks
    has_attn = [cfg.image_size >> i in cfg.attn_resolutions for i in range(L)]
    yield "time_mlp.0", "plain", ("time", 0)
    yield "time_mlp.2", "plain", ("time", 1)
    yield "conv_in", "plain", ("conv_in",)
    for i in range(L):
        for j in range(R):
            yield f"down.{i}.res.{j}", "res", ("down", i, j)
            if has_attn[i]:
                yield f"down.{i}.attn.{j}", "attn", ("down_attn", i, j)
        if i < L - 1:
            yield f"down.{i}.resample", "res" if cfg.resblock_updown else "downconv", ("downsample", i)
    yield "mid_res1", "res", ("mid", 0)
    yield "mid_attn", "attn", ("mid", 1)
    yield "mid_res2", "res", ("mid", 2)
    for u in range(L):
        i = L - 1 - u  # resolution level of up block u
        for j in range(R + 1):
            yield f"up.{u}.res.{j}", "res", ("up", i, j)
            if has_attn[i]:
                yield f"up.{u}.attn.{j}", "attn", ("up_attn", i, j)
        if i > 0:
            yield f"up.{u}.resample", "res" if cfg.resblock_updown else "upconv", ("upsample", i)
    yield "norm_out", "plain", ("norm_out",)
    yield "conv_out", "plain", ("conv_out",)


def _diffusers_path(place, cfg):
    L = len(cfg.ch_mult)
    match place:
        case ("time", n): return f"time_embedding.linear_{n + 1}"
        case ("conv_in",) | ("conv_out",): return place[0]
        case ("norm_out",): return "conv_norm_out"
        case ("down", i, j): return f"down_blocks.{i}.resnets.{j}"
        case ("down_attn", i, j): return f"down_blocks.{i}.attentions.{j}"
        case ("downsample", i): return f"down_blocks.{i}.downsamplers.0"
        case ("mid", n): return ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"][n]
        case ("up", i, j): return f"up_blocks.{L - 1 - i}.resnets.{j}"
        case ("up_attn", i, j): return f"up_blocks.{L - 1 - i}.attentions.{j}"
        case ("upsample", i): return f"up_blocks.{L - 1 - i}.upsamplers.0"


def _ermongroup_path(place, cfg):
    match place:
        case ("time", n): return f"temb.dense.{n}"
        case ("conv_in",) | ("norm_out",) | ("conv_out",): return place[0]
        case ("down", i, j): return f"down.{i}.block.{j}"
        case ("down_attn", i, j): return f"down.{i}.attn.{j}"
        case ("up", i, j): return f"up.{i}.block.{j}"  # Ho's `up` is indexed by resolution level
        case ("up_attn", i, j): return f"up.{i}.attn.{j}"
        case ("downsample", i): return f"down.{i}.downsample"
        case ("upsample", i): return f"up.{i}.upsample"
        case ("mid", n): return ["mid.block_1", "mid.attn_1", "mid.block_2"][n]


def _guided_path(place, cfg):
    L, R = len(cfg.ch_mult), cfg.num_res_blocks
    has_attn = [cfg.image_size >> i in cfg.attn_resolutions for i in range(L)]
    match place:
        case ("time", n): return f"time_embed.{2 * n}"
        case ("conv_in",): return "input_blocks.0.0"
        case ("norm_out",): return "out.0"
        case ("conv_out",): return "out.2"
        case ("down", i, j): return f"input_blocks.{1 + i * (R + 1) + j}.0"
        case ("down_attn", i, j): return f"input_blocks.{1 + i * (R + 1) + j}.1"
        case ("downsample", i): return f"input_blocks.{(i + 1) * (R + 1)}.0"
        case ("mid", n): return f"middle_block.{n}"
        case ("up", i, j): return f"output_blocks.{(L - 1 - i) * (R + 1) + j}.0"
        case ("up_attn", i, j): return f"output_blocks.{(L - 1 - i) * (R + 1) + j}.1"
        case ("upsample", i): return f"output_blocks.{(L - 1 - i) * (R + 1) + R}.{2 if has_attn[i] else 1}"


_PATHS = {"diffusers": _diffusers_path, "ermongroup": _ermongroup_path, "guided": _guided_path}
# leaf names: ours -> theirs
_RES_LEAVES = {
    "diffusers": dict(norm1="norm1", conv1="conv1", emb_proj="time_emb_proj", norm2="norm2", conv2="conv2", skip="conv_shortcut"),
    "ermongroup": dict(norm1="norm1", conv1="conv1", emb_proj="temb_proj", norm2="norm2", conv2="conv2", skip="nin_shortcut"),
    "guided": dict(norm1="in_layers.0", conv1="in_layers.2", emb_proj="emb_layers.1", norm2="out_layers.0",
                   conv2="out_layers.3", skip="skip_connection"),
}
_ATTN_NORM = {"diffusers": "group_norm", "ermongroup": "norm", "guided": "norm"}
_ATTN_PROJ = {"diffusers": "to_out.0", "ermongroup": "proj_out", "guided": "proj_out"}
_ATTN_QKV = {"diffusers": ("to_q", "to_k", "to_v"), "ermongroup": ("q", "k", "v"), "guided": ("qkv",)}
_LINEAR_DIMS = {"diffusers": 0, "ermongroup": 2, "guided": 1}  # trailing 1-dims of their attention projections
_DOWNCONV = {"diffusers": "conv", "ermongroup": "conv", "guided": "op"}
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class _Entry:
    """Our tensor `ours` <-> checkpoint tensors `theirs` (concatenated along dim 0 when several).
    pad: trailing singleton dims theirs carries (1x1 conv weights); legacy_heads > 0: the fused qkv
    rows are in per-head [q, k, v] order (improved-diffusion) instead of our [q | k | v]."""
    ours: str
    theirs: tuple
    pad: int = 0
    legacy_heads: int = 0

    def to_ours(self, tensors):
        x = torch.cat([t.reshape(t.shape[:t.dim() - self.pad]) for t in tensors])
        if self.legacy_heads:  # rows (heads, 3, d) -> (3, heads, d)
            x = x.reshape(self.legacy_heads, 3, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        return x

    def to_theirs(self, x):
        if self.legacy_heads:  # rows (3, heads, d) -> (heads, 3, d)
            x = x.reshape(3, self.legacy_heads, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        return [t.reshape(*t.shape, *[1] * self.pad).clone() for t in x.chunk(len(self.theirs))]


def _meta_state(cfg):
    """Our state dict for cfg with shapes only (no memory)."""
    with torch.device("meta"):
        return UNet(cfg).state_dict()


def _join(*parts):
    return ".".join(p for p in parts if p)


def _entries(cfg, fmt):
    """The _Entry list mapping UNet(cfg)'s tensors to format fmt, and our (meta) state dict."""
    ours = _meta_state(cfg)
    path_of, out = _PATHS[fmt], []
    for mine, kind, place in _unet_modules(cfg):
        theirs = path_of(place, cfg)
        if kind == "plain":
            leaves = {"": ""}
        elif kind == "downconv":
            leaves = {"conv": _DOWNCONV[fmt]}
        elif kind == "upconv":
            leaves = {"conv": "conv"}
        elif kind == "res":
            leaves = {a: b for a, b in _RES_LEAVES[fmt].items() if f"{mine}.{a}.weight" in ours}
        else:  # attention
            leaves = {"norm": _ATTN_NORM[fmt]}
            heads = _heads(cfg, ours[f"{mine}.norm.weight"].shape[0])
            for p in ("weight", "bias"):
                pad = _LINEAR_DIMS[fmt] if p == "weight" else 0
                out.append(_Entry(f"{mine}.qkv.{p}", tuple(f"{theirs}.{q}.{p}" for q in _ATTN_QKV[fmt]), pad,
                                  heads if fmt == "guided" and cfg.qkv_layout == "legacy" else 0))
                out.append(_Entry(f"{mine}.proj.{p}", (f"{theirs}.{_ATTN_PROJ[fmt]}.{p}",), pad))
        for a, b in leaves.items():
            for p in ("weight", "bias"):
                out.append(_Entry(_join(mine, a, p), (_join(theirs, b, p),)))
    assert sorted(e.ours for e in out) == sorted(ours), "key table out of sync with UNet"
    return out, ours


def _preset_name(cfg):
    return next((n for n, c in UNET_PRESETS.items() if c == cfg), None)


def _label(cfg):
    name = _preset_name(cfg)
    return f"'{name}'" if name else "(custom)"


def _check(sd, expected, what, cfg):
    """ValueError (one line) unless sd has exactly the expected keys and shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    hint = "pass --teacher-format/--teacher-config to match the checkpoint"
    if missing or unexpected:
        detail = "; ".join(f"{len(ks)} {kind}, e.g. '{ks[0]}'" for kind, ks in (("missing", missing), ("unexpected", unexpected)) if ks)
        raise ValueError(f"checkpoint has {len(sd)} tensors in {what} format but config {_label(cfg)} expects "
                         f"{len(expected)} ({detail}); {hint}")
    bad = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"checkpoint tensor '{k}' ({what} format) has shape {tuple(sd[k].shape)} but config {_label(cfg)} "
                         f"expects {tuple(expected[k].shape)} ({len(bad)} shape mismatches); {hint}")


def _format_fits_config(cfg, fmt):
    """ValueError unless checkpoints of format fmt can hold UNet(cfg)."""
    if fmt == "guided" and cfg.qkv_layout not in ("legacy", "new"):
        raise ValueError(f"guided-diffusion checkpoints fuse qkv, but the config has qkv_layout={cfg.qkv_layout!r}; "
                         "use 'legacy' (improved-diffusion) or 'new' (use_new_attention_order=True)")
    ho = dict(scale_shift=False, resblock_updown=False, down_pad="asym", time_emb="sin_cos", num_heads=1, num_head_channels=-1)
    wrong = {k: getattr(cfg, k) for k, v in ho.items() if getattr(cfg, k) != v}
    if fmt == "ermongroup" and wrong:
        raise ValueError(f"ermongroup/pesser checkpoints hold Ho et al.'s architecture, but config {_label(cfg)} has {wrong}")


def _expected(cfg, fmt):
    """(entries, {checkpoint key: meta tensor of the expected shape}) for UNet(cfg) in format fmt."""
    _format_fits_config(cfg, fmt)
    entries, ours = _entries(cfg, fmt)
    return entries, {k: t for e in entries for k, t in zip(e.theirs, e.to_theirs(ours[e.ours]))}


def _from(sd, cfg, fmt):
    entries, expected = _expected(cfg, fmt)
    _check(sd, expected, FORMAT_NAMES[fmt], cfg)
    return {e.ours: e.to_ours([sd[k] for k in e.theirs]) for e in entries}


def _to(sd, cfg, fmt):
    _format_fits_config(cfg, fmt)
    entries, ours = _entries(cfg, fmt)
    _check(sd, ours, "our", cfg)
    return {k: t for e in entries for k, t in zip(e.theirs, e.to_theirs(sd[e.ours]))}


def from_diffusers(sd, cfg: UNetConfig):
    """diffusers UNet2DModel state dict -> ours. Accepts the old attention names (query/key/value/proj_attn)."""
    def rename(k):
        parts = k.split(".")
        if "attentions" in parts and len(parts) > parts.index("attentions") + 2:
            i = parts.index("attentions") + 2
            parts[i] = _OLD_DIFFUSERS_ATTN.get(parts[i], parts[i])
        return ".".join(parts)
    return _from({rename(k): v for k, v in sd.items()}, cfg, "diffusers")


def from_ermongroup(sd, cfg: UNetConfig = None):
    """Ho et al. PyTorch port (ermongroup/ddim, pesser/pytorch_diffusion) state dict -> ours.
    Without cfg the architecture is read from the keys (see unet_config_from_ermongroup)."""
    return _from(sd, cfg or unet_config_from_ermongroup(sd), "ermongroup")


def to_ermongroup(sd, cfg: UNetConfig):
    return _to(sd, cfg, "ermongroup")


def from_guided(sd, cfg: UNetConfig):
    """improved-diffusion / guided-diffusion / DDPM-IP state dict -> ours (cfg.qkv_layout says the qkv order)."""
    return _from(sd, cfg, "guided")


def to_guided(sd, cfg: UNetConfig):
    return _to(sd, cfg, "guided")


def infer_format(sd) -> str:
    """'ours' | 'diffusers' | 'ermongroup' | 'guided', from the time-embedding key names."""
    for key, fmt in (("time_mlp.0.weight", "ours"), ("time_embedding.linear_1.weight", "diffusers"),
                     ("temb.dense.0.weight", "ermongroup"), ("time_embed.0.weight", "guided")):
        if key in sd:
            return fmt
    first = next(iter(sd), None)
    raise ValueError(f"cannot tell the format of a checkpoint with {len(sd)} tensors (first '{first}'); expected "
                     "diffusers, ermongroup/pesser or guided-diffusion key names; pass --teacher-format")


def unet_config_from_ermongroup(sd) -> UNetConfig:
    """Architecture of a Ho et al. port from its keys. The checkpoint does not store the image size, so it
    assumes Ho et al.'s attention at 16x16 (true of all released models); dropout is unknown (0)."""
    try:
        ch, in_ch = sd["conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
        R = sum(1 for k in sd if k.startswith("down.0.block.") and k.endswith(".conv1.weight"))
        mult = tuple(sd[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        attn_levels = [i for i in range(levels) if f"down.{i}.attn.0.q.weight" in sd]
        out_ch = sd["conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a complete ermongroup/pesser state dict (looking for {e}); pass --teacher-format") from None
    if not attn_levels:
        raise ValueError("ermongroup/pesser checkpoint has no attention, so its image size is unknown; pass --teacher-config")
    size = 16 << attn_levels[0]
    return UNetConfig(image_size=size, in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=mult, num_res_blocks=R,
                      attn_resolutions=tuple(size >> i for i in attn_levels))


# UNet2DModel.__init__ defaults (diffusers 0.42), used for the keys a config.json leaves out
_DIFFUSERS_DEFAULTS = dict(
    _class_name="UNet2DModel", sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None)


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DModel config.json dict. A missing key takes diffusers' default
    (attention_head_dim: 8 channels per head); attention_head_dim null means one head per block."""
    c = {**_DIFFUSERS_DEFAULTS, **config}

    def need(ok, what):
        if not ok:
            raise ValueError(f"unsupported diffusers UNet config: {what}")

    for key, want in (("_class_name", "UNet2DModel"), ("act_fn", "silu"), ("norm_num_groups", 32),
                      ("center_input_sample", False), ("time_embedding_type", "positional"),
                      ("mid_block_type", "UNetMidBlock2D"), ("mid_block_scale_factor", 1), ("add_attention", True),
                      ("class_embed_type", None), ("num_class_embeds", None)):
        need(c[key] == want, f"{key}={c[key]!r} (need {want!r})")
    chans, size = list(c["block_out_channels"]), c["sample_size"]
    ch, L = chans[0], len(chans)
    need(all(x % ch == 0 for x in chans), f"block_out_channels={chans} are not multiples of the first")
    need(c["time_embedding_dim"] in (None, 4 * ch), f"time_embedding_dim={c['time_embedding_dim']} (need 4*{ch})")
    shift = c["resnet_time_scale_shift"]
    need(shift in ("default", "scale_shift"), f"resnet_time_scale_shift={shift!r}")
    need(c["attn_norm_num_groups"] in ((32,) if shift == "scale_shift" else (None, 32)),
         f"attn_norm_num_groups={c['attn_norm_num_groups']} with resnet_time_scale_shift={shift!r} "
         "(the mid attention needs GroupNorm(32): set attn_norm_num_groups=32)")
    emb = {(False, 1): "sin_cos", (True, 0): "cos_sin"}.get((c["flip_sin_to_cos"], c["freq_shift"]))
    need(emb is not None, f"flip_sin_to_cos={c['flip_sin_to_cos']}, freq_shift={c['freq_shift']} (need False/1 or True/0)")
    if isinstance(size, (list, tuple)):
        need(size[0] == size[1], f"sample_size={size} (square only)")
        size = size[0]
    need(isinstance(size, int), f"sample_size={size!r}")

    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    need(len(down) == L and len(up) == L, "block type lists and block_out_channels differ in length")
    down_kind = {"DownBlock2D": "conv", "AttnDownBlock2D": c["downsample_type"], "ResnetDownsampleBlock2D": "resnet"}
    up_kind = {"UpBlock2D": "conv", "AttnUpBlock2D": c["upsample_type"], "ResnetUpsampleBlock2D": "resnet"}
    for t in down:
        need(t in down_kind, f"down block type {t!r} (supported: {', '.join(down_kind)})")
    for t in up:
        need(t in up_kind, f"up block type {t!r} (supported: {', '.join(up_kind)})")
    attn = [t.startswith("Attn") for t in down]
    need(attn == [t.startswith("Attn") for t in reversed(up)], f"attention levels differ between {down} and {up}")
    resample = {down_kind[t] for t in down[:-1]} | {up_kind[t] for t in up[:-1]}  # the last blocks do not resample
    need(len(resample) <= 1 and resample <= {"conv", "resnet"}, f"mixed or unknown resampling {sorted(resample)}")

    head_dim = c["attention_head_dim"]
    return UNetConfig(
        image_size=size, in_channels=c["in_channels"], out_channels=c["out_channels"], ch=ch,
        ch_mult=tuple(x // ch for x in chans), num_res_blocks=c["layers_per_block"],
        attn_resolutions=tuple(size >> i for i in range(L) if attn[i]),
        num_heads=1, num_head_channels=-1 if head_dim is None else head_dim, dropout=c["dropout"],
        scale_shift=shift == "scale_shift", resblock_updown=resample == {"resnet"},
        down_pad="asym" if c["downsample_padding"] == 0 else "sym", time_emb=emb, norm_eps=c["norm_eps"])


def infer_preset(sd, fmt) -> str:
    """Name of the one U-Net preset whose keys and shapes in format fmt equal sd's; ValueError otherwise."""
    def fits(cfg):
        try:
            want = _expected(cfg, fmt)[1]
        except ValueError:  # the format cannot hold this preset
            return False
        return want.keys() == sd.keys() and all(sd[k].shape == t.shape for k, t in want.items())

    names = [n for n, cfg in UNET_PRESETS.items() if fits(cfg)]
    if len(names) == 1:
        return names[0]
    found = f"matches presets {names}" if names else "matches no preset"
    raise ValueError(f"checkpoint has {len(sd)} tensors in {FORMAT_NAMES[fmt]} format and {found}; "
                     "pass --teacher-config with a preset name or a JSON U-Net config")


# ---- reading weights, hub download, teacher loaders -----------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """Read a .safetensors file without the safetensors package. Layout: u64 little-endian header
    length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...},
    then the raw little-endian tensor bytes (offsets relative to the end of the header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base, out = 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
            dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{path}: tensor '{name}' has {end - begin} bytes but shape {shape} of {info['dtype']}")
            f.seek(base + begin)
            buf = bytearray(f.read(end - begin))
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
    return out


def read_weights(path) -> dict:
    """State dict from .safetensors or a torch file (.bin/.pt/.ckpt, weights_only)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def hub_download(repo_id, filename, cache_dir=None, revision="main"):
    """Path of a cached copy of https://huggingface.co/{repo_id}/resolve/{revision}/{filename}
    (HF_ENDPOINT overrides the host), downloaded once (atomically) without huggingface_hub."""
    dest = os.path.join(cache_dir or os.path.join(CACHE_DIR, "hub"), repo_id.replace("/", "--"), revision, filename)
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo_id}/resolve/{revision}/{filename}"
    return download(url, dest, what=f"{repo_id}/{filename}")


def load_diffusers_dir(path_or_repo, device="cpu", cache_dir=None, revision="main"):
    """(net, info) from a diffusers UNet2DModel: a local folder (config.json next to the weights, or in
    unet/) or a hub repo id (flat layout, e.g. google/ddpm-cifar10-32). Weights: .safetensors, else .bin.
    info = {'format', 'config': config.json, 'scheduler': scheduler_config.json or None, 'net': net_config}."""
    local = os.path.isdir(path_or_repo)
    if not local and (path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~"))):
        raise ValueError(f"{path_or_repo} is neither a folder nor a hub repo id like google/ddpm-cifar10-32")

    def find(name):
        if local:
            paths = [os.path.join(path_or_repo, sub, name) for sub in ("", "unet", "scheduler")]
            return next((p for p in paths if os.path.exists(p)), None)
        return hub_download(path_or_repo, name, cache_dir, revision)

    def find_optional(name):
        try:
            return find(name)
        except RuntimeError:
            return None

    config_path = find("config.json")
    if config_path is None:
        raise ValueError(f"{path_or_repo} has no config.json (nor unet/config.json); expected a diffusers UNet2DModel folder")
    weights = find_optional("diffusion_pytorch_model.safetensors") or find("diffusion_pytorch_model.bin")
    if weights is None:
        raise ValueError(f"{path_or_repo} has neither diffusion_pytorch_model.safetensors nor .bin")
    scheduler_path = find_optional("scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    scheduler = None
    if scheduler_path:
        with open(scheduler_path) as f:
            scheduler = json.load(f)
    cfg = unet_config_from_diffusers(config)
    net = UNet(cfg)
    net.load_state_dict(from_diffusers(read_weights(weights), cfg))
    return net.to(device).eval(), {"format": "diffusers", "config": config, "scheduler": scheduler, "net": net_config(net)}


def _unwrap_state_dict(obj):
    """The tensor dict inside a training checkpoint: ermongroup/ddim saves a list [model, optimizer, epoch,
    step, (ema)], of which the last all-tensor dict (the EMA if present) is taken; DataParallel's
    'module.' prefix is dropped."""
    if isinstance(obj, (list, tuple)):
        dicts = [o for o in obj if isinstance(o, dict) and o and all(torch.is_tensor(v) for v in o.values())]
        if not dicts:
            raise ValueError("checkpoint is a list without a state dict in it")
        obj = dicts[-1]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_original(path, fmt=None, config=None, device="cpu"):
    """(net, info) from a .pt/.ckpt/.safetensors state dict in ermongroup/pesser or guided-diffusion format.
    fmt: inferred from the keys when None. config: preset name, UNetConfig, or dict of UNetConfig fields;
    when None it is the one preset matching the checkpoint's keys and shapes (for ermongroup files
    matching none, the architecture read from the keys)."""
    sd = _unwrap_state_dict(read_weights(path))
    fmt = fmt or infer_format(sd)
    if fmt not in ("ermongroup", "guided"):
        raise ValueError(f"{path} is in {fmt} format; load_original reads ermongroup/pesser or guided-diffusion files")
    if config is None:
        try:
            config = infer_preset(sd, fmt)
        except ValueError:
            if fmt != "ermongroup":
                raise
            config = unet_config_from_ermongroup(sd)
    if isinstance(config, str):
        config = unet_config(config)
    if isinstance(config, dict):  # UNetConfig fields, or a net_config() dict
        config = _make_config(UNetConfig, {k: v for k, v in config.items() if k != "arch"})
    net = UNet(config)
    net.load_state_dict(from_ermongroup(sd, config) if fmt == "ermongroup" else from_guided(sd, config))
    return net.to(device).eval(), {"format": fmt, "preset": _preset_name(config), "net": net_config(net)}


CACHE_DIR = os.environ.get("DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill-ref"))

# Schedules and parameterisations of original (non-diffusers) checkpoints, by the preset the keys imply.
ORIGINAL_INFO = {
    "ddpm_cifar10": dict(schedule=dict(kind="linear", T=1000), param="eps", var="fixed_large"),
    "adm_cifar10_57m": dict(schedule=dict(kind="cosine", T=1000), param="eps", var="learned_range"),
    "iddpm_cifar10": dict(schedule=dict(kind="cosine", T=4000, t_scale=0.25), param="eps", var="learned_range"),
}


def _scheduler_info(sched):
    """diffusers scheduler_config.json -> our schedule spec, parameterisation and variance type."""
    kinds = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
    if sched.get("beta_schedule", "linear") not in kinds:
        raise ValueError(f"unsupported beta_schedule {sched['beta_schedule']!r}: expected linear or squaredcos_cap_v2")
    params = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}
    spec = dict(kind=kinds[sched.get("beta_schedule", "linear")], T=sched.get("num_train_timesteps", 1000))
    if spec["kind"] == "linear":
        spec.update(beta_start=sched.get("beta_start", 1e-4), beta_end=sched.get("beta_end", 0.02))
    var = {"fixed_large": "fixed_large", "fixed_small": "fixed_small", "learned_range": "learned_range"}
    return dict(schedule=spec, param=params[sched.get("prediction_type", "epsilon")],
                var=var.get(sched.get("variance_type", "fixed_small"), "fixed_small"))


def load_teacher(spec, device="cpu", fmt=None, preset=None):
    """Load a diffusion model as a teacher: returns (net, info).

    spec: a hub id ('google/ddpm-cifar10-32', fetched once into CACHE_DIR), a local diffusers directory
    (config.json + weights), an original checkpoint (ermongroup/pesser or guided/improved-diffusion
    state dict; format inferred from its keys or named by `fmt`, architecture inferred or named by
    `preset`), or a checkpoint written by this project (its EMA weights).
    net(x, t) returns the source model's raw output for x and t in the source's own time units.
    info: {'schedule': Schedule, 'param': eps|x|v|both, 'var': variance type, 'steps': sampling steps
    the model was distilled for or None, 'source': spec}. The diffusers scheduler's clip_sample is not
    part of info: deterministic DDIM teachers run unclipped (see teacher_checkpoints.md).
    """
    if os.path.isfile(spec) and not spec.endswith(".safetensors"):
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
            net = build_net(obj["net_config"])
            net.load_state_dict(obj["ema"] if obj.get("ema") is not None else obj["model"])
            info = dict(schedule=Schedule(**obj["schedule"]), param=obj["param"], var=obj.get("var", "fixed_small"),
                        steps=obj.get("steps"), source=spec)
            return net.to(device).eval().requires_grad_(False), info
    if os.path.isfile(spec):
        net, found = load_original(spec, fmt=fmt, config=preset)
        if found["preset"] not in ORIGINAL_INFO:
            raise ValueError(f"{spec}: no schedule is known for its architecture; expected one of {sorted(ORIGINAL_INFO)}")
        meta = ORIGINAL_INFO[found["preset"]]
    else:
        net, found = load_diffusers_dir(spec, cache_dir=os.path.join(CACHE_DIR, "hub"))
        if found["scheduler"] is None:
            raise ValueError(f"{spec} has no scheduler_config.json: cannot tell its noise schedule")
        meta = _scheduler_info(found["scheduler"])
        if found["config"].get("out_channels") == 6:
            meta["var"] = "learned_range"
    info = dict(schedule=Schedule(**meta["schedule"]), param=meta["param"], var=meta["var"], steps=None, source=spec)
    return net.to(device).eval().requires_grad_(False), info


# ================================================================================================
# data
# ================================================================================================

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, path, md5=None, what="file"):
    """Fetch url to path once (temp file then rename), with a progress line; one-line errors."""
    if os.path.exists(path) and (md5 is None or _md5(path) == md5):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                done += len(block)
                print(f"\rdownloading {what}: {done / 2**20:.0f}/{total / 2**20:.0f} MB", end="", file=sys.stderr)
        print(file=sys.stderr)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"could not download {url} ({e}); fetch it by hand and place it at {path}") from None
    if md5 is not None and _md5(tmp) != md5:
        os.remove(tmp)
        raise RuntimeError(f"{url} downloaded with the wrong md5 (expected {md5}); place a good copy at {path}")
    os.replace(tmp, path)
    return path


def load_cifar10(data_dir, split="train"):
    """CIFAR-10 from the official python tarball (md5-checked, cached): uint8 (N, 3, 32, 32)."""
    path = download(CIFAR10_URL, os.path.join(data_dir, "cifar-10-python.tar.gz"), CIFAR10_MD5, "CIFAR-10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    arrays = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            if os.path.basename(member.name) in names:
                arrays[os.path.basename(member.name)] = pickle.load(tar.extractfile(member), encoding="bytes")[b"data"]
    return torch.from_numpy(np.concatenate([arrays[n] for n in names]).reshape(-1, 3, 32, 32))


def load_folder(path, image_size):
    """Every image below a folder, centre-cropped to a square and resized (bicubic): uint8 (N, 3, S, S)."""
    from PIL import Image
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(exts))
    if not files:
        raise ValueError(f"no images ({', '.join(exts)}) found below {path!r}")
    out = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        im = Image.open(f).convert("RGB")
        s = min(im.size)
        left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
        out[i] = np.asarray(im.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.BICUBIC))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def make_shapes(n, image_size=32, seed=0):
    """A procedural dataset: one to three filled circles, squares or triangles in saturated colours on a
    two-colour gradient background. Image i depends only on (seed, i). uint8 (n, 3, S, S)."""
    s = image_size
    yy, xx = np.meshgrid((np.arange(s) + 0.5) / s, (np.arange(s) + 0.5) / s, indexing="ij")
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        c0, c1 = rng.uniform(0.0, 0.5, 3), rng.uniform(0.0, 0.5, 3)
        angle = rng.uniform(0, 2 * np.pi)
        g = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.71) / 1.42
        img = c0 + g[..., None] * (c1 - c0)
        for _ in range(rng.integers(1, 4)):
            colour = rng.uniform(0.5, 1.0, 3) * (rng.uniform(size=3) < 0.7) + 0.1
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            kind = rng.integers(3)
            if kind == 0:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
            elif kind == 1:
                mask = (abs(xx - cx) < r * 0.8) & (abs(yy - cy) < r * 0.8)
            else:
                mask = (yy - cy < r * 0.7) & (yy - cy > -r + 2 * abs(xx - cx))
            img[mask] = colour
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


DATASETS = "cifar10, folder:PATH or shapes"


def load_dataset(name, image_size=None, data_dir=None, n_shapes=20000, seed=0):
    """A whole dataset as a uint8 tensor (N, 3, S, S) on the CPU (move it to the device once: CIFAR-10
    is 150 MB). name: 'cifar10' (32x32 train split), 'folder:PATH' or 'shapes'."""
    data_dir = data_dir or os.path.join(CACHE_DIR, "data")
    if name == "cifar10":
        if image_size not in (None, 32):
            raise ValueError(f"cifar10 images are 32x32, not {image_size}: drop --image-size or use folder:PATH")
        return load_cifar10(data_dir)
    if name.startswith("folder:"):
        return load_folder(name[len("folder:"):], image_size or 32)
    if name == "shapes":
        return make_shapes(n_shapes, image_size or 32, seed)
    raise ValueError(f"unknown dataset {name!r}: expected {DATASETS}")


def to_float(images_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images):
    """float [-1, 1] -> uint8, rounded and clipped."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_batch(data, batch_size, generator, flip=True):
    """A random batch from a uint8 dataset already on the device, as float [-1, 1], with random
    horizontal flips; no DataLoader."""
    idx = torch.randint(len(data), (batch_size,), generator=generator, device=generator.device)
    x = to_float(data[idx.to(data.device)])
    if flip:
        mask = torch.rand(batch_size, generator=generator, device=generator.device).to(x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


# ================================================================================================
# checkpoints
# ================================================================================================

CKPT_FORMAT = "distill-ref/1"


def save_checkpoint(path, **state):
    """Write one self-describing checkpoint atomically (temp file in the same folder, then rename).
    Expected keys: net_config, model, ema, schedule (Schedule.spec()), param, var, steps, method,
    config, optimizer, step, rng, elapsed; anything else a method needs to resume."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": CKPT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (format {CKPT_FORMAT}); use it as --teacher instead")
    return ckpt


def resume_path(out_dir, resume, name="ckpt.pt"):
    """--resume: 'auto' -> out_dir/name if it exists, '' or 'none' -> None, else a path that must exist."""
    if resume in ("", "none", None):
        return None
    path = os.path.join(out_dir, name) if resume == "auto" else resume
    if resume != "auto" and not os.path.exists(path):
        raise ValueError(f"--resume {resume}: no such checkpoint")
    return path if os.path.exists(path) else None


# ================================================================================================
# evaluation
# ================================================================================================

def seeded_noise(seeds, shape, device="cpu"):
    """Noise for a list of seeds: sample i depends only on seeds[i], whatever the batch size, device or
    number of GPUs (EDM's per-seed generation). (len(seeds), *shape) float32."""
    out = torch.empty((len(seeds), *shape))
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
    return out.to(device)


@torch.no_grad()
def generate(sample_fn, seeds, shape, batch_size, device):
    """Run sample_fn(z) -> images in [-1, 1] over per-seed noise in batches; returns a CPU tensor."""
    out = [sample_fn(seeded_noise(seeds[i:i + batch_size], shape, device)).float().cpu()
           for i in range(0, len(seeds), batch_size)]
    return torch.cat(out)


def rmse(a, b):
    """Root mean squared difference over all pixels (images in [-1, 1]): the teacher-fidelity measure."""
    return float(((a.float() - b.float()) ** 2).mean().sqrt())


def save_grid(images, path, nrow=8):
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid with 1-pixel gaps."""
    from PIL import Image
    x = to_uint8(images.cpu())
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.full((c, rows * (h + 1) + 1, ncol * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy().squeeze()).save(path)


@torch.no_grad()
def sample_to_folder(sample_fn, n, folder, shape, batch_size, device, seed0=0, rank=0, world=1):
    """Write n samples as PNGs named by seed (seed0 .. seed0+n-1) into folder; files already there are
    kept, so an interrupted run resumes. Ranks split the seeds (seeds[rank::world])."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    todo = [s for s in range(seed0 + rank, seed0 + n, world) if not os.path.exists(os.path.join(folder, f"{s:06d}.png"))]
    t0 = time.time()
    for i in range(0, len(todo), batch_size):
        seeds = todo[i:i + batch_size]
        images = to_uint8(sample_fn(seeded_noise(seeds, shape, device))).permute(0, 2, 3, 1).cpu().numpy()
        for s, im in zip(seeds, images):
            Image.fromarray(im.squeeze()).save(os.path.join(folder, f"{s:06d}.png"))
        done = i + len(seeds)
        print(f"\rsampling {done}/{len(todo)} ({done / (time.time() - t0):.1f} img/s)", end="", file=sys.stderr)
    if todo:
        print(file=sys.stderr)
    return folder


def write_pngs(images_uint8, folder):
    """Images (N, C, H, W) uint8 as numbered PNGs, e.g. real images as the FID reference of datasets without
    clean-fid statistics. Written once: into a temp folder, renamed when complete."""
    from PIL import Image
    if not os.path.isdir(folder):
        os.makedirs(folder + ".tmp", exist_ok=True)
        for i, im in enumerate(images_uint8.permute(0, 2, 3, 1).cpu().numpy()):
            Image.fromarray(im.squeeze()).save(os.path.join(folder + ".tmp", f"{i:06d}.png"))
        os.replace(folder + ".tmp", folder)
    return folder


INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class Inception:
    """The TF-ported Inception-v3 torchscript network that clean-fid uses (inception-2015-12-05.pt).
    features(x, mode): 2048-d pool features of uint8-valued float images, resized inside the network
    for 'legacy_tensorflow' (TF's bilinear resize, as the papers' FID code) or already 299x299 for
    'clean'. probs(x): the 1008-way softmax used by the Inception Score (no output bias, as the
    original IS code)."""

    def __init__(self, path=None, device="cpu"):
        path = path or os.path.join(CACHE_DIR, "inception-2015-12-05.pt")
        if not os.path.exists(path):
            try:
                download(INCEPTION_URL, path, what="Inception weights")
            except RuntimeError as e:
                raise RuntimeError(f"Inception weights unavailable: {e}; or pass --inception PATH") from None
        self.base = torch.jit.load(path, map_location=device).eval()

    def features(self, x, mode):
        if mode == "legacy_tensorflow":
            return self.base(x, return_features=True).view(len(x), -1)
        return self.base.layers.forward((x - 128) / 128).view(len(x), -1)

    def probs(self, x):
        return self.base(x, no_output_bias=True)


def _load_pngs(folder):
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def inception_score(probs, splits=10):
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))), mean and std over splits."""
    scores = []
    for p in np.array_split(np.asarray(probs, dtype=np.float64), splits):
        kl = p * (np.log(p + 1e-12) - np.log(p.mean(0, keepdims=True) + 1e-12))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def fid_is(folder, dataset, device="cpu", inception=None, ref_folder=None, modes=("legacy_tensorflow", "clean"),
           batch_size=200):
    """FID of a folder of generated PNGs through clean-fid, in each mode, and the Inception Score.
    cifar10 uses clean-fid's reference statistics of the 50k *train* images (what the papers compare
    against); any other dataset needs ref_folder (real images as PNGs). `inception` is an Inception
    (or a stand-in with the same features/probs methods). Returns {'fid', 'fid_clean', 'is', 'is_std'}."""
    from cleanfid import fid as cleanfid
    det = inception if hasattr(inception, "features") else Inception(inception, device)
    out = {}
    for mode in modes:
        kw = dict(mode=mode, custom_feat_extractor=lambda x, m=mode: det.features(x.float(), m), num_workers=0,
                  batch_size=batch_size, device=torch.device(device), verbose=False)
        try:
            if dataset == "cifar10":
                score = cleanfid.compute_fid(folder, dataset_name="cifar10", dataset_res=32, dataset_split="train", **kw)
            elif ref_folder is not None:
                score = cleanfid.compute_fid(folder, ref_folder, **kw)
            else:
                raise ValueError(f"FID for {dataset!r} needs a folder of reference images")
        except OSError as e:
            raise RuntimeError(f"clean-fid reference statistics for {dataset} unavailable ({e}); run once online") from None
        out["fid" if mode == "legacy_tensorflow" else "fid_" + mode] = float(score)
    images = _load_pngs(folder)
    probs = torch.cat([det.probs(images[i:i + batch_size].to(device).float()).cpu()
                       for i in range(0, len(images), batch_size)])
    out["is"], out["is_std"] = inception_score(probs.numpy())
    return out


# ================================================================================================
# training
# ================================================================================================

def _flag_type(field):
    t = field.type if isinstance(field.type, type) else eval(field.type)
    if t is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    return t


def parse_config(cls, argv=None, quick=None, doc=None):
    """Flags from a config dataclass: every field becomes --field-name (help from its `help` metadata),
    plus --quick, which applies the `quick` overrides before any flag given explicitly."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configuration on shapes that runs on a CPU in minutes")
    defaults = cls()
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(f), default=argparse.SUPPRESS,
                            help=f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)!r})")
    args = vars(parser.parse_args(argv))
    cfg = dataclasses.replace(defaults, **(quick or {})) if args.pop("quick") else defaults
    return dataclasses.replace(cfg, **args)


def field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return name


def autocast(device, dtype):
    """Mixed precision for network calls ('fp32', 'bf16', 'fp16'); the schedule algebra stays fp32."""
    if dtype == "fp32":
        return torch.autocast(torch.device(device).type, enabled=False)
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def write_json(path, obj):
    """Atomic JSON write."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def start_run(out_dir, cfg):
    """The run contract: out_dir receives config.json, log.jsonl, checkpoints, grids, metrics.json."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def log_row(out_dir, row, echo=True):
    """Append one JSON line to out_dir/log.jsonl (and print it)."""
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if echo:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def write_metrics(out_dir, method, dataset, teacher, reference, results):
    """metrics.json of the run contract. reference: {'sampler': str, 'steps': int}; results: a list of
    {'model': 'teacher'|'student', 'steps', 'rmse_to_reference', 'fid', 'is', ...}."""
    write_json(os.path.join(out_dir, "metrics.json"),
               {"method": method, "dataset": dataset, "teacher": teacher, "reference": reference, "results": results})


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net, parameters and buffers."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def lr_at(step, lr, warmup=0, total=0, anneal="none"):
    """Linear warm-up over `warmup` updates, then constant ('none') or linear decay to zero at `total`."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if anneal == "linear" and total:
        scale *= max(0.0, 1.0 - step / total)
    return lr * scale


WEIGHTINGS = ("snr", "trunc_snr", "snr_plus_one", "const")


def weighted_loss(x_pred, eps_pred, x, eps, alpha, sigma, weighting):
    """Per-sample loss of Salimans & Ho sec. 4 (means over pixels, shape (B,)):
    'snr' = ||eps - eps_pred||^2 (SNR-weighted x-MSE, Ho et al.'s L_simple), 'trunc_snr' =
    max(||x - x_pred||^2, ||eps - eps_pred||^2) = max(SNR, 1) x-MSE, 'snr_plus_one' = ||v - v_pred||^2 =
    (1 + SNR) x-MSE, 'const' = ||x - x_pred||^2."""
    mse = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)
    if weighting == "snr":
        return mse(eps_pred, eps)
    if weighting == "trunc_snr":
        return torch.maximum(mse(x_pred, x), mse(eps_pred, eps))
    if weighting == "snr_plus_one":
        return mse(v_from_x_eps(x_pred, eps_pred, alpha, sigma), v_from_x_eps(x, eps, alpha, sigma))
    if weighting == "const":
        return mse(x_pred, x)
    raise ValueError(f"unknown weighting {weighting!r}: expected one of {WEIGHTINGS}")


def diffusion_loss(net, schedule, param, weighting, x, generator):
    """Standard diffusion training loss (Salimans & Ho alg. 1; Ho et al. alg. 1): t ~ U[0, 1]
    (continuous) or U{0..T-1} (discrete), z_t = alpha_t x + sigma_t eps, weighted denoising error."""
    B = x.shape[0]
    if schedule.discrete:
        t = torch.randint(schedule.T, (B,), generator=generator, device=generator.device).to(x.device)
    else:
        t = torch.rand(B, generator=generator, device=generator.device).to(x.device)
    alpha, sigma = (bcast(v, x) for v in schedule.alpha_sigma(t))
    eps = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    z = alpha * x + sigma * eps
    out = net(z, schedule.net_time(t)).float()
    x_pred, eps_pred = x_eps_from_output(out, z, alpha, sigma, param)
    return weighted_loss(x_pred, eps_pred, x, eps, alpha, sigma, weighting).mean()


def dist_init(device):
    """torchrun support (nanoGPT style): returns (rank, world, device). One process per GPU; without
    torchrun, rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world, device


def wrap_ddp(net, world, device):
    if world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(net, device_ids=[device] if str(device).startswith("cuda") else None)


@dataclasses.dataclass
class TeacherConfig:
    """Standard diffusion training (Ho et al. 2020; Salimans & Ho alg. 1). Defaults: a small Ho-style
    teacher (linear beta, eps-prediction) for the built-in shapes data."""
    data: str = field("shapes", f"dataset: {DATASETS}")
    image_size: int = field(16, "image resolution")
    net: str = field("tiny", "network preset (see NET_PRESETS)")
    dropout: float = field(0.0, "dropout in the res blocks")
    schedule: str = field("linear", "linear | cosine (discrete, T=1000) | cosine_logsnr (continuous)")
    param: str = field("eps", "network output: eps | x | v | both")
    weighting: str = field("snr", "loss weighting: snr (eps-MSE) | trunc_snr | snr_plus_one (v-MSE) | const (x-MSE)")
    var: str = field("fixed_large", "variance type recorded for ancestral sampling")
    updates: int = field(1500, "parameter updates")
    batch: int = field(32, "global batch size")
    lr: float = field(5e-4, "Adam learning rate")
    warmup: int = field(100, "linear warm-up updates")
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)")
    ema: float = field(0.995, "EMA decay")
    grad_clip: float = field(1.0, "clip the global gradient norm (0 = off)")
    seed: int = field(0, "seed")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    dtype: str = field("fp32", "network precision: fp32 | bf16 | fp16")
    log_every: int = field(100, "log every N updates")
    ckpt_every: int = field(1000, "checkpoint every N updates")
    sample_steps: int = field(50, "DDIM steps for the sample grid")
    out: str = field("runs/teacher", "run directory (config.json, log.jsonl, ckpt.pt, samples.png)")
    resume: str = field("auto", "auto (continue from --out/ckpt.pt if present) | none | PATH")


def train_teacher(cfg):
    """Train a diffusion model from scratch (Alg. 1) into cfg.out/ckpt.pt, resumable, and write a sample
    grid. Returns the checkpoint path; the checkpoint loads with load_teacher."""
    out_dir, resume = cfg.out, cfg.resume
    device = pick_device(cfg.device)
    rank, world, device = dist_init(device)
    if rank == 0:
        start_run(out_dir, cfg)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.image_size, seed=cfg.seed).to(device)
    schedule = Schedule(cfg.schedule)
    out_ch = 3 * (2 if cfg.param == "both" else 1) + (3 if cfg.var == "learned_range" else 0)
    net = make_net(cfg.net, image_size=data.shape[-1], out_channels=out_ch, dropout=cfg.dropout).to(device)
    ema = make_net(cfg.net, image_size=data.shape[-1], out_channels=out_ch, dropout=cfg.dropout).to(device)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    step, elapsed = 0, 0.0
    path = os.path.join(out_dir, "ckpt.pt")
    if resume_path(out_dir, resume):
        ckpt = load_checkpoint(path)
        net.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        gen.set_state(ckpt["gen"][rank].to(gen.get_state().device) if world > 1 else ckpt["gen"][0])
        print(f"resumed {path} at update {step}")
    model = wrap_ddp(net, world, device)
    model.train()
    loss_sum, t0 = torch.zeros((), device=device), time.time()
    while step < cfg.updates:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        x = sample_batch(data, cfg.batch // world, gen)
        with autocast(device, cfg.dtype):
            loss = diffusion_loss(model, schedule, cfg.param, cfg.weighting, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, net, cfg.ema)
        step += 1
        loss_sum += loss.detach()
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.updates):
            dt = time.time() - t0
            elapsed, t0 = elapsed + dt, time.time()
            n = step % cfg.log_every or cfg.log_every
            log_row(out_dir, {"stage": "teacher", "step": step, "loss": loss_sum.item() / n,
                              "sec_per_update": dt / n, "elapsed_s": elapsed})
            loss_sum.zero_()
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.updates):
            save_checkpoint(path, net_config=net_config(net), model=net.state_dict(), ema=ema.state_dict(),
                            schedule=schedule.spec(), param=cfg.param, var=cfg.var, steps=None, method="teacher",
                            config=dataclasses.asdict(cfg), optimizer=opt.state_dict(), step=step,
                            gen=[gen.get_state()], elapsed=elapsed)
    if rank == 0:
        times = sampler_times(schedule, cfg.sample_steps)
        z = seeded_noise(range(64), data.shape[1:], device)
        save_grid(ddim_sample(ema, schedule, cfg.param, z, times, clip=True), os.path.join(out_dir, "samples.png"))
    return path


def cached_teacher(cfg=None):
    """A teacher trained once with `cfg` (default TeacherConfig()) and cached under CACHE_DIR/teachers,
    keyed by the config, so every script and test reuses the same one. Returns its checkpoint path."""
    cfg = cfg or TeacherConfig()
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume", "device", "log_every")}
    recipe["net"] = net_preset(cfg.net)
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(CACHE_DIR, "teachers", f"{cfg.data.replace(':', '_').replace('/', '_')}{cfg.image_size}_{key}.pt")
    if not os.path.exists(path):
        run_dir = path[:-3] + "_run"
        print(f"training the {cfg.data} teacher once ({cfg.updates} updates) into {run_dir}", flush=True)
        shutil.copyfile(train_teacher(dataclasses.replace(cfg, out=run_dir)), path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


if __name__ == "__main__":
    print(train_teacher(parse_config(TeacherConfig, doc="Train a diffusion teacher (Alg. 1) into --out.")))
