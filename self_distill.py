"""Self-Distillation for Diffusion: direct self-distillation (DSD).
Anonymous ICLR submission "Self-Distillation for Diffusion"; official code Pmobilee/DSD.

A pretrained model samples its own DDIM trajectories; for every two steps t -> t-1 -> t-2 it learns to do in
one what it does in two: w(lambda_t) ||x' - x''||^2, x' its x prediction at z_t, x'' the x whose single DDIM
step lands where its two steps land (alg. 2). N follows a schedule (sec. 4.1.1, app. J: DSDN, DSDI, DSDGL,
DSDGEXP); TSD is DSDI with a frozen teacher. Training DSD (sec. 4.2, eq. 1) adds the term to v-training.
    python self_distill.py --variant dsdi --fid-samples 30000 --out runs/dsd_dsdi   # table 2, per variant
    python self_distill.py --variant train --out runs/dsd_train                     # fig. 3
    python self_distill.py --quick                                                  # CPU
The paper fine-tunes latent models (a converted LDM teacher: README, Latent teachers; class-conditional ones
with --guidance); pixel models work alike. We follow the paper where its official code differs
(docs/self_distill.md lists each case), with a flag for the code's choice: --batch 1 (the code's one
trajectory at a time), --target next_x (its loss), --weighting trunc_logsnr | none. Not in the paper: --clip
auto clips the x predictions of eps pixel models to [-1, 1]; each depth has its own N_i-step grid t_i = i/N
(the code reuses the start grid); equal updates per depth, app. J's shares for DSDGEXP.
"""
import dataclasses
import functools
import math
import os

import torch
import torch.nn as nn

from common import (LDM_SKIPS, Denoiser, PRESETS, SKIPS, Schedule, autocast, bcast, build_net, check_steps,
                    ddim_sample, ddim_step, ema_update, net_config, rmse, sampler_spec, sampler_times,
                    seeded_labels, weighted_loss)

import runtime as R

VARIANTS = ("dsdn", "dsdi", "dsdgl", "dsdgexp", "tsd", "train")

# ---- the method (alg. 2, sec. 4.1.1, 4.2, app. J) --------------------------------------------------------

