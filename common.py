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
# (merged from nets_wip.py)

# ================================================================================================
# teachers
# ================================================================================================

CACHE_DIR = os.environ.get("DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill-ref"))

# Public teachers whose hub files carry no schedule we can trust verbatim, with what the papers used.
KNOWN_TEACHERS = {
    "google/ddpm-cifar10-32": "Ho et al. 2020 CIFAR-10 (EMA), 35.7M, linear beta, eps, fixed_large",
    "google/ddpm-celebahq-256": "Ho et al. 2020 CelebA-HQ 256, linear beta, eps, fixed_small",
    "google/ddpm-church-256": "Ho et al. 2020 LSUN church 256, linear beta, eps, fixed_small",
    "google/ddpm-bedroom-256": "Ho et al. 2020 LSUN bedroom 256, linear beta, eps, fixed_small",
}

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
    is_dir, is_file = os.path.isdir(spec), os.path.isfile(spec)
    if not is_dir and not is_file and (spec.count("/") != 1 or spec.startswith((".", "/"))):
        raise ValueError(f"teacher {spec!r} is neither a file, a directory nor a hub id like google/ddpm-cifar10-32")
    if is_file:
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
            net = build_net(obj["net_config"])
            net.load_state_dict(obj["ema"] if obj.get("ema") is not None else obj["model"])
            info = dict(schedule=Schedule(**obj["schedule"]), param=obj["param"], var=obj.get("var", "fixed_small"),
                        steps=obj.get("steps"), source=spec)
            return net.to(device).eval().requires_grad_(False), info
        net, preset = load_original(obj, fmt=fmt, preset=preset)
        if preset not in ORIGINAL_INFO:
            raise ValueError(f"no schedule is known for preset {preset!r}: expected one of {sorted(ORIGINAL_INFO)}")
        meta = ORIGINAL_INFO[preset]
    else:
        net, sched = load_diffusers(spec, cache_dir=os.path.join(CACHE_DIR, "hub"))
        meta = _scheduler_info(sched)
        if getattr(net, "config", None) is not None and net.config.get("out_channels") == 6:
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


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    updates: int = field(4000, "parameter updates")
    batch: int = field(64, "global batch size")
    lr: float = field(2e-4, "Adam learning rate")
    warmup: int = field(200, "linear warm-up updates")
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)")
    ema: float = field(0.999, "EMA decay")
    grad_clip: float = field(1.0, "clip the global gradient norm (0 = off)")
    seed: int = field(0, "seed")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    dtype: str = field("fp32", "network precision: fp32 | bf16 | fp16")
    log_every: int = field(100, "log every N updates")
    ckpt_every: int = field(1000, "checkpoint every N updates")
    sample_steps: int = field(50, "DDIM steps for the sample grid")
    out: str = field("runs/teacher", "run directory (config.json, log.jsonl, ckpt.pt, samples.png)")
    resume: str = field("auto", "auto (continue from --out/ckpt.pt if present) | none | PATH")


def make_schedule(kind, **kw):
    """Schedule by name: the discrete ones over T=1000 timesteps, or the continuous log-SNR cosine."""
    return Schedule(kind, **kw)


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
    schedule = make_schedule(cfg.schedule)
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
