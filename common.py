"""The compact core of the distillation references: diffusion math and networks, nothing else (no file I/O, no
flags, no torch.distributed), so that a user copies this one file beside a method. Sections: math (schedules,
parameterisations, Denoiser, samplers, the losses the methods share) and nets (U-Net, DiT, the latent
teachers' VQ autoencoder and cross-attention blocks, presets). Images are NCHW float in [-1, 1] (uint8 only at
the edges); schedule algebra runs in float64, cast to float32; `t` is in the schedule's own units (integer
timesteps if discrete, [0, 1] if continuous); `schedule.net_time(t)` is the network's input. The machinery of
a run (flags, GPUs, checkpoints, data, FID) is runtime.py."""
import copy, dataclasses, math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================= math =============================================

class Schedule:
    """Variance-preserving: z_t = alpha_t x + sigma_t eps, alpha_t^2 = sigmoid(lambda_t), sigma_t^2 =
    sigmoid(-lambda_t), lambda_t the log-SNR (Kingma et al. 2021; Salimans & Ho sec. 2). 'linear' (Ho et al.),
    'scaled_linear' (the latent-diffusion teachers' "linear": betas linear in sqrt(beta)) and 'cosine' (Nichol
    & Dhariwal eq. 17, beta clipped at 0.999) are discrete, t in {0..T-1} (fractional t interpolates lambda),
    fed as t * t_scale (improved-diffusion: 1000 / T); 'cosine_logsnr' (Salimans & Ho's code) is continuous,
    t in [0, 1], lambda = -2 log tan(a t + b) clipped, fed as 'inv_cos' (~ 1000 t)."""

    def __init__(self, kind="linear", T=1000, beta_start=1e-4, beta_end=0.02, cosine_s=0.008,
                 logsnr_min=-20.0, logsnr_max=20.0, t_scale=1.0):
        if kind not in ("linear", "scaled_linear", "cosine", "cosine_logsnr"):
            raise ValueError(f"unknown schedule {kind!r}: expected linear, scaled_linear, cosine or "
                             "cosine_logsnr")
        self.kind, self.T, self.t_scale, self.discrete = kind, T, t_scale, kind != "cosine_logsnr"
        self.beta_start, self.beta_end, self.cosine_s = beta_start, beta_end, cosine_s
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        if kind == "linear":
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        elif kind == "scaled_linear":  # LDM util.py make_beta_schedule("linear") = diffusers' scaled_linear
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64).numpy() ** 2
        elif kind == "cosine":
            u = np.arange(T + 1, dtype=np.float64) / T
            f = np.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
        if self.discrete:
            self.alphas_cumprod = ac = torch.from_numpy(np.cumprod(1.0 - betas))
            self.logsnr_table = torch.log(ac) - torch.log1p(-ac)  # (T,) float64, on the host
        self._tables = {}  # device -> its copy of logsnr_table

    def spec(self):
        """JSON-serialisable arguments that rebuild this schedule: Schedule(**spec)."""
        keys = ("kind", "T", "beta_start", "beta_end", "t_scale") if "linear" in self.kind else \
               ("kind", "T", "cosine_s", "t_scale") if self.kind == "cosine" else \
               ("kind", "logsnr_min", "logsnr_max")
        return {k: getattr(self, k) for k in keys}

    def table(self, device):
        """logsnr_table on `device`, copied there once: a training step or sampler step copies nothing."""
        if device not in self._tables:
            self._tables[device] = self.logsnr_table.to(device, copy=True)
        return self._tables[device]

    def logsnr(self, t):
        """lambda_t in float64, same shape as t, on t's device."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "cosine_logsnr":
            b = math.atan(math.exp(-0.5 * self.logsnr_max))
            a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
            return -2.0 * torch.log(torch.tan(a * t + b))
        table = self.table(t.device)
        t = t.clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        w = t - lo
        return (1 - w) * table.take(lo) + w * table.take(lo + 1)  # take: table[lo] reads a 0-dim lo to the host

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
    """Reshape a per-sample value (B,) or scalar so it broadcasts against an image batch x (B,C,H,W); a Python
    number is left as it is (a kernel argument: nothing to copy to the device)."""
    if not torch.is_tensor(v):
        return v
    v = v.to(x.device, x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v

def as_time(t, device):
    """A time (or another per-step scalar) as a float64 tensor on `device`: a number is filled there
    (torch.full: a kernel argument, no host->device copy), a tensor moved (a no-op where it already is)."""
    if torch.is_tensor(t):
        return t.to(device, torch.float64)
    return torch.full((), t, dtype=torch.float64, device=device)

# Parameterisations (Salimans & Ho sec. 4, app. D). alpha, sigma broadcast against z.
def x_from_eps(z, eps, alpha, sigma): return (z - sigma * eps) / alpha
def eps_from_x(z, x, alpha, sigma): return (z - alpha * x) / sigma
def x_from_v(z, v, alpha, sigma): return alpha * z - sigma * v          # eq. 30
def eps_from_v(z, v, alpha, sigma): return sigma * z + alpha * v
def v_from_x_eps(x, eps, alpha, sigma): return alpha * eps - sigma * x  # eq. 26: v = alpha eps - sigma x

PARAMS = ("eps", "x", "v", "both", "resid")

def x_eps_from_output(out, z, alpha, sigma, param):
    """Network output -> (x_pred, eps_pred), extra (variance) channels ignored. 'both' is [x_direct, eps],
    mixed as sigma^2 x_direct + alpha^2 x(eps) (Salimans & Ho sec. 4); 'resid', x = z - out, is the read-out
    of Luhman & Luhman's official one-step student."""
    C, o = z.shape[1], out[:, :z.shape[1]]
    if param == "eps":
        return x_from_eps(z, o, alpha, sigma), o
    if param == "v":
        return x_from_v(z, o, alpha, sigma), eps_from_v(z, o, alpha, sigma)
    if param == "both":
        o = sigma ** 2 * o + alpha ** 2 * x_from_eps(z, out[:, C:2 * C], alpha, sigma)
    elif param == "resid":
        o = z - o
    elif param != "x":
        raise ValueError(f"unknown parameterisation {param!r}: expected one of {', '.join(PARAMS)}")
    return o, eps_from_x(z, o, alpha, sigma)