def plan(variant, steps, updates):
    """[(N_i, U_i trajectories, updates at that depth)]; a trajectory of N_i steps gives N_i/2 updates.
    DSDN keeps N; DSDI and TSD halve it down to 2; DSDGL and DSDGEXP take 2 steps off per depth (sec.
    4.1.1). Shares of P: equal, or exp(1/S_i), S_i = max(N_i - 2, 1), for DSDGEXP (app. J eq. 2)."""
    if variant == "dsdn":
        depths = [steps]
    elif variant in ("dsdi", "tsd"):
        depths = [steps >> k for k in range(int(math.log2(steps)))]
    else:
        depths = list(range(steps, 0, -2))
    shares = [math.exp(1 / max(n - 2, 1)) if variant == "dsdgexp" else 1.0 for n in depths]
    trajectories = [max(1, round(updates * share / sum(shares) / (n // 2)))
                    for n, share in zip(depths, shares)]
    return [(n, u, u * (n // 2)) for n, u in zip(depths, trajectories)]

def ddim_grid(schedule, steps, skip, last=None, device="cpu"):
    """Alg. 2's grid of an N-step DDIM: times t_N .. t_1 in the schedule's units; (alpha, sigma) in float64 at
    those times and at the end: the data, (1, 0), where DDIM ends, or time `last` (LDM's sampler: 0).
    Computed on the host, then on `device` once: an update reads its t, t', t'' there."""
    times = torch.tensor(sampler_times(schedule, steps, skip), dtype=torch.float64)
    end = torch.tensor([] if last is None else [float(last)], dtype=torch.float64)
    logsnr = schedule.logsnr(torch.cat([times, end]))
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    if last is None:
        alpha, sigma = torch.cat([alpha, torch.ones(1, dtype=torch.float64)]), \
            torch.cat([sigma, torch.zeros(1, dtype=torch.float64)])
    return times.to(device), alpha.to(device), sigma.to(device)

def last_time(cfg):
    """ddim_sample's `last` for --last-step: None (the data) or alpha-bar_0's time 0."""
    return 0 if cfg.last_step == "alphabar0" else None

def clipped(cfg, den):
    """Whether x predictions are clipped (--clip; auto: eps models, whose x blows up as alpha -> 0)."""
    return cfg.clip == "yes" or (cfg.clip == "auto" and den.param == "eps")

def loss_weight(alpha_t, sigma_t, weighting):
    """w(lambda_t), lambda_t = log(alpha_t^2 / sigma_t^2) (alg. 2 line 14)."""
    logsnr = 2 * (alpha_t.log() - sigma_t.log())
    if weighting == "trunc_snr":
        return logsnr.exp().clamp_min(1.0)  # max(SNR, 1): sec. 4.1, Salimans & Ho's truncated SNR
    return logsnr.clamp_min(1.0) if weighting == "trunc_logsnr" else torch.ones_like(logsnr)

@torch.no_grad()
def two_step_target(den, z_t, x_pred, eps_pred, t1, alpha, sigma, clip=False, y=None):
    """Alg. 2 lines 10-13 from the prediction (x_pred, eps_pred) at z_t: a DDIM step to t', den's prediction
    there (for labels y), a DDIM step to t''. alpha, sigma: float64, (3,) or (3, B), at (t, t', t'').
    Returns (x'', z_t'', x(z_t')) with x'' = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/
    sigma_t) alpha_t), the x of one DDIM step t -> t'' that lands on z_t'' (in float64)."""
    a, s = [[bcast(v, z_t.double()) for v in vs] for vs in (alpha, sigma)]
    z_t1 = ddim_step(x_pred, eps_pred, a[1].float(), s[1].float())                 # line 10
    x_1, eps_1 = den(z_t1, t1, clip, y)
    z_t2 = ddim_step(x_1, eps_1, a[2].float(), s[2].float())                       # line 11
    ratio = s[2] / s[0]
    x_target = (z_t2.double() - ratio * z_t.double()) / (a[2] - ratio * a[0])     # line 13
    return x_target.float(), z_t2, x_1

def dsd_loss(model, z_t, t, t1, alpha, sigma, weighting="trunc_snr", target="implied", teacher=None,
             clip=False, y=None):
    """Alg. 2, one update for a batch of trajectories (of labels y, for a class-conditional model) at grid
    points t > t' > t'': returns (loss, z_t'').
    Line 12's x' = (z_t' - (sigma_t'/sigma_t) z_t) / (alpha_t' - (sigma_t'/sigma_t) alpha_t) is, for the
    DDIM step z_t' of line 10, exactly the model's x prediction at z_t: the only part with a gradient. The
    two-step move (x'', detached) is the model's own (DSD) or the frozen teacher's (TSD), and the trajectory
    goes on from its z_t''."""
    x_pred, eps_pred = model(z_t, t, clip, y)
    with torch.no_grad():
        first = (x_pred.detach(), eps_pred.detach()) if teacher is None else teacher(z_t, t, clip, y)
        x_target, z_t2, x_next = two_step_target(teacher or model, z_t, *first, t1, alpha, sigma, clip, y)
    if target == "next_x":  # the official code: MSE(x(z_t), x(z_t-1))
        x_target = x_next
    mse = ((x_pred - x_target) ** 2).flatten(1).mean(1)
    return (loss_weight(alpha[0], sigma[0], weighting).float().to(mse.device) * mse).mean(), z_t2

def training_dsd_loss(den, x, gen, steps, v_weight=0.85, distill_weight=0.15, y=None):
    """Sec. 4.2, eq. 1: L = alpha ||v_hat - v||^2 + beta ||x' - x''||^2 in one graph. u ~ U[0, 1], z_t =
    alpha_t x + sigma_t eps; one forward pass gives v_hat and x' = x(z_t), which carries the gradient; x''
    (detached) comes from two DDIM steps of the same model from z_t, t -> t - 1/N -> t - 2/N (alg. 2), its
    second pass run without dropout (the first step reuses x', so only x' sees dropout).
    Samples with u < 2/N (no room for two steps) get the v term only. y: x's labels (a conditional model)."""
    B, schedule = x.shape[0] * R.world_size(), den.schedule  # x: this rank's part of the global batch B
    u = R.mine(torch.rand(B, generator=gen, device=gen.device)).to(x.device, torch.float64)
    eps = R.mine(torch.randn((B, *x.shape[1:]), generator=gen, device=gen.device)).to(x.device)
    us = torch.stack([u, u - 1 / steps, u - 2 / steps]).clamp_min(0)
    logsnr = schedule.logsnr(schedule.time(us))
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    a, s = bcast(alpha[0], x).float(), bcast(sigma[0], x).float()
    z_t = a * x + s * eps
    x_pred, eps_pred = den(z_t, schedule.time(u), y=y)
    v_loss = weighted_loss(x_pred, eps_pred, x, eps, a, s, "snr_plus_one")  # ||v_hat - v||^2
    den.net.eval()  # the target's pass without dropout, a fixed target (as progressive's frozen teacher)
    x_target, _, _ = two_step_target(den, z_t, x_pred.detach(), eps_pred.detach(), schedule.time(us[1]),
                                     alpha, sigma, y=y)
    den.net.train()
    distill = ((x_pred - x_target) ** 2).flatten(1).mean(1) * (u >= 2 / steps)
    return (v_weight * v_loss + distill_weight * distill).mean()

def learning_rate(step, peak, warmup, total, end):
    """Linear warm-up over `warmup` updates, then cosine annealing from the peak to end x peak at `total`
    (sec. 5; end = 1 keeps it constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress)))

# ---- flags -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    # dsdn | dsdi | dsdgl | dsdgexp: fine-tuning DSD (sec. 4.1.1, app. J); tsd: DSDI with a frozen teacher;
    # train: training DSD (sec. 4.2)
    variant: str = R.field("dsdi", "dsdn | dsdi | dsdgl | dsdgexp | tsd | train (sec. 4.1.1, 4.2, app. J)",
                           choices=VARIANTS)
    data: str = R.field("cifar10", f"dataset ({R.DATASETS}): FID reference; the data of --variant train")
    # '' = google/ddpm-cifar10-32 for cifar10, the cached shapes teacher for shapes
    teacher: str = R.field("", "model to fine-tune (a load_teacher spec); '' = the dataset's")
    # fine-tuning: the conditional shapes teacher for shapes (others: a conditional --teacher is enough);
    # training: a class embedding, the labels from --data
    class_cond: bool = R.field(False, "class-conditional, a uniform label per trajectory or the data's")
    classes: str = R.field("", R.CLASSES_HELP, fixed=False)
    # Class-conditional teachers (table 2's ImageNet 256): the scale of classifier-free guidance w ~ U(lo, hi),
    # drawn per update, in the student's step and its two-step target; the paper: [1, 3], the code: U(1, 4)
    guidance: str = R.field("", "LO,HI: guided fine-tuning, w ~ U(LO, HI) per update ('' = none)")
    eval_guidance: float = R.field(0.0, "guidance scale of evaluation sampling (0 = none; the code: 3.0)",
                                   low=0.0, fixed=False)
    # eta > 0: DDIM's stochastic steps (Song et al. eq. 16), sample i's noise from seed i
    eval_eta: float = R.field(0.0, "DDIM eta of evaluation sampling (alg. 2: 0; the code on ImageNet: 0.1)",
                              low=0.0, high=1.0, fixed=False)
    image_size: int = R.field(0, "image size; 0 = the teacher's (fine-tuning) or the data's (training)",
                              low=0)
    # fine-tuning DSD (sec. 4.1, alg. 2)
    steps: int = R.field(64, "N at the start (DSDN keeps it; the paper distils from 64 DDIM steps)", low=2)
    updates: int = R.field(4000, "P, the updates in all (table 2: 4000 unconditional, 5000 conditional)",
                           low=1, rehearse=1)  # --rehearse: one trajectory per depth
    batch: int = R.field(16, "trajectories sampled in parallel; one update per pair of steps (code: 1)",
                         low=1)
    # ldm: LDM's DDIM grid (range(0, T, T // N) + 1: 17, 33, 67 steps for N = 16, 32, 64); ldm_exact: DSD's
    # patch of it, exactly N steps (np.arange(N) * (T // N) + 1), which the paper's numbers used
    skip: str = R.field("unit", "grid of an N-step DDIM: unit (t_i = i/N) or a discrete skip",
                        choices=SKIPS[:1] + SKIPS[2:] + LDM_SKIPS)
    # DDIM (and alg. 2) ends at the data; LDM's DDIMSampler, which the official code runs, ends with one step
    # to alpha-bar_0 of a discrete schedule (sqrt(alpha-bar_0) x + sqrt(1 - alpha-bar_0) eps), in training and
    # sampling alike
    last_step: str = R.field("data", "where an N-step DDIM ends: data | alphabar0 (LDM's sampler, the code)",
                             choices=("data", "alphabar0"))
    # implied: x'' of the model's two-step move (alg. 2); next_x: the official code's x prediction at z_t-1
    target: str = R.field("implied", "implied (alg. 2) | next_x (official code)",
                          choices=("implied", "next_x"))
    # w(lambda_t): trunc_snr = max(SNR, 1) (sec. 4.1); the code's trunc_logsnr = max(log SNR, 1) (CelebA/LSUN)
    # and none (ImageNet)
    weighting: str = R.field("trunc_snr", "w(lambda_t): trunc_snr (sec. 4.1) | trunc_logsnr | none (code)",
                             choices=("trunc_snr", "trunc_logsnr", "none"))
    # auto clips the x predictions of eps models (docs/self_distill.md); the paper's latents need none
    clip: str = R.field("auto", "clip x predictions to [-1, 1] everywhere: auto | yes | no",
                        choices=("auto", "yes", "no"))
    lr: float = R.field(1e-6, "peak Adam lr (table 3: 1e-6 CelebA-HQ and LSUN; ImageNet 1e-7)", low=0.0)
    lr_end: float = R.field(0.1, "cosine annealing to this fraction of the peak (sec. 5: 0.1)", low=0.0,
                            high=1.0)
    warmup: float = R.field(0.05, "linear warm-up as a fraction of the updates (official code: 0.05)",
                            low=0.0, below=1.0)
    beta1: float = R.field(0.9, "Adam beta1 (table 3)", low=0.0, below=1.0)
    beta2: float = R.field(0.98, "Adam beta2 (table 3)", low=0.0, below=1.0)
    weight_decay: float = R.field(0.0, "Adam's L2 weight decay (table 3: none; the official code: 5e-4)",
                                  low=0.0)
    ema: float = R.field(0.995, "EMA decay (table 3); the EMA is evaluated and loads as the model", low=0.0,
                         below=1.0)
    grad_clip: float = R.field(1.0, "clip the global gradient norm (table 3; 0 = off)", low=0.0)
    # training DSD (sec. 4.2, eq. 1; the rest as the official base config)
    train_net: str = R.field("ddpm_cifar10", "network preset trained from scratch (common.PRESETS)",
                             choices=tuple(PRESETS))
    train_schedule: str = R.field("cosine_logsnr", "noise schedule (v-prediction, as Salimans & Ho)",
                                  choices=("cosine_logsnr", "linear", "cosine"))
    train_updates: int = R.field(65_000, "updates (sec. 5.2: 65k for CelebA-64 at 1e-4)", low=1, fixed=False,
                                 rehearse=2)
    train_lr: float = R.field(1e-4, "Adam lr after the warm-up, constant (sec. 5.2)", low=0.0)
    train_warmup: int = R.field(1000, "linear warm-up updates", low=0)
    train_batch: int = R.field(128, "batch size", low=1)
    train_ema: float = R.field(0.9999, "EMA decay", low=0.0, below=1.0)
    dropout: float = R.field(0.1, "dropout of the network trained from scratch", low=0.0, below=1.0)
    distill_steps: int = R.field(128, "N: x'' from t -> t - 1/N -> t - 2/N (official: 128 timesteps)", low=2)
    v_weight: float = R.field(0.85, "alpha of eq. 1, on ||v_hat - v||^2 (official code: 0.9)", low=0.0)
    distill_weight: float = R.field(0.15, "beta of eq. 1, on ||x' - x''||^2 (code: 0.1; 0 = baseline)",
                                    low=0.0)
    # evaluation; the reference is the paper's "original 64" (--variant train: the model's own output)
    reference_steps: int = R.field(64, "DDIM steps of the original model's reference output", low=1,
                                   fixed=False)
    eval_steps: str = R.field("2,4,8,16", "step counts evaluated (table 2: 2, 4, 8)", fixed=False)
    eval_samples: int = R.field(256, "samples for the RMSE to the reference, seeds 0..n-1", low=1,
                                fixed=False, rehearse=4)
    eval_batch: int = R.field(128, "batch size of sampling", low=1, fixed=False)
    # samples.png: the reference, then per step count the original model | DSD
    grid: int = R.field(8, "samples per row of samples.png", low=1, fixed=False)
    fid_samples: int = R.field(0, "FID/IS samples per model and step count (0 = off; table 2: 30000)", low=0,
                               fixed=False, rehearse=32)
    is_samples: int = R.field(5000, "the IS of the first N FID samples (table 2: 5000; 0 = all)", low=0,
                              fixed=False)
    fid_stats: str = R.field("", "cifar10 FID statistics .npz (mu, sigma), offline ('' = clean-fid's)",
                             fixed=False)
    inception: str = R.field("", "Inception weights for FID/IS, a path ('' = download once)", fixed=False)
    # run
    seed: int = R.field(0, "seed of the trajectories (fine-tuning) or of training")
    device: str = R.field("auto", "auto | cpu | cuda[:N]", fixed=False)
    dtype: str = R.field("fp32", "network precision (schedule algebra fp32, targets fp64; fp16: with loss "
                                 "scaling)",
                         choices=("fp32", "bf16", "fp16"))
    compile: bool = R.field(False, R.COMPILE_HELP, fixed=False)
    log_every: int = R.field(100, "log every N updates", low=1, fixed=False, rehearse=1)
    ckpt_every: int = R.field(500, "checkpoint every N updates", low=1, fixed=False, rehearse=1)
    out: str = R.field("runs/self_distill", "run directory", fixed=False)
    resume: str = R.field("auto", "auto (continue --out/ckpt.pt) | none | PATH", fixed=False)

# --quick: the shared cached 16x16 shapes teacher (tiny U-Net, eps, linear schedule), DSDI 16 -> 8 -> 4 -> 2
# steps with table 3's lr, about 25 updates per depth at batch 16, and an EMA that moves within them.
QUICK = dict(data="shapes", image_size=16, steps=16, updates=100, batch=16, ema=0.99, reference_steps=16,
             eval_steps="2,4,8", eval_samples=64, eval_batch=64, log_every=25, ckpt_every=100,
             out="runs/self_distill_quick", train_net="tiny", train_updates=300, train_lr=5e-4,
             train_warmup=50, train_batch=16, train_ema=0.99, dropout=0.0, distill_steps=32)

# ---- one visible training loop: fine-tuning DSD / TSD under the plan, or training DSD --------------------

def start(cfg, model, ema, peak, ckpt, device):
    """Adam (table 3), fp16's loss scaler, the generator of the global batch's draws (the same on every rank)
    and the view of `model` that trains (DDP, compiled), all restored from `ckpt` when resuming: (opt, scaler,
    gen, trained)."""
    opt = torch.optim.Adam(model.net.parameters(), lr=peak, betas=(cfg.beta1, cfg.beta2),
                           weight_decay=cfg.weight_decay, fused=device != "cpu")
    gen, scaler = torch.Generator(device).manual_seed(cfg.seed), R.grad_scaler(device, cfg.dtype)
    if ckpt is not None:
        model.net.load_state_dict(ckpt["model"]), ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"]), scaler.load_state_dict(ckpt.get("scaler", {}))
        R.restore_generator(gen, ckpt["gen"], ckpt["step"])
    return opt, scaler, gen, R.compiled(R.data_parallel(model), cfg.compile)

def update(cfg, model, ema, opt, scaler, loss, decay, lr):
    """One optimiser step at learning rate lr: gradients (fp16: loss-scaled) clipped at --grad-clip, Adam,
    the EMA."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    ema_update(ema.net, model.net, decay)

def save(cfg, model, ema, opt, scaler, gen, meter, step, z=None, teacher=None, y=None):
    """OUT/ckpt.pt: all the resume state (z, y: every rank's trajectories and their labels; teacher: TSD's
    current one), never after a non-finite loss (meter.check)."""
    meter.check()
    R.save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), **model.state(), ema=ema.net.state_dict(),
                      method="self_distill", variant=cfg.variant, config=dataclasses.asdict(cfg),
                      optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step,
                      gen=R.generator_state(gen),
                      z=None if z is None else R.gather(z), y=None if y is None else R.gather(y),
                      elapsed=meter.now(), teacher=teacher)

def fine_tune(cfg, depths, model, ema, den0, shape, device, ckpt):
    """Fine-tuning DSD (alg. 2) under the plan `depths` [(N_i, trajectories, updates)], TSD with a frozen
    teacher that the student replaces at each halving: `model` and its EMA trained in place, resumable at any
    update (mid-trajectory and mid-schedule)."""
    grids = {n: ddim_grid(model.schedule, n, cfg.skip, last_time(cfg), device) for n, _, _ in depths}
    sequence = [(n, k) for n, trajectories, _ in depths for _ in range(trajectories) for k in range(n // 2)]
    total, warmup = len(sequence), round(cfg.warmup * len(sequence))
    full_updates = {n: p for n, _, p in plan(cfg.variant, cfg.steps, R.full_config(cfg).updates)}
    opt, scaler, gen, trained = start(cfg, model, ema, cfg.lr, ckpt, device)
    teacher, w_range = den0 if cfg.variant == "tsd" else None, parse_range(cfg.guidance)
    fast = functools.lru_cache(maxsize=1)(lambda den: R.compiled(den, cfg.compile))  # a view per TSD teacher
    step, z, y, elapsed = (ckpt["step"], ckpt["z"], ckpt.get("y"), ckpt["elapsed"]) if ckpt else \
        (0, None, None, 0.0)
    z, y = (None if v is None else R.mine(v.to(device)) for v in (z, y))  # this rank's trajectories
    if ckpt and ckpt["teacher"] is not None:
        teacher = den0.copy().freeze()
        teacher.net.load_state_dict(ckpt["teacher"])
    meter = R.Meter(cfg.out, step, total, elapsed, device)
    while step < total:
        n, k = sequence[step]
        with autocast(device, cfg.dtype):
            if k == 0:  # alg. 2 line 6: a new batch of trajectories from z_N ~ N(0, I), ours a slice
                z = R.mine(torch.randn((cfg.batch, *shape), generator=gen, device=device))
                if model.num_classes:  # a class-conditional teacher: a uniform label per trajectory
                    y = R.mine(torch.randint(model.num_classes, (cfg.batch,), generator=gen, device=device))
                if teacher is not None and step > 0 and sequence[step - 1][0] != n:
                    teacher = model.copy().freeze()  # TSD: the student becomes the next teacher (PD)
            times, alpha, sigma = grids[n]
            j = slice(2 * k, 2 * k + 3)  # t, t', t'' on the N-step grid
            student, guide = trained, None if teacher is None else fast(teacher)
            if w_range:  # classifier-free guidance, its scale drawn per update (sec. 5; official: U(1, 4))
                w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand((), generator=gen, device=device)
                student, guide = student.guided(w), guide and guide.guided(w)
            loss, z = dsd_loss(student, z, times[2 * k], times[2 * k + 1], alpha[j], sigma[j], cfg.weighting,
                               cfg.target, guide, clipped(cfg, model), y)
        lr = learning_rate(step, cfg.lr, warmup, total, cfg.lr_end)
        update(cfg, model, ema, opt, scaler, loss, cfg.ema, lr)
        step += 1
        meter.add(loss)
        stop = R.preempted()
        if step % cfg.log_every == 0 or step == total or stop:
            meter.log(step, {"stage": cfg.variant, "update": step, "steps": n, "lr": lr},
                      phase=f"{cfg.variant} N = {n}", full_total=full_updates[n], preempted=stop)
        if step % cfg.ckpt_every == 0 or step == total or stop:
            save(cfg, model, ema, opt, scaler, gen, meter, step, z,
                 None if teacher in (None, den0) else teacher.net.state_dict(), y)
        if stop:
            raise R.Preempted(f"update {step}")

def train_dsd(cfg, model, ema, data, labels, device, ckpt):
    """Training DSD (sec. 4.2, eq. 1) from scratch on the data (and labels: --class-cond): `model` and its
    EMA trained in place, resumable at any update."""
    total = cfg.train_updates
    opt, scaler, gen, trained = start(cfg, model, ema, cfg.train_lr, ckpt, device)
    step, elapsed = (ckpt["step"], ckpt["elapsed"]) if ckpt else (0, 0.0)
    meter = R.Meter(cfg.out, step, total, elapsed, device, phase="training DSD",
                    full_total=R.full_config(cfg).train_updates)
    while step < total:
        x, y = R.sample_batch(data, cfg.train_batch, gen, labels)
        with autocast(device, cfg.dtype):
            loss = training_dsd_loss(trained, x, gen, cfg.distill_steps, cfg.v_weight, cfg.distill_weight, y)
        lr = learning_rate(step, cfg.train_lr, cfg.train_warmup, total, 1.0)  # warm-up, then constant
        update(cfg, model, ema, opt, scaler, loss, cfg.train_ema, lr)
        step += 1
        meter.add(loss)
        stop = R.preempted()
        if step % cfg.log_every == 0 or step == total or stop:
            meter.log(step, {"stage": cfg.variant, "update": step, "lr": lr}, preempted=stop)
        if step % cfg.ckpt_every == 0 or step == total or stop:
            save(cfg, model, ema, opt, scaler, gen, meter, step)
        if stop:
            raise R.Preempted(f"update {step}")

# ---- evaluation (tables 1 and 2, figs. 6-13, in teacher-fidelity terms) ----------------------------------

def evaluate(cfg, models, reference_model, shape, data, device):
    """Every model at every --eval-steps count: the RMSE to the reference model's --reference-steps output
    from the same noise (images: a latent model's decoded), FID/IS when asked; samples.png: the reference,
    then the models per step count."""
    seeds, clip, full = range(cfg.eval_samples), clipped(cfg, models[reference_model]), R.full_config(cfg)
    classes = R.eval_classes(cfg.classes, models[reference_model])
    label = lambda seeds, z: seeded_labels(seeds, models[reference_model].num_classes, z.device, classes)
    ref_folder = R.reference_pngs(cfg.data, cfg.fid_samples, os.path.join(cfg.out, "samples",
                                                                      f"data_{cfg.fid_samples}"),
                                  cfg.fid_stats, data, models[reference_model].image_shape[-1]) \
        if cfg.fid_samples else None

    def run(name, den, steps):  # the DDIM DSD trains (alg. 2; --eval-eta, --last-step), as images
        times = sampler_times(den.schedule, steps, cfg.skip)
        den = den.guided(cfg.eval_guidance) if cfg.eval_guidance else den

        def sampler(net):  # (z, seeds) -> images
            return lambda z, seeds: den.image(ddim_sample(net, z, times, clip, label(seeds, z), cfg.eval_eta,
                                                          seeds, last_time(cfg)))
        with autocast(device, cfg.dtype):
            images = R.generate(sampler(den), seeds, shape, cfg.eval_batch, device,
                                f"evaluation {name} {steps} steps", full.eval_samples)
            if not cfg.fid_samples:
                return images, {"fid": None, "is": None}
            folder = os.path.join(cfg.out, "samples", f"{name}_{steps}")
            R.sample_to_folder(sampler(R.compiled(den, cfg.compile)), cfg.fid_samples, folder, shape,  # compiled:
                               cfg.eval_batch, device, full=full.fid_samples)  # it pays at FID's sizes
        scores = R.fid_is(folder, cfg.data, device, inception=cfg.inception or None, ref_folder=ref_folder,
                          stats=cfg.fid_stats or None, full=full.fid_samples, is_samples=cfg.is_samples or None)
        return images, {"fid": scores.get("fid"), "is": scores.get("is")}

    reference, scores = run(reference_model, models[reference_model], cfg.reference_steps)
    results = [{"model": reference_model, "steps": cfg.reference_steps, "sampler": "ddim",
                "rmse_to_reference": 0.0, **scores}]
    image_rows = [reference[:cfg.grid]]
    for steps in parse_steps(cfg.eval_steps):
        for name, den in models.items():
            images, scores = run(name, den, steps)
            results.append({"model": name, "steps": steps, "sampler": "ddim",
                            "rmse_to_reference": rmse(images, reference), **scores})
            image_rows.append(images[:cfg.grid])
        R.print0(f"{steps:4d} steps  " + "  ".join(f"{r['model']} {r['rmse_to_reference']:.4f}"
                                                 for r in results[-len(models):]))
    R.save_grid(torch.cat(image_rows), os.path.join(cfg.out, "samples.png"), nrow=cfg.grid)
    return results

# ---- main ------------------------------------------------------------------------------------------------

def parse_range(text):
    """--guidance LO,HI as (lo, hi), 1 <= lo <= hi; '' as None."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0 <= lo <= hi:
        raise ValueError(f"--guidance {text!r}: expected LO,HI with 0 <= LO <= HI, e.g. 1,3")
    return lo, hi

def parse_steps(text):
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise ValueError(f"--eval-steps {text!r}: expected comma-separated step counts >= 1, e.g. 2,4,8")
    return steps

def check(cfg):
    """One-line errors for what argparse cannot see, before any work."""
    parse_steps(cfg.eval_steps)
    parse_range(cfg.guidance)
    if cfg.variant in ("dsdi", "tsd") and cfg.steps & (cfg.steps - 1):
        raise ValueError(f"--steps {cfg.steps}: {cfg.variant} halves N down to 2, so N must be a power of 2")
    if cfg.variant != "train" and cfg.steps % 2:
        raise ValueError(f"--steps {cfg.steps}: an update takes two steps, so N must be even")
    if cfg.variant == "train" and cfg.v_weight == 0 and cfg.distill_weight == 0:
        raise ValueError("--v-weight and --distill-weight are both 0: nothing to train")

@R.one_writer
def main(argv=None):
    cfg = R.parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0])
    check(cfg)
    device = R.setup_device(cfg.device)
    cfg = R.rehearsal(cfg)  # --rehearse: every count cut, into OUT/rehearsal
    R.check_batch(**({"train_batch": cfg.train_batch} if cfg.variant == "train" else {"batch": cfg.batch}))
    if cfg.fid_samples:
        R.prepare_fid(cfg.data, cfg.inception or None, cfg.fid_stats or None)
    ckpt = R.read_resume(cfg)  # refuses a resume with other result flags, before any work
    depths = plan(cfg.variant, cfg.steps, cfg.updates) if cfg.variant != "train" else []
    total = sum(p for _, _, p in depths) or cfg.train_updates
    if ckpt is not None and ckpt["step"] >= total and R.run_finished(cfg.out):
        R.print0(f"{cfg.out} is finished (metrics.json); --resume none or another --out runs it again")
        return R.run_finished(cfg.out)
    torch.manual_seed(cfg.seed)
    data = None
    if cfg.variant == "train":
        data, labels = R.load_dataset(cfg.data, cfg.image_size or None, seed=cfg.seed, labels=True)
        net = build_net(cfg.train_net, image_size=data.shape[-1], out_channels=data.shape[1],
                        dropout=cfg.dropout, num_classes=R.dataset_classes(cfg.data) if cfg.class_cond else 0)
        model = Denoiser(net.to(device), Schedule(cfg.train_schedule), "v", "fixed_large").train()
        labels = R.check_labels(model, labels, cfg.data)
        spec, den0, ema, shape = None, None, model.copy().freeze(), tuple(data.shape[1:])
    else:  # fine-tuning: den0 the original model (frozen), model a copy without dropout, ema its EMA
        spec = cfg.teacher or {"cifar10": "google/ddpm-cifar10-32"}.get(cfg.data) or (
            R.cached_teacher(R.TeacherConfig(class_cond=cfg.class_cond)) if cfg.data == "shapes" else None)
        if spec is None:
            raise ValueError(f"--data {cfg.data}: pass --teacher (a hub id, diffusers directory or "
                             "checkpoint)")
        den0 = R.load_teacher(spec, device)
        if (cfg.guidance or cfg.eval_guidance) and not den0.num_classes:
            raise ValueError(f"--guidance/--eval-guidance: {spec} is unconditional; guidance needs a "
                             "class-conditional teacher")
        if cfg.last_step == "alphabar0" and not den0.schedule.discrete:
            raise ValueError(f"--last-step alphabar0: {spec} has a continuous schedule, with no alpha-bar_0; "
                             "pass --last-step data")
        if cfg.class_cond and not den0.num_classes:
            raise ValueError(f"--class-cond: {spec} is unconditional")
        size = net_config(den0.net)["image_size"]
        if cfg.image_size not in (0, size):
            raise ValueError(f"the teacher works at {size}x{size}; pass --image-size {size} or 0")
        model, ema = den0.copy().eval(), den0.copy().freeze()  # fine-tuning without dropout (it trains)
        shape = den0.noise_shape
        if cfg.fid_samples and cfg.data != "cifar10" and not cfg.fid_stats:
            data = R.load_dataset(cfg.data, den0.image_shape[-1], seed=cfg.seed)  # decoded, if latent
    R.eval_classes(cfg.classes, model)
    check_steps(model.schedule, cfg.skip, steps=cfg.steps, reference_steps=cfg.reference_steps,
                eval_steps=max(parse_steps(cfg.eval_steps)))
    steps = depths[-1][0] if depths else min(parse_steps(cfg.eval_steps))  # the last depth's N, or the fewest
    times = sampler_times(model.schedule, steps, cfg.skip)
    model.sampler = ema.sampler = sampler_spec(times, clip=clipped(cfg, model), last=last_time(cfg))  # recorded
    R.start_run(cfg, ckpt, outputs=("samples", "samples.png", "plan.json"),
                batch=cfg.train_batch if cfg.variant == "train" else cfg.batch)
    R.rank_dropout_seed(cfg.seed)
    if depths:
        R.print0(f"{cfg.variant} plan (P = {cfg.updates}, batch {cfg.batch}):\n  N_i  trajectories  updates\n"
                + "\n".join(f"{n:5d} {u:13d} {p:8d}" for n, u, p in depths))
        R.write_json(os.path.join(cfg.out, "plan.json"),
                     [{"steps": n, "trajectories": u, "updates": p} for n, u, p in depths])
    if depths:
        fine_tune(cfg, depths, model, ema, den0, shape, device, ckpt)
    else:
        train_dsd(cfg, model, ema, *R.data_to(device, data, labels), device, ckpt)
    models = {"student": ema} if den0 is None else {"teacher": den0, "student": ema}
    results = evaluate(cfg, models, "student" if den0 is None else "teacher", shape, data, device)
    for r in results:
        r["variant"] = cfg.variant
    reference = {"sampler": f"ddim_{cfg.skip}" + ("_clip" if clipped(cfg, ema) else ""),
                 "steps": cfg.reference_steps, "eta": cfg.eval_eta, "last_step": cfg.last_step}
    R.write_metrics(cfg.out, "self_distill", cfg.data, spec, reference, results, finished=True)
    return R.run_finished(cfg.out)

if __name__ == "__main__":
    R.cli(main)