class Denoiser(nn.Module):
    """A network read as a denoiser (k-diffusion's wrapper): (z_t, t) -> (x_pred, eps_pred), with its
    schedule, parameterisation, ancestral variance (variance_frac) and, for a student, the sampler it was
    trained for (sampler_spec), so that sample() draws from any checkpoint without knowing its method.
    A latent model (Rombach et al.'s LDM) carries its frozen autoencoder: it denoises latents, image() decodes
    them. guidance: classifier-free guidance's scale w (guided()), None for the plain model."""

    def __init__(self, net, schedule, param, var="fixed_small", sampler=None, source="", autoencoder=None):
        super().__init__()
        self.net, self.schedule, self.param, self.var, self.sampler, self.source = \
            net, schedule, param, var, sampler, source
        self.num_classes = getattr(getattr(net, "config", None), "num_classes", 0)  # 0: unconditional
        self.autoencoder = autoencoder and autoencoder.eval().requires_grad_(False)  # shared, never trained
        self.guidance = None

    @property
    def noise_shape(self):
        """(C, H, W) of its input x_T: the images', or a latent model's latents'."""
        c = self.net.config
        return c.in_channels, c.image_size, c.image_size

    @property
    def image_shape(self):
        """(C, H, W) of the images it makes: its input's, or a latent model's decoder's."""
        c = self.net.config
        if self.autoencoder is None:
            return self.noise_shape
        a = self.autoencoder.config
        return a.out_ch, c.image_size << len(a.ch_mult) - 1, c.image_size << len(a.ch_mult) - 1

    def image(self, x):
        """Samples as images in [-1, 1]: a latent model's decoded (LDM's decode_first_stage: latents snapped to
        the codebook, then the decoder), clamped."""
        return (x if self.autoencoder is None else self.autoencoder.decode(x)).clamp(-1, 1)

    def guided(self, w):
        """This model with classifier-free guidance at scale w (a float, or (B,) per sample; Ho & Salimans
        2022): out = out_u + w (out_c - out_u), out_u at the null class (the last, e.g. cin256-v2's 1000), both
        in one batched pass (LDM's p_sample_ddim); w = 1 is the conditional model itself."""
        if not self.num_classes:
            raise ValueError(f"{self.source or 'this model'} is unconditional: a guidance scale needs a "
                             "class-conditional teacher")
        view = self.view(self.net)
        view.guidance = w
        return view

    @property
    def steps(self):
        """The network evaluations of a student's sampler (None: no sampler recorded, e.g. a teacher)."""
        return len(self.sampler["times"]) if self.sampler else None

    def sample(self, z, seeds=None, y=None):
        """Images in [-1, 1] from noise z (B, C, H, W) and labels y with the recorded sampler; seeds: the
        samples' seeds, whose streams give an ancestral sampler's noise."""
        s = self.sampler
        if s is None:
            raise ValueError(f"{self.source or 'this model'} records no sampler; sample it with ddim_sample")
        if s["ancestral"]:
            return self.image(ancestral_sample(self, z, s["times"], seeds, s["frac"], s["clip"], y))
        return self.image(ddim_sample(self, z, s["times"], s["clip"], y, last=s.get("last")))

    def full(self, z, t, clip=False, y=None):
        """(x_pred, eps_pred, v), v the learned-range channels or None; clip: x_pred clipped to [-1, 1] and
        eps re-derived (Salimans & Ho's and DDPM's samplers; a latent model's x, no image, is never clipped, as
        LDM's); y: the class labels (B,) of a conditional model (in range: checked where they enter, data or
        flags, not here in every call)."""
        if (y is None) != (self.num_classes == 0):
            raise ValueError(f"{self.source or 'this model'} is " + (
                f"class-conditional ({self.num_classes} classes): give it labels" if y is None else
                "unconditional: it takes no labels (drop --classes, or use a class-conditional teacher)"))
        t = as_time(t, z.device).expand(z.shape[0])
        alpha, sigma = (bcast(v, z) for v in self.schedule.alpha_sigma(t))
        t_net = self.schedule.net_time(t)
        if self.guidance is None:
            out = self.net(z, t_net, *(() if y is None else (y,))).float()
        else:  # [unconditional | conditional] in one pass
            null = torch.full_like(y, self.num_classes - 1)
            out_u, out_c = self.net(z.repeat(2, 1, 1, 1), t_net.repeat(2), torch.cat([null, y])).float().chunk(2)
            out = out_u + bcast(self.guidance, out_c) * (out_c - out_u)
        x, eps = x_eps_from_output(out, z, alpha, sigma, self.param)
        if clip and self.autoencoder is None:
            x = x.clamp(-1, 1)
            eps = eps_from_x(z, x, alpha, sigma)
        C = z.shape[1] * (2 if self.param == "both" else 1)
        return x, eps, out[:, C:C + z.shape[1]] if self.var == "learned_range" else None

    def forward(self, z, t, clip=False, y=None):
        return self.full(z, t, clip, y)[:2]

    def freeze(self):
        """For inference only (a teacher, an EMA copy): eval mode, no dropout, and no gradients."""
        return self.eval().requires_grad_(False)

    def view(self, net):
        """The same denoiser over `net`, a wrapper of this one's (DistributedDataParallel, torch.compile) that
        shares its parameters: no copy, and the training mode and gradients left as they are."""
        view = Denoiser(net, self.schedule, self.param, self.var, self.sampler, self.source, self.autoencoder)
        view.num_classes, view.guidance = self.num_classes, self.guidance
        return view

    def copy(self, net=None, **changes):
        """A trainable copy (a student starts as its teacher): same fields, a copy of the net (or `net`)."""
        kept = {k: getattr(self, k) for k in ("schedule", "param", "var", "sampler", "source", "autoencoder")}
        net = copy.deepcopy(self.net) if net is None else net
        den = Denoiser(net, **{**kept, **changes}).train()
        den.net.requires_grad_(True)
        return den

    def state(self):
        """The checkpoint fields that make a file loadable by load_teacher as this denoiser."""
        ae = self.autoencoder
        return dict(net_config=net_config(self.net), model=self.net.state_dict(),
                    schedule=self.schedule.spec(), param=self.param, var=self.var, sampler=self.sampler,
                    autoencoder=ae and dict(net_config=net_config(ae), model=ae.state_dict()))

    @staticmethod
    def from_state(state, source=""):
        """The Denoiser of a state() dict or checkpoint (its EMA weights if it has them), frozen."""
        net, ae = build_net(state["net_config"]), state.get("autoencoder")
        net.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        if ae is not None:
            ae, weights = build_net(ae["net_config"]), ae["model"]
            ae.load_state_dict(weights)
        return Denoiser(net, Schedule(**state["schedule"]), state["param"], state.get("var", "fixed_small"),
                        state.get("sampler"), source, ae).freeze()

def sampler_spec(times, ancestral=False, clip=False, frac=None, last=None):
    """The sampler a student was trained for, stored in its checkpoint: its times (descending, in the
    schedule's units), DDIM or ancestral (frac: variance_frac; None: the model's own), x_pred clipped or
    not, and a DDIM's last step (None: to x_pred; a time: ddim_sample's last)."""
    return dict(times=list(times), ancestral=ancestral, clip=clip, frac=frac, last=last)

def ddim_step(x_pred, eps_pred, alpha_s, sigma_s):
    """Deterministic DDIM (Song et al. 2021 eq. 12, eta = 0; Salimans & Ho eq. 8); (1, 0) gives x_pred."""
    return alpha_s * x_pred + sigma_s * eps_pred

def posterior(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s):
    """q(z_s | z_t, x), s < t (Kingma et al. 2021): (mean, var_small, var_large), mean = r (alpha_s/alpha_t)
    z_t + (1 - r) alpha_s x with r = exp(lambda_t - lambda_s), var_small = (1 - r) sigma_s^2 (beta~_t of Ho
    et al., the posterior's), var_large = (1 - r) sigma_t^2 (beta_t for adjacent steps)."""
    r = (alpha_t * sigma_s) ** 2 / (sigma_t * alpha_s) ** 2
    mean = r * (alpha_s / alpha_t) * z_t + (1 - r) * alpha_s * x_pred
    return mean, (1 - r) * sigma_s ** 2, (1 - r) * sigma_t ** 2

def variance_frac(var, v=None):
    """Where an ancestral log-variance sits from var_small (0) to var_large (1): 'fixed_small' 0,
    'fixed_large' 1 (Ho et al. sec. 3.2), 'learned_range' (v + 1)/2 (Nichol & Dhariwal eq. 15)."""
    if var in ("fixed_small", "fixed_large", "learned_range"):
        return (v + 1) / 2 if var == "learned_range" else float(var == "fixed_large")
    raise ValueError(f"unknown variance type {var!r}: expected fixed_small, fixed_large or learned_range")

def ancestral_logvar(var_small, var_large, frac):
    """frac log var_large + (1 - frac) log var_small (N&D eq. 15; Salimans & Ho app. F's gamma is frac)."""
    return frac * torch.log(var_large.clamp_min(1e-20)) + (1 - frac) * torch.log(var_small.clamp_min(1e-20))

def ancestral_step(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s, noise, frac=0.0):
    """One stochastic step z_t -> z_s: posterior mean plus exp(logvar/2) noise; no noise into the data."""
    mean, var_small, var_large = posterior(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s)
    std = torch.exp(0.5 * ancestral_logvar(var_small, var_large, frac))
    return mean + (sigma_s > 0).float() * std * noise

def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))

def step_gaussian(schedule, z_t, t, x_pred, frac):
    """p(z_{t-1} | z_t) of a discrete model: (posterior mean, log-variance frac of the way from beta~_t to
    beta_t), beta~_0 := beta~_1 (Nichol & Dhariwal's clipping); at t = 0 the decoder (mean x_pred, beta_0)."""
    t = torch.as_tensor(t, device=z_t.device).long().expand(z_t.shape[0])
    first = (t == 0).view(-1, *[1] * (z_t.dim() - 1))
    a_t, s_t = (bcast(v, z_t) for v in schedule.alpha_sigma(t))
    a_s, s_s = (bcast(v, z_t) for v in schedule.alpha_sigma((t - 1).clamp_min(0)))
    mean, var_small, var_large = posterior(z_t, x_pred, a_t, s_t, torch.where(first, 1.0, a_s),
                                           torch.where(first, 0.0, s_s))
    one, zero = (schedule.alpha_sigma(as_time(u, z_t.device)) for u in (1, 0))
    var_small_1 = posterior(0, 0, *one, *zero)[1]
    return mean, ancestral_logvar(torch.where(first, var_small_1, var_small), var_large, frac)

def discretized_gaussian_nll(x, mean, logvar):
    """-log p(x) of 8-bit data, N(mean, e^logvar) integrated over each 2/255 bin, the edge bins open (Ho et
    al. sec. 3.3, the decoder L_0)."""
    cdf = lambda v: 0.5 * (1 + torch.erf((v - mean) * torch.exp(-0.5 * logvar) / math.sqrt(2)))
    upper = torch.where(x > 0.999, 1.0, cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, 0.0, cdf(x - 1 / 255))
    return -torch.log((upper - lower).clamp_min(1e-12))

def vlb_terms(schedule, z_t, t, x, x_pred, v):
    """L_t of the variational bound in bits/dim, (B,): KL(q(z_{t-1} | z_t, x) || p(z_{t-1} | z_t)), at t = 0
    the decoder NLL (Nichol & Dhariwal eq. 4-6), p's variance from v (detach x_pred: L_hybrid)."""
    mean_q, logvar_q = step_gaussian(schedule, z_t, t, x, 0.0)
    mean_p, logvar_p = step_gaussian(schedule, z_t, t, x_pred, variance_frac("learned_range", v))
    kl = gaussian_kl(mean_q, logvar_q, mean_p, logvar_p).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x, mean_p, logvar_p).flatten(1).mean(1)
    return torch.where(torch.as_tensor(t, device=z_t.device) == 0, nll, kl) / math.log(2.0)

SKIPS = ("uniform", "quad", "trailing", "linspace", "unit")
LDM_SKIPS = ("ldm", "ldm_exact")  # the latent-diffusion teachers' DDIM grids (kept out of the methods' flags)

def ddim_timesteps(T, steps, skip="uniform"):
    """Exactly `steps` descending timesteps of a chain over a T-step model, 1 <= steps <= T: uniform (DDIM,
    diffusers' 'leading': i T // steps; ermongroup/ddim's range(0, T, T // steps) gives more times when steps
    does not divide T, e.g. 67 for 64 steps: ours are its first `steps`), quad (ermongroup, Luhman & Luhman;
    from 0.8 T), trailing (from T - 1), linspace. A 1-step chain starts at the noise end, T - 1, whatever the
    kind (the others would put its one step at t = 0 or 0.8 T, LDM's at t = 1). The LDM grids are offset by
    one: 'ldm' is CompVis' make_ddim_timesteps('uniform'), range(0, T, T // steps) + 1, all of it, so NOT
    `steps` times when steps does not divide T (16, 32, 64 give 17, 33, 67; `steps` is then the count asked
    for, as in LDM); 'ldm_exact' is DSD's patch of it, i (T // steps) + 1 for i < steps (64 steps from
    t = 946). A grid that reaches t = T (LDM indexes past its table there, e.g. 'ldm' with 9 steps) is a
    ValueError."""
    if skip not in SKIPS[:4] + LDM_SKIPS:
        raise ValueError(f"unknown skip {skip!r}: expected one of {', '.join(SKIPS[:4] + LDM_SKIPS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"{steps} steps over a {T}-step model: expected 1 to {T}")
    i = np.arange(steps)
    if steps == 1:
        seq = np.array([T - 1])
    elif skip in LDM_SKIPS:  # LDM ldm/modules/diffusionmodules/util.py make_ddim_timesteps; DSD's copy of it
        seq = (np.arange(0, T, T // steps) if skip == "ldm" else i * (T // steps)) + 1
        if seq[-1] > T - 1:
            raise ValueError(f"the {skip} grid of {steps} steps over a {T}-step model reaches t = {seq[-1]}, "
                             f"past the model's last timestep {T - 1}: choose another step count")
    elif skip == "uniform":
        seq = i * (T // steps)
    elif skip == "quad":
        seq = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
    elif skip == "trailing":
        seq = (np.round(T - i * T / steps) - 1).astype(np.int64)[::-1]
    else:
        seq = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
    return [int(t) for t in seq[::-1]]

def sampler_times(schedule, steps, skip="uniform"):
    """A `steps`-step sampler's times, descending; 'unit' is Salimans & Ho's t_i = i/N, i = N..1 (from 1/N
    to the data), mapped by schedule.time."""
    if schedule.discrete and skip != "unit":
        return ddim_timesteps(schedule.T, steps, skip)
    return [schedule.time(i / steps) for i in range(steps, 0, -1)]

def check_steps(schedule, skip, **counts):
    """Before any work: step counts (flag=count) that a discrete grid of this schedule cannot hold (> T)."""
    for flag, n in counts.items():
        if schedule.discrete and skip != "unit" and n > schedule.T:
            raise ValueError(f"--{flag.replace('_', '-')} {n}: the model has T = {schedule.T} timesteps, so "
                             f"a {skip} grid holds at most {schedule.T} steps")
        if schedule.discrete and skip in LDM_SKIPS:
            try:
                ddim_timesteps(schedule.T, n, skip)
            except ValueError as e:
                raise ValueError(f"--{flag.replace('_', '-')} {n}: {e}") from None

class SeededGenerators:
    """Per-sample random streams on the device (NVlabs/edm's StackedRandomGenerator): a generator per seed,
    seeded once, the samples' draws stacked, so that sample i's noise depends on seeds[i] alone, whatever the
    batch size or GPU count, on one device type (CPU and CUDA generators draw different numbers from one
    seed). stream k > 0 is each seed's k-th independent stream (stream 0: the seed itself)."""

    def __init__(self, seeds, device="cpu", stream=0):
        self.generators = [torch.Generator(device).manual_seed(
            int(np.random.SeedSequence([int(s), stream]).generate_state(1)[0]) if stream else int(s))
            for s in seeds]

    def randn(self, shape):
        """(len(seeds), *shape) float32 N(0, I), sample i the next draw of its own generator."""
        return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in self.generators])

def seeded_noise(seeds, shape, device="cpu", stream=0):
    """(len(seeds), *shape) float32 noise drawn on the device, sample i from (seeds[i], stream) alone
    (SeededGenerators' first draw)."""
    return SeededGenerators(seeds, device, stream).randn(shape)

def seeded_labels(seeds, num_classes, device="cpu", classes=None):
    """Class labels (len(seeds),) for a conditional model, sample i's from seeds[i] alone (like its noise):
    uniform over num_classes, or classes[seed % len(classes)] when given; None for num_classes 0."""
    if not num_classes:
        return None
    y = [classes[int(s) % len(classes)] if classes else
         int(np.random.default_rng([int(s), 0x1ABE1]).integers(num_classes)) for s in seeds]
    return torch.tensor(y, dtype=torch.long, device=device)

@torch.no_grad()
def ddim_sample(den, z, times, clip=False, y=None, eta=0.0, seeds=None, last=None):
    """DDIM from z at times[0] through times[1:], then x_pred (as ermongroup/ddim and Salimans & Ho), or with
    `last` one more step, to that time (LDM's sampler ends at alpha-bar_0: last=0); repeated times (the quad
    sequence has some) are identity steps. y: class labels (B,) of a conditional model. eta > 0: Song et al.
    eq. 16's noise, sigma_s(eta)^2 = eta^2 (sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2) (eta = 1: the
    posterior's), in step k sample i's the k-th draw of seeds[i]'s stream 1 (as ancestral_sample)."""
    ends = list(times[1:]) + ([] if last is None else [last])
    noise = SeededGenerators(seeds, z.device, stream=1) if eta else None
    for k, t in enumerate(times):
        x_pred, eps_pred = den(z, t, clip, y)
        if k == len(ends):
            return x_pred
        (a_t, s_t), (a_s, s_s) = (den.schedule.alpha_sigma(as_time(u, z.device)) for u in (t, ends[k]))
        if not eta:
            z = ddim_step(x_pred, eps_pred, a_s, s_s)
            continue
        c = eta * ((s_s / s_t) ** 2 * (1 - (a_t / a_s) ** 2)).clamp_min(0).sqrt()
        z = ddim_step(x_pred, eps_pred, a_s, (s_s ** 2 - c ** 2).sqrt()) + c * noise.randn(z.shape[1:])
    return z

@torch.no_grad()
def ancestral_sample(den, z, times, seeds, frac=None, clip=False, y=None):
    """Ancestral sampling (Ho et al. alg. 2, respaced) with frac (variance_frac; None: the denoiser's own).
    Step k's noise of sample i is the k-th draw of seeds[i]'s stream 1 (its x_T is stream 0's), on z's
    device: samples do not depend on the batch they ran in."""
    noise = SeededGenerators(seeds, z.device, stream=1)
    for k, t in enumerate(times):
        x_pred, _, v = den.full(z, t, clip, y)
        if k + 1 == len(times):
            return x_pred
        (a_t, s_t), (a_s, s_s) = (den.schedule.alpha_sigma(as_time(u, z.device)) for u in times[k:k + 2])
        f = variance_frac(den.var, v) if frac is None else frac
        z = ancestral_step(z, x_pred, a_t, s_t, a_s, s_s, noise.randn(z.shape[1:]), f)

@torch.no_grad()
def dpm_solver_2m(den, z, times, clip=False, y=None):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2): the probability-flow ODE in lambda = log(alpha / sigma),
    data prediction, second order by reusing the previous step's x_pred: z_s = (sigma_s/sigma_t) z_t -
    alpha_s (e^-h - 1) D, h = lambda_s - lambda_t, D = (1 + 1/2r) x_t - (1/2r) x_prev, r = h_prev / h; the
    first step (D = x_t) is DDIM's. Over times as ddim_sample, ending with x_pred: the same network calls;
    a repeated time (h = 0, as the quad sequence's) is an identity step, as DDIM's, and r spans it."""
    x_prev = h_prev = None
    for i, t in enumerate(times):
        x_pred, _ = den(z, t, clip, y)
        if i + 1 == len(times):
            return x_pred
        if times[i + 1] == t:  # a repeated time (h = 0): an identity step, read on the host (a list)
            continue
        t, s = as_time(t, z.device), as_time(times[i + 1], z.device)
        h = 0.5 * den.schedule.logsnr(s) - 0.5 * den.schedule.logsnr(t)  # float64, on the device
        sigma_t, (alpha_s, sigma_s) = den.schedule.alpha_sigma(t)[1], den.schedule.alpha_sigma(s)
        d = x_pred if x_prev is None else (1 + h / (2 * h_prev)) * x_pred - h / (2 * h_prev) * x_prev
        z = sigma_s / sigma_t * z - alpha_s * torch.expm1(-h) * d
        x_prev, h_prev = x_pred, h

# ---- shared by the methods' losses and loops -----------------------------------------------------

WEIGHTINGS = ("snr", "trunc_snr", "snr_plus_one", "const")

def weighted_loss(x_pred, eps_pred, x, eps, alpha, sigma, weighting):
    """Per-sample loss (B,) of Salimans & Ho sec. 4: 'snr' eps-MSE = SNR x-MSE (Ho et al.'s L_simple),
    'trunc_snr' max(x-MSE, eps-MSE) = max(SNR, 1) x-MSE, 'snr_plus_one' v-MSE = (1 + SNR) x-MSE, 'const'."""
    mse = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: expected one of {WEIGHTINGS}")
    if weighting == "snr_plus_one":
        return mse(v_from_x_eps(x_pred, eps_pred, alpha, sigma), v_from_x_eps(x, eps, alpha, sigma))
    x_mse, eps_mse = mse(x_pred, x), mse(eps_pred, eps)
    return {"snr": eps_mse, "trunc_snr": torch.maximum(x_mse, eps_mse), "const": x_mse}[weighting]

@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net, parameters in one foreach call; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)

def lr_at(step, lr, warmup=0, total=0, anneal="none"):
    """Linear warm-up over `warmup` updates, then constant ('none') or linear decay to zero at `total`."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if anneal == "linear" and total:
        scale *= max(0.0, 1.0 - step / total)
    return lr * scale

def autocast(device, dtype):
    """Mixed precision for network calls ('fp32', 'bf16', 'fp16'); the schedule algebra stays fp32."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None)

def rmse(a, b):
    """Root mean squared difference over all pixels (images in [-1, 1]): the teacher-fidelity measure."""
    return float(((a.float() - b.float()) ** 2).mean().sqrt())

def to_float(images_uint8): return images_uint8.float() / 127.5 - 1.0                    # [0, 255] -> [-1, 1]

def to_uint8(images): return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # rounded, clipped

# ============================================= nets =============================================
# Both networks take (x, t): x is (B, C, H, W); t a float tensor (B,) or a scalar, in the units of the model's
# own training code (Ho et al., DDPM-IP: 0..T-1; improved-diffusion: t * 1000 / T). Fractional t is fine.

def timestep_embedding(t, x, dim, order="cos_sin"):
    """Sinusoidal fp32 embedding (B, dim) of t (scalar or (B,)) for batch x: 'cos_sin' (ADM, DiT) [cos, sin],
    10000^(-k/half); 'sin_cos' (Ho et al.; diffusers' flip_sin_to_cos=False) [sin, cos], 10000^(-k/(h-1))."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(len(x))
    half = dim // 2
    divisor = half if order == "cos_sin" else half - 1
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / divisor)
    args = t[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if order == "cos_sin" else [args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))

def add_class(emb, table, y):
    """emb + table(y): a class's learned embedding added to the time embedding (ADM's label_emb = diffusers'
    class_embedding; Salimans & Ho's one-hot Dense with bias is the same table with the bias in every row)."""
    if (table is None) != (y is None):
        raise ValueError("a class-conditional network needs labels" if y is None else
                         "an unconditional network takes no labels")
    return emb if y is None else emb + table(y)

def _attend(qkv, heads):
    """Softmax attention, (B, T, 3C) laid out [q | k | v], each split into heads -> (B, T, C)."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C3 // 3)

# ---- U-Net -----------------------------------------------------------------------------------

@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3            # 6 for ADM's learned variance: [eps, v]
    ch: int = 128                    # base channels; the time MLP is ch -> emb_dim -> emb_dim
    emb_dim: int = 0                 # the time (and class) embedding's width; 0: 4 ch (Ho, ADM)
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
    num_classes: int = 0             # > 0: class-conditional, a learned embedding per class (ADM's label_emb)
    context_dim: int = 0             # > 0: LDM's use_spatial_transformer: every attention block is a
                                     # SpatialTransformer attending to the class context, ClassEmbedder(
                                     # num_classes, context_dim)(y), which replaces label_emb (cin256-v2)
    transformer_depth: int = 1       # transformer blocks per SpatialTransformer

class ResBlock(nn.Module):
    """GN, SiLU, [resample both paths: avg-pool / nearest, BigGAN/ADM], conv, + time (or scale-shift), GN,
    SiLU, dropout, conv; plus the skip (a 1x1 conv where the channel count changes)."""

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
            h, x = (F.interpolate(v, scale_factor=2.0, mode="nearest") for v in (h, x))
        h = self.conv1(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))

class Attention(nn.Module):
    """Self-attention over the H*W positions with a residual: x + proj(attn(GN(x))). Takes (and ignores) a
    context, like a SpatialTransformer."""

    def __init__(self, channels, heads, cfg):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # rows [q | k | v], each split into heads
        self.proj = nn.Linear(channels, channels)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.proj(_attend(self.qkv(self.norm(x).flatten(2).transpose(1, 2)), self.heads))
        return x + h.transpose(1, 2).reshape(B, C, H, W)

class Resample(nn.Module):
    """A 3x3 conv: 'down' with stride 2, padded 'asym' (right/bottom by one, Ho et al.) or 'sym' (1 all round,
    ADM); 'up' after nearest x2. Takes (and ignores) emb, like a resampling ResBlock."""

    def __init__(self, channels, mode, pad="sym"):
        super().__init__()
        self.up, self.asym = mode == "up", mode == "down" and pad == "asym"
        self.conv = nn.Conv2d(channels, channels, 3, 1 if self.up else 2, padding=0 if self.asym else 1)

    def forward(self, x, emb=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asym else x)

class Level(nn.Module):  # one resolution of the U-Net: res blocks, attention after each or None, resampler
    def __init__(self, res, attn, resample):
        super().__init__()
        self.res, self.attn = nn.ModuleList(res), nn.ModuleList(attn) if attn else None
        self.resample = resample

class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020) with the ADM options (Dhariwal & Nichol 2021): skips after the stem, each
    down res block (+attention) and downsampler, one per up res block. zero_init: ADM's zeroed outputs. With
    cfg.context_dim, LDM's openaimodel.py UNetModel(use_spatial_transformer=True): SpatialTransformers in
    place of the attention blocks, the class embedding their context (Rombach et al. sec. 3.3)."""

    def __init__(self, cfg: UNetConfig, zero_init=False):
        super().__init__()
        if cfg.context_dim and not cfg.num_classes:
            raise ValueError("a UNetConfig with context_dim > 0 needs num_classes: its context is the class's")
        self.config = cfg
        ch, L, R, emb_dim = cfg.ch, len(cfg.ch_mult), cfg.num_res_blocks, cfg.emb_dim or 4 * cfg.ch
        heads = lambda c: c // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
        # openaimodel.py, legacy=True: a SpatialTransformer's dim_head is ch // heads (num_heads 1: one head of
        # all ch channels, cin256-v2's)
        block = lambda c: Attention(c, heads(c), cfg) if not cfg.context_dim else \
            SpatialTransformer(c, heads(c), c // heads(c), cfg.context_dim, cfg.transformer_depth)
        attention = lambda level, c, n: [block(c) for _ in range(n)] \
            if cfg.image_size >> level in cfg.attn_resolutions else None
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes and not cfg.context_dim \
            else None
        # LDM cin256-v2: cond_stage_model, the labels' context (B, 1, context_dim); nothing added to emb
        self.class_context = ClassEmbedder(cfg.num_classes, cfg.context_dim) if cfg.context_dim else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        skips, c, self.down = [ch], ch, nn.ModuleList()  # skips: the channels of the skip stack
        for i, mult in enumerate(cfg.ch_mult):
            res = [ResBlock(c if j == 0 else ch * mult, ch * mult, emb_dim, cfg) for j in range(R)]
            c, resample = ch * mult, None
            skips += [c] * R
            if i < L - 1:
                resample = ResBlock(c, c, emb_dim, cfg, "down") if cfg.resblock_updown else \
                    Resample(c, "down", cfg.down_pad)
                skips.append(c)
            self.down.append(Level(res, attention(i, c, R), resample))
        self.mid_res1 = ResBlock(c, c, emb_dim, cfg)
        self.mid_attn = block(c)
        self.mid_res2 = ResBlock(c, c, emb_dim, cfg)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            res = [ResBlock((c if j == 0 else ch * mult) + skips.pop(), ch * mult, emb_dim, cfg)
                   for j in range(R + 1)]
            c, resample = ch * mult, None
            if i > 0:
                resample = ResBlock(c, c, emb_dim, cfg, "up") if cfg.resblock_updown else Resample(c, "up")
            self.up.append(Level(res, attention(i, c, R + 1), resample))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        if zero_init:
            last = [m.conv2 if isinstance(m, ResBlock) else m.proj for m in self.modules()
                    if isinstance(m, (ResBlock, Attention))]
            for layer in last + [self.conv_out]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x, t, y=None):
        cfg = self.config
        emb = self.time_mlp(timestep_embedding(t, x, cfg.ch, cfg.time_emb).to(x.dtype))
        context = None
        if self.class_context is None:
            emb = add_class(emb, self.label_emb, y)
        elif y is None:
            raise ValueError("a class-conditional network needs labels")
        else:
            context = self.class_context(y)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = block(h, emb)
                h = level.attn[j](h, context) if level.attn else h
                hs.append(h)
            if level.resample:
                h = level.resample(h, emb)
                hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context), emb)
        for level in self.up:
            for j, block in enumerate(level.res):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
                h = level.attn[j](h, context) if level.attn else h
            h = level.resample(h, emb) if level.resample else h
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
    num_classes: int = 0    # > 0: class-conditional, a class embedding added to the time's (DiT's y_embedder)

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
        p, D, grid = cfg.patch_size, cfg.hidden, cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        # fixed 2D sin-cos positions (grid*grid, D): half the channels the row, half the column
        omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
        pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]
        emb1d = torch.cat([pos.sin(), pos.cos()], dim=1)[:, None, :].expand(grid, grid, -1)
        pos2d = torch.cat([emb1d, emb1d.transpose(0, 1)], dim=2).reshape(grid * grid, D).float()
        self.register_buffer("pos", pos2d, persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.label_emb = nn.Embedding(cfg.num_classes, D) if cfg.num_classes else None
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
        for lin in (self.time_mlp[0], self.time_mlp[2]) + ((self.label_emb,) if cfg.num_classes else ()):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[1] for b in self.blocks] + [self.ada_out[1], self.out]:  # adaLN-Zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, y=None):
        B, _, H, W = x.shape
        p, C = self.config.patch_size, self.config.out_channels
        c = add_class(self.time_mlp(timestep_embedding(t, x, 256, "cos_sin").to(x.dtype)), self.label_emb, y)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=2)
        h = self.out(_modulate(self.norm_out(h), shift, scale)).view(B, H // p, W // p, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(B, C, H, W)

# ---- VQ autoencoder: the first stage of the latent-diffusion (LDM-VQ) teachers ---------------------
# Rombach et al. 2022 sec. 3.1 / app. G; the taming/LDM code (ldm/modules/diffusionmodules/model.py Encoder,
# Decoder; ldm/models/autoencoder.py VQModelInterface; taming VectorQuantizer2). Module names follow it, so
# an LDM model.ckpt's first_stage_model.* tensors load with the prefix stripped. GroupNorm(32, eps 1e-6).

@dataclass
class VQConfig:  # LDM's ddconfig field names plus the quantizer's; the defaults are the f4 model's
    resolution: int = 256            # image size; decides only where attn_resolutions apply
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4)       # downsampling factor 2^(len - 1): 4
    num_res_blocks: int = 2          # per level in the encoder, num_res_blocks + 1 in the decoder
    attn_resolutions: tuple = ()     # resolutions (pixels) with attention after every res block
    z_channels: int = 3              # the encoder's output channels
    embed_dim: int = 3               # the latent (= codebook vector) channels, after quant_conv
    n_embed: int = 8192              # codebook size

class VQResBlock(nn.Module):
    """model.py ResnetBlock without time embedding: GN, swish, conv, GN, swish, conv, + skip (a 1x1 conv
    'nin_shortcut' where the width changes). Dropout is 0 in every LDM first stage, so none here."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))

class VQAttention(nn.Module):
    """model.py AttnBlock: one-head self-attention over the H*W positions, q, k, v and proj_out 1x1 convs."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)

class VQLevel(nn.Module):
    """One resolution: n res blocks (attention after each where `attn`), then 'downsample' (pad right/bottom,
    stride-2 3x3 conv) or 'upsample' (nearest x2, 3x3 conv), the names of the LDM tensors."""

    def __init__(self, c_in, c_out, n, attn, resample=None):
        super().__init__()
        self.block = nn.ModuleList(VQResBlock(c_in if j == 0 else c_out, c_out) for j in range(n))
        self.attn = nn.ModuleList(VQAttention(c_out) for _ in range(n if attn else 0))
        if resample == "down":
            self.downsample = Resample(c_out, "down", "asym")
        elif resample == "up":
            self.upsample = Resample(c_out, "up")

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            h = self.attn[j](h) if self.attn else h
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return resample(h) if resample else h

class VQMid(nn.Module):  # the middle of both halves: res block, attention, res block (always, LDM model.py)
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = VQResBlock(c, c), VQAttention(c), VQResBlock(c, c)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))

class VQEncoder(nn.Module):
    """conv_in, levels at ch * ch_mult (downsampling after all but the last), mid, GN, swish, conv_out."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths, L = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            VQLevel(([cfg.ch] + widths)[i], widths[i], cfg.num_res_blocks,
                    cfg.resolution >> i in cfg.attn_resolutions, "down" if i < L - 1 else None)
            for i in range(L))
        self.mid = VQMid(widths[-1])
        self.norm_out = nn.GroupNorm(32, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

class VQDecoder(nn.Module):
    """conv_in to the widest level, mid, levels from the lowest resolution up (up[i] is the resolution of
    the encoder's down[i], as in LDM; upsampling after all but up[0]), GN, swish, conv_out."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths, L = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = VQMid(widths[-1])
        self.up = nn.ModuleList(
            VQLevel((widths + [widths[-1]])[i + 1], widths[i], cfg.num_res_blocks + 1,
                    cfg.resolution >> i in cfg.attn_resolutions, "up" if i > 0 else None)
            for i in range(L))
        self.norm_out = nn.GroupNorm(32, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

class VectorQuantizer(nn.Module):
    """taming VectorQuantizer2's lookup: each latent vector (over channels) -> its nearest codebook entry in
    Euclidean distance, with the straight-through gradient (the commitment loss is training's, not here)."""

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z):
        B, C, H, W = z.shape
        flat, codes = z.permute(0, 2, 3, 1).reshape(-1, C), self.embedding.weight
        distance = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        z_q = self.embedding(distance.argmin(1)).view(B, H, W, C).permute(0, 3, 1, 2)
        return z + (z_q - z).detach()

class VQModel(nn.Module):
    """The VQ-regularised autoencoder (LDM VQModelInterface). encode(x): images in [-1, 1] -> the latent the
    diffusion model works on, before quantization; decode(h): quantize (decode_first_stage does;
    quantize=False is diffusers' force_not_quantize), post_quant_conv, decoder -> images, unclipped. No scale
    factor: the LDM-VQ teachers use their latents as they are (scale_factor 1.0)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = VQEncoder(cfg), VQDecoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, quantize=True):
        return self.decoder(self.post_quant_conv(self.quantize(h) if quantize else h))

# ---- cross-attention conditioning of LDM cin256-v2 (ldm/modules/attention.py, encoders/modules.py) --------
# Rombach et al. 2022 sec. 3.3: the class embedding enters every SpatialTransformer as the keys and values of
# its cross-attention. Standalone blocks, LDM's tensor names; GroupNorm(32, eps 1e-6), LayerNorm eps 1e-5.

def _split_heads(x, heads):  # (B, N, heads * d) -> (B, heads, N, d)
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, dim) to a context (B, M, context_dim); the context is x itself when
    None (self-attention). to_q/k/v without bias, to_out a Linear; scale dim_head^-1/2."""

    def __init__(self, dim, heads, dim_head, context_dim=None):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # LDM's to_out.0 (its to_out.1 is a dropout)

    def forward(self, x, context=None):
        context = x if context is None else context
        q = _split_heads(self.to_q(x), self.heads)
        k, v = (_split_heads(f(context), self.heads) for f in (self.to_k, self.to_v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

class GEGLU(nn.Module):  # Shazeer 2020: a * gelu(gate), [a | gate] = proj(x)
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)

class FeedForward(nn.Module):  # LDM FeedForward(glu=True): GEGLU to 4 dim, Linear back (net.1 is a dropout)
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)

class TransformerBlock(nn.Module):
    """LDM BasicTransformerBlock: pre-LN self-attention (attn1), cross-attention to the context (attn2) and
    the feed-forward (ff), each with a residual."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer: GN(32, eps 1e-6), 1x1 conv to heads * dim_head, `depth` transformer blocks
    over the H*W positions attending to the context (B, M, context_dim), 1x1 conv back (zero-initialised:
    the block starts as the identity), + x."""

    def __init__(self, channels, heads, dim_head, context_dim, depth=1):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, -1, H, W))

class ClassEmbedder(nn.Module):
    """LDM ClassEmbedder: class labels (B,) -> a one-token context (B, 1, embed_dim). cin256-v2 has 1001
    classes, 1000 the null class of classifier-free guidance."""

    def __init__(self, n_classes, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, y):
        return self.embedding(y[:, None])

# ---- presets, build_net / net_config ---------------------------------------------------------

_ADM = dict(scale_shift=True, time_emb="cos_sin", norm_eps=1e-5)
PRESETS = {
    # Ho et al. CIFAR-10 (= diffusers google/ddpm-cifar10-32, pesser/ermongroup ports): 35,746,307 params
    "ddpm_cifar10": UNetConfig(dropout=0.1),
    # DDIM CelebA 64x64 (ermongroup/ddim, Luhman & Luhman's CelebA teacher): 78,700,803 params
    "ddim_celeba64": UNetConfig(image_size=64, ch_mult=(1, 2, 2, 2, 4), dropout=0.1),
    # Ho et al. 256 px (diffusers google/ddpm-{cat,church,bedroom,celebahq}-256): 113,673,219 params
    "ddpm_256": UNetConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4)),
    # DDPM-IP ADM baseline = DKDM CIFAR-10 / ImageNet-32 teacher (57M-CNN.yaml): 57,094,662 params
    "adm_cifar10_57m": UNetConfig(out_channels=6, num_res_blocks=3, attn_resolutions=(16, 8),
                                  num_head_channels=32, dropout=0.3, resblock_updown=True, qkv_layout="new",
                                  **_ADM),
    # DDPM-IP CelebA 64 teacher of DKDM (295M-CNN.yaml)
    "adm_celeba64_295m": UNetConfig(image_size=64, out_channels=6, ch=192, ch_mult=(1, 2, 3, 4),
                                    num_res_blocks=3, attn_resolutions=(32, 16, 8), num_head_channels=64,
                                    dropout=0.1, resblock_updown=True, qkv_layout="new", **_ADM),
    # improved-diffusion cifar10_uncond_50M_500K (t fed as t*1000/4000): 52,546,438 params
    "iddpm_cifar10": UNetConfig(out_channels=6, num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4,
                                dropout=0.3, down_pad="sym", qkv_layout="legacy", **_ADM),
    # Salimans & Ho progressive distillation CIFAR-10 base model
    "pd_cifar10": UNetConfig(ch=256, ch_mult=(1, 1, 1), num_res_blocks=3, attn_resolutions=(16, 8),
                             dropout=0.2, resblock_updown=True, **_ADM),
    # Salimans & Ho's ImageNet 64 base model (app. E: ADM's 64x64 model exactly; the official imagenet64_base
    # config): 192 channels, emb 768, 3 res blocks, attention at 32, 16, 8 with 64-channel heads, dropout 0.1,
    # res-block resampling; class-conditional (--class-cond, 1000 classes from the data)
    "pd_imagenet64": UNetConfig(image_size=64, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                                attn_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                                resblock_updown=True, **_ADM),
    # Salimans & Ho's LSUN 128 base model (app. E; the official bedroom128_base config): 64 channels at 128,
    # mult [1, 2, 4, 6, 8], emb 768, otherwise as ImageNet 64
    "pd_lsun128": UNetConfig(image_size=128, ch=64, emb_dim=768, ch_mult=(1, 2, 4, 6, 8), num_res_blocks=3,
                             attn_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                             resblock_updown=True, **_ADM),
    # guided-diffusion 64x64_diffusion.pt (Dhariwal & Nichol), class-conditional ImageNet 64: 295,904,454 params
    "adm_imagenet64": UNetConfig(image_size=64, out_channels=6, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                                 attn_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                                 resblock_updown=True, qkv_layout="new", num_classes=1000, **_ADM),
    # improved-diffusion imagenet64_cond_270M_250K.pt (Nichol & Dhariwal; t fed as t * 1000/4000): 273,049,350
    "iddpm_imagenet64": UNetConfig(image_size=64, out_channels=6, ch=192, ch_mult=(1, 2, 3, 4),
                                   num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4, down_pad="sym",
                                   qkv_layout="legacy", num_classes=1000, **_ADM),
    # CPU tests: the shared eps shapes teacher (828k params)
    "tiny": UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                       num_heads=2, resblock_updown=True, norm_groups=8, **_ADM),
    # LDM-VQ-4 CelebA-HQ / FFHQ / LSUN-bedrooms (one U-Net; models/ldm/*/config.yaml, openaimodel.py defaults):
    # 3x64x64 latents, attention at ds 2, 4, 8 = 32, 16, 8 latent pixels, 32-channel heads, legacy
    # qkv order, conv resampling padded 1: 274,056,163 params (DSD table 3: 274.06M)
    "ldm_vq4_unet": UNetConfig(image_size=64, ch=224, ch_mult=(1, 2, 3, 4), num_res_blocks=2,
                               attn_resolutions=(32, 16, 8), num_head_channels=32, down_pad="sym",
                               qkv_layout="legacy", time_emb="cos_sin", norm_eps=1e-5),
    # LDM cin256-v2 (configs/latent-diffusion/cin256-v2.yaml): one-head SpatialTransformers (depth 1) attending
    # to ClassEmbedder(1001, 512) of the label, 1000 the null class: 401,433,091 params, 400,920,579 without
    # the class embedder (DSD table 3: 400.92M, the U-Net alone)
    "ldm_cin256_v2": UNetConfig(image_size=64, ch=192, ch_mult=(1, 2, 3, 5), num_res_blocks=2,
                                attn_resolutions=(32, 16, 8), num_heads=1, down_pad="sym", qkv_layout="legacy",
                                time_emb="cos_sin", norm_eps=1e-5, num_classes=1001, context_dim=512),
    "dit_s2": DiTConfig(hidden=384, depth=12, num_heads=6, patch_size=2),   # DiT-S/2 (Peebles & Xie 2023)
    "dit_b2": DiTConfig(hidden=768, depth=12, num_heads=12, patch_size=2),  # DiT-B/2
    "dit_tiny": DiTConfig(image_size=16, hidden=64, depth=2, num_heads=2, patch_size=2),  # CPU tests
}
# CPU tests: 'tiny' at 16 channels (209k params, 1.8x faster per update on a CPU core), the base model of
# progressive.py --quick and DKDM's --quick student
PRESETS["tiny16"] = dataclasses.replace(PRESETS["tiny"], ch=16)
# CPU tests: the LDM-VQ-4 U-Net shrunk to 16x16 latents and widths 32..128 (attention at 8, 4, 2), and a
# cin256-v2-style cross-attention U-Net (1001 classes, context 64)
PRESETS["ldm_tiny"] = dataclasses.replace(PRESETS["ldm_vq4_unet"], image_size=16, ch=32,
                                          attn_resolutions=(8, 4, 2))
PRESETS["ldm_cin_tiny"] = dataclasses.replace(PRESETS["ldm_cin256_v2"], image_size=16, ch=32, ch_mult=(1, 2),
                                              num_res_blocks=1, attn_resolutions=(8,), context_dim=64)
# autoencoders (kept apart from PRESETS, the denoisers' flag choices): build_net(AUTOENCODERS[name])
AUTOENCODERS = {
    "vq_f4": VQConfig(),  # LDM-VQ-4 first stage (CelebA-HQ, FFHQ, LSUN-bedroom, cin256-v2; = vq-f4.zip)
    "vq_tiny": VQConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                        n_embed=64),  # CPU tests
}

def build_net(cfg, zero_init=True, **overrides):
    """A network from a preset name, a config dataclass or a net_config() dict, with `overrides` of its fields
    (None, or a field the architecture lacks, e.g. the DiT's dropout, is ignored); zero_init: see UNet."""
    if isinstance(cfg, str) and cfg not in PRESETS:
        raise ValueError(f"unknown network preset {cfg!r}: expected one of {', '.join(PRESETS)}")
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    if isinstance(cfg, dict):
        try:
            cls = {"unet": UNetConfig, "dit": DiTConfig, "vq": VQConfig}[cfg.get("arch")]
            cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "arch"})
        except (KeyError, TypeError) as e:
            raise ValueError(f"network config {cfg} is no UNetConfig, DiTConfig or VQConfig ({e})") from None
    names = {f.name for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k in names})
    return UNet(cfg, zero_init=zero_init) if isinstance(cfg, UNetConfig) else \
        DiT(cfg) if isinstance(cfg, DiTConfig) else VQModel(cfg)

def net_config(net) -> dict:
    """JSON-serialisable dict that rebuilds `net` with build_net (stored in checkpoints)."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(net.config).items()}
    return {"arch": "unet" if isinstance(net, UNet) else "dit" if isinstance(net, DiT) else "vq", **cfg}

