"""Progressive Distillation for Fast Sampling of Diffusion Models.
Tim Salimans and Jonathan Ho, ICLR 2022, arXiv:2202.00512.

A teacher sampled with N deterministic DDIM steps is distilled into a student of the same architecture
that takes N/2 steps: the student learns to predict, in one DDIM step, where two teacher steps land
(the target x~ of eq. 43). The student becomes the next teacher; rounds repeat down to 1 step (Alg. 2).

The paper's CIFAR-10 run (base model: Alg. 1, 800k updates; then 8192 -> 1 step in 13 rounds of 50k
updates, 100k for the rounds to 2 and 1 steps):
    python progressive.py --data cifar10 --out runs/pd_cifar10 --fid-samples 50000
From a public eps teacher (discrete linear schedule; the student predicts 'both', see make_student):
    python progressive.py --data cifar10 --teacher google/ddpm-cifar10-32 --start-steps 1024 --out runs/pd_ddpm
Quick (shapes 16x16, a small cached cosine x-teacher, 16 -> 1 steps, a few minutes on 2 CPU cores):
    python progressive.py --quick

Where the paper is silent:
- Discrete teachers (google/ddpm-cifar10-32: linear beta, T = 1000, eps) are read in continuous time as
  t = u (T - 1) (schedule.time): fractional timesteps with the log-SNR interpolated linearly between integer
  steps (exact at them), the network fed the fractional timestep (its sinusoidal embedding is smooth), so
  every half step t - 0.5/N stays distinct even when N exceeds T; u = 0 is the data, (alpha, sigma) = (1, 0).
- An eps teacher's student predicts 'both' (sec. 4), read from the teacher's weights (make_student), and
  the eps teacher's x predictions are clipped inside its two steps (--teacher-clip auto): its
  x = (z - sigma eps)/alpha is amplified noise at low SNR, and x~ is a convex combination of the two.
- The quick base model is the paper's kind (continuous cosine log-SNR, x-prediction, truncated SNR), so
  the claim test runs the published recipe; the eps route is tested on a ddpm-cifar10-32 look-alike.

Measured: python progressive.py --quick (1 CPU thread, shared machine: 3 min 13 s after the cached base
model; RMSE to the teacher's 16-step DDIM output over 64 samples):
    steps                   8       4       2       1
    student               0.019   0.039   0.058   0.078
    undistilled DDIM      0.039   0.100   0.190   0.297
From the shared eps shapes teacher (linear, eps) the 'both' student starts at 0.47 at 8 steps (x = alpha^2 x(eps)
until its x head is learned) and needs far longer rounds: 0.25 / 0.21 / 0.19 after 150 / 600 / 1500 updates
of 16 -> 8 steps, against 0.069 for that teacher's own 8-step DDIM.
"""
import dataclasses
import math
import os
import time

import torch
import torch.nn as nn

from common import (DATASETS, PARAMS, WEIGHTINGS, TeacherConfig, autocast, bcast, build_net, cached_teacher,
                    ddim_sample, ddim_step, denoise, eps_from_x, fid_is, field, generate, load_checkpoint, load_dataset,
                    load_teacher, log_row, lr_at, net_config, parse_config, pd_target, pick_device, posterior,
                    resume_path, rmse, sample_batch, sample_to_folder, sampler_times, save_checkpoint, save_grid,
                    start_run, train_teacher, unit_grid, weighted_loss, write_metrics, write_pngs)


@dataclasses.dataclass
class Config:
    # data and teacher
    data: str = field("cifar10", f"dataset: {DATASETS}")
    image_size: int = field(32, "image resolution (cifar10 is 32x32)")
    teacher: str = field("", "teacher to distil: hub id (google/ddpm-cifar10-32), diffusers dir, original or project "
                             "checkpoint; empty = train the base model first (Alg. 1)")
    # base model (Alg. 1, sec. 4, app. E): the paper's CIFAR-10 settings
    net: str = field("pd_cifar10", "base network preset (app. E: 256 ch, mult [1,1,1], 3 res blocks, attention at "
                                   "16 and 8, res-block resampling, scale-shift norm)")
    schedule: str = field("cosine_logsnr", "base noise schedule: cosine_logsnr (official code: log-SNR clipped to "
                                           "+-20, angle time input) | linear | cosine")
    param: str = field("x", "base network output: x | v | eps | both (sec. 4, Table 1)")
    weighting: str = field("trunc_snr", "loss weighting w(lambda) of Alg. 1 and Alg. 2: trunc_snr | snr_plus_one "
                                        "(= v-MSE) | snr (= eps-MSE) | const (= x-MSE)")
    dropout: float = field(0.2, "base model dropout (app. E; distillation uses none)")
    base_updates: int = field(800_000, "base model updates (app. E)")
    base_batch: int = field(128, "base model batch size (app. E)")
    base_lr: float = field(2e-4, "base Adam lr (official cifar_base config; app. E says 3e-4)")
    base_warmup: int = field(1000, "base lr warm-up updates (official config)")
    base_weight_decay: float = field(0.001, "base decoupled weight decay (app. E)")
    base_ema: float = field(0.9999, "base EMA decay (app. E); the student starts from the EMA weights")
    base_cache: bool = field(False, "train the base model once into the shared cache (DISTILL_CACHE), not --out/base")
    # distillation (Alg. 2, sec. 5.2, app. E, app. I)
    start_steps: int = field(8192, "teacher sampling steps at the start (sec. 5.2: 8192 for CIFAR-10)")
    end_steps: int = field(1, "student sampling steps of the last round")
    divisor: int = field(2, "student steps = teacher steps / divisor: 2 (Alg. 2) or 4 (app. I ablation; the target "
                            "still comes from two teacher DDIM steps)")
    updates_per_round: int = field(50_000, "updates per round (sec. 5.2: 50k; app. I: 25k, 10k, 5k)")
    final_rounds_factor: int = field(2, "update multiplier for the rounds to 2 and 1 steps (sec. 5.2: 100k)")
    lr: float = field(1e-4, "Adam lr, annealed linearly to 0 within each round (app. E; the official "
                            "cifar_distill config uses 5e-5)")
    grad_clip: float = field(1.0, "clip the global gradient norm (app. E; 0 = off)")
    batch: int = field(128, "distillation batch size (app. E), also for sampling")
    eps_student: str = field("both", "student of an eps teacher: both (sec. 4: x from x- and eps-heads, stable as "
                                     "SNR -> 0) | eps (keep the teacher's output; unstable at few steps)")
    teacher_clip: str = field("auto", "clip the teacher's x predictions in its two DDIM steps: auto (only an eps "
                                      "teacher, whose x = (z - sigma eps)/alpha blows up as alpha -> 0 and whose own "
                                      "sampler clips) | yes | no (Alg. 2 and the official code: unclipped)")
    # evaluation (fig. 4, fig. 7, app. F)
    eval_samples: int = field(256, "samples for the RMSE to the start-steps teacher, from seeds 0..n-1")
    grid: int = field(8, "samples per model in rounds.png: a row per round, the student at N steps left and the "
                         "undistilled teacher at N steps right, from the same noise (fig. 7, fig. 4)")
    eval_clip: bool = field(True, "clip x_pred to [-1, 1] in evaluation sampling (official eval; the distillation "
                                  "targets follow --teacher-clip)")
    fid_samples: int = field(0, "FID/IS samples per model and round (0 = off; the paper uses 50000)")
    fid_teacher: bool = field(False, "also FID the undistilled teacher at each round's steps (fig. 4; costly at "
                                     "large N)")
    inception: str = field("", "path of the Inception weights for FID/IS (default: download once)")
    stochastic: str = field("", "app. F sampler for the students: comma-separated gammas in [0, 1] (log-variance "
                                "between the lower (0) and upper (1) bound); empty = off")
    # run
    seed: int = field(0, "seed")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    dtype: str = field("fp32", "network precision: fp32 | bf16 | fp16 (schedule algebra stays fp32)")
    log_every: int = field(500, "log every N updates")
    ckpt_every: int = field(5000, "checkpoint every N updates")
    out: str = field("runs/progressive", "run directory")
    resume: str = field("auto", "auto (continue from --out/ckpt.pt) | none | PATH")


# --quick: a paper-style base model (cosine log-SNR, x-prediction, truncated SNR) on 16x16 shapes, trained once
# into the shared cache; 16 -> 8 -> 4 -> 2 -> 1 steps in rounds of 150 (300) updates, hence 5x the paper's lr.
QUICK = dict(data="shapes", image_size=16, net="tiny", dropout=0.0, base_updates=2000, base_batch=32, base_lr=1e-3,
             base_warmup=100, base_weight_decay=0.0, base_ema=0.995, base_cache=True, start_steps=16,
             updates_per_round=150, lr=5e-4, batch=16, eval_samples=64, log_every=50, ckpt_every=100,
             out="runs/progressive_quick")


# ---- base model (Alg. 1) -----------------------------------------------------------------------------------

def base_config(cfg):
    """The base model's standard training (Alg. 1: common.train_teacher) from this config."""
    return TeacherConfig(data=cfg.data, image_size=cfg.image_size, net=cfg.net, dropout=cfg.dropout,
                         schedule=cfg.schedule, param=cfg.param, weighting=cfg.weighting, var="fixed_large",
                         updates=cfg.base_updates, batch=cfg.base_batch, lr=cfg.base_lr, warmup=cfg.base_warmup,
                         weight_decay=cfg.base_weight_decay, ema=cfg.base_ema, grad_clip=cfg.grad_clip, seed=cfg.seed,
                         device=cfg.device, dtype=cfg.dtype, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                         out=os.path.join(cfg.out, "base"), resume=cfg.resume)


def train_base(cfg):
    tcfg = base_config(cfg)
    return cached_teacher(tcfg) if cfg.base_cache else train_teacher(tcfg)


# ---- the method (Alg. 2, app. G) ---------------------------------------------------------------------------

def round_schedule(start, end, divisor, updates, final_factor):
    """[(teacher steps, student steps, updates)] of every round: N -> N/divisor (Alg. 2; app. I for 4), with
    final_factor x the updates for the rounds to 2 and 1 steps (sec. 5.2)."""
    rounds, n = [], start
    while n > end:
        m = max(n // divisor, end)
        rounds.append((n, m, updates * (final_factor if m <= 2 else 1)))
        n = m
    return rounds


def alpha_sigma_at(schedule, u):
    """(alpha, sigma) at unit time u in [0, 1] (float64 tensor), u mapped to the schedule's units by
    schedule.time. u = 0 is the data itself, (alpha, sigma) = (1, 0), as alpha_0 = cos(0) = 1 in the paper
    and as every sampler here ends (ddim_sample's last step returns x_pred). With it, eq. 43 at the last
    student step gives x~ = the teacher's second x prediction, which is what the official code substitutes."""
    alpha, sigma = schedule.alpha_sigma(schedule.time(u))
    data = u <= 0
    return torch.where(data, 1.0, alpha), torch.where(data, 0.0, sigma)


@torch.no_grad()
def teacher_two_steps(teacher, schedule, param, z_t, u, N, clip=False):
    """Alg. 2, lines 9-12: two DDIM steps of the teacher, t -> t' = t - 0.5/N -> t'' = t - 1/N, with u the unit
    time t of each sample ((B,) float64) and N the student's steps. Returns z_t''. Unclipped as in the paper
    and the official code; clip (x_pred to [-1, 1], eps re-derived) is for eps teachers (see teacher_clip)."""
    u1, u2 = u - 0.5 / N, u - 1.0 / N
    x_pred, eps_pred = denoise(teacher, schedule, param, z_t, schedule.time(u), clip=clip)
    z_t1 = ddim_step(x_pred, eps_pred, *(bcast(v, z_t) for v in alpha_sigma_at(schedule, u1)))
    x_pred, eps_pred = denoise(teacher, schedule, param, z_t1, schedule.time(u1), clip=clip)
    return ddim_step(x_pred, eps_pred, *(bcast(v, z_t) for v in alpha_sigma_at(schedule, u2)))


def distill_target(teacher, schedule, param, z_t, u, N, clip=False):
    """Alg. 2, line 13 (app. G, eq. 43): the x~ for which one student DDIM step t -> t'' lands on z_t''.
    x~ is a convex combination of the teacher's two x predictions (both weights are positive because the
    SNR grows along t -> t' -> t''), so it is as bounded as they are."""
    z_tpp = teacher_two_steps(teacher, schedule, param, z_t, u, N, clip)
    alpha_t, sigma_t = (bcast(v, z_t) for v in alpha_sigma_at(schedule, u))
    alpha_tpp, sigma_tpp = (bcast(v, z_t) for v in alpha_sigma_at(schedule, u - 1.0 / N))
    return pd_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp)


def distill_loss(student, s_param, teacher, t_param, schedule, weighting, x, N, gen, clip=False):
    """Alg. 2, the student's loss: t = i/N, i ~ U{1..N} (the student's own grid), z_t = alpha_t x + sigma_t eps,
    w(lambda_t) ||x~ - x_pred(z_t)||^2 with the weighting of sec. 4 (eps~ re-derived from x~)."""
    B = x.shape[0]
    u = torch.randint(1, N + 1, (B,), generator=gen, device=gen.device).to(x.device, torch.float64) / N
    alpha, sigma = (bcast(v, x) for v in alpha_sigma_at(schedule, u))
    eps = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
    z_t = alpha * x + sigma * eps
    x_tilde = distill_target(teacher, schedule, t_param, z_t, u, N, clip)
    x_pred, eps_pred = denoise(student, schedule, s_param, z_t, schedule.time(u))
    eps_tilde = eps_from_x(z_t, x_tilde, alpha, sigma)
    return weighted_loss(x_pred, eps_pred, x_tilde, eps_tilde, alpha, sigma, weighting).mean()


def make_student(teacher, param, eps_student):
    """Alg. 2, 'theta <- eta': a copy of the teacher (its EMA weights), without dropout (app. E). Returns
    (student, its param). An eps teacher gets a 'both' student (sec. 4), x = sigma^2 x_head + alpha^2 x(eps_head),
    with the eps head copied from the teacher's output layer and the x head zero-initialised: at high SNR it
    is the teacher, and as SNR -> 0 its x prediction moves to the (learned) x head instead of dividing the
    eps error by alpha -> 0 (|dx/d output| <= 1 everywhere, vs 1/alpha ~ 160 at t = T-1 of the linear schedule).
    Learned-variance channels are dropped: DDIM needs none."""
    cfg = {**net_config(teacher), "dropout": 0.0}
    state = teacher.state_dict()
    if param == "eps" and eps_student == "both":
        if cfg.get("arch") != "unet":
            raise ValueError("--eps-student both widens a U-Net's conv_out; use --eps-student eps for this teacher")
        C = cfg["in_channels"]
        cfg["out_channels"] = 2 * C
        for k in ("conv_out.weight", "conv_out.bias"):
            state[k] = torch.cat([torch.zeros_like(state[k][:C]), state[k][:C]])
        param = "both"
    student = build_net(cfg).to(next(teacher.parameters()).device)
    student.load_state_dict(state)
    return student, param


# ---- evaluation (fig. 4, fig. 7, app. F) ------------------------------------------------------------------

def ddim(net, schedule, param, steps, clip):
    """The N-step DDIM sampler on the grid t = i/N the students are trained on, ending at the data."""
    times = sampler_times(schedule, steps, skip="unit")
    return lambda z: ddim_sample(net, schedule, param, z, times, clip=clip).clamp(-1, 1)


def stochastic(net, schedule, param, steps, gamma, clip, generator):
    """App. F: ancestral sampling on the same grid, log-variance gamma log sigma_{t|s}^2 + (1 - gamma) log
    sigma~_{s|t}^2 between Ho et al.'s upper and lower bounds (the paper grid-searches 11 values)."""
    @torch.no_grad()
    def sample(z):
        us = unit_grid(steps) + [0.0]
        for u, s in zip(us[:-1], us[1:]):
            x_pred, _ = denoise(net, schedule, param, z, schedule.time(u), clip=clip)
            if s == 0.0:
                return x_pred.clamp(-1, 1)
            (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(schedule.time(u)), schedule.alpha_sigma(schedule.time(s))
            mean, var_lo, var_hi = posterior(z, x_pred, a_t.to(z.device), s_t.to(z.device), a_s.to(z.device),
                                             s_s.to(z.device))
            logvar = gamma * var_hi.log() + (1 - gamma) * var_lo.log()
            z = mean + (0.5 * logvar).exp() * torch.randn(z.shape, generator=generator, device=z.device)
    return sample


def sample_and_score(cfg, name, sample_fn, data, device, want_fid):
    """Samples from seeds 0..eval_samples-1 (for the RMSE) and, when asked, FID/IS of cfg.fid_samples samples."""
    with autocast(device, cfg.dtype):
        images = generate(sample_fn, range(cfg.eval_samples), data.shape[1:], cfg.batch, device)
        if not (want_fid and cfg.fid_samples):
            return images, {"fid": None, "is": None}
        folder = sample_to_folder(sample_fn, cfg.fid_samples, os.path.join(cfg.out, "samples", name),
                                  data.shape[1:], cfg.batch, device)
    ref = None if cfg.data == "cifar10" else write_pngs(data[:cfg.fid_samples],
                                                        os.path.join(cfg.out, "samples", "data"))
    return images, fid_is(folder, cfg.data, device, inception=cfg.inception or None, ref_folder=ref)


@torch.no_grad()
def evaluate(cfg, r, N, student, s_param, teacher0, info, reference, data, device):
    """Round r's rows: the student at N steps and the undistilled teacher's own N-step DDIM, both as RMSE to
    the teacher's start-steps DDIM output from the same noise (fig. 4 in teacher-fidelity terms), FID/IS when
    asked, and the app. F sampler when asked. Returns (rows, the grid row: cfg.grid student and teacher samples)."""
    schedule = info["schedule"]
    models = [("student", {}, ddim(student, schedule, s_param, N, cfg.eval_clip), True),
              ("teacher", {}, ddim(teacher0, schedule, info["param"], N, cfg.eval_clip), cfg.fid_teacher)]
    for g in parse_gammas(cfg.stochastic):
        gen = torch.Generator(device).manual_seed(cfg.seed)
        models.append(("student", {"sampler": "stochastic", "gamma": g},
                       stochastic(student, schedule, s_param, N, g, cfg.eval_clip, gen), True))
    rows, samples = [], []
    for model, extra, sample_fn, want_fid in models:
        name = f"{model}_{N}" + (f"_gamma{extra['gamma']}" if extra else "")
        images, scores = sample_and_score(cfg, name, sample_fn, data, device, want_fid)
        samples.append(images[:cfg.grid])
        rows.append({"model": model, "steps": N, "round": r + 1, "sampler": "ddim", **extra,
                     "rmse_to_reference": rmse(images, reference), "fid": scores["fid"], "is": scores["is"]})
    return rows, torch.cat(samples[:2])  # student | undistilled teacher


def parse_gammas(text):
    return [float(g) for g in text.split(",") if g.strip()]


# ---- distillation: one visible loop per round --------------------------------------------------------------

def as_teacher(cfg, student, param, schedule, var, N, step, elapsed):
    """The checkpoint fields that make a student loadable by common.load_teacher (no EMA in distillation)."""
    return dict(net_config=net_config(student), model=student.state_dict(), ema=None, schedule=schedule.spec(),
                param=param, var=var, steps=N, method="progressive", config=dataclasses.asdict(cfg), step=step,
                elapsed=elapsed)


def snapshot(net, param):
    """A teacher as stored in ckpt.pt: the teacher of the round a resume starts in."""
    return {"net_config": net_config(net), "weights": net.state_dict(), "param": param}


def distill(cfg, spec, teacher0, info, data, device, state=None):
    """Rounds of Alg. 2 from teacher0, resumable inside a round and across rounds. Returns the metrics rows."""
    schedule, path = info["schedule"], os.path.join(cfg.out, "ckpt.pt")
    rounds = round_schedule(cfg.start_steps, cfg.end_steps, cfg.divisor, cfg.updates_per_round, cfg.final_rounds_factor)
    var = "fixed_large" if info["var"] == "learned_range" and cfg.eps_student == "both" else info["var"]
    if state is None:  # the reference: the original teacher's start-steps DDIM from the evaluation noise
        fn = ddim(teacher0, schedule, info["param"], cfg.start_steps, cfg.eval_clip)
        reference, scores = sample_and_score(cfg, f"teacher_{cfg.start_steps}", fn, data, device, True)
        results = [{"model": "teacher", "steps": cfg.start_steps, "round": 0, "sampler": "ddim",
                    "rmse_to_reference": 0.0, "fid": scores["fid"], "is": scores["is"]}]
        state = {"round": 0, "step": 0, "optimizer": None, "teacher": snapshot(teacher0, info["param"]),
                 "results": results, "reference": reference, "elapsed": 0.0,
                 "grid_rows": [reference[:cfg.grid].repeat(2, 1, 1, 1)]}  # the reference above both halves
    reference, results, grid_rows, elapsed = state["reference"], state["results"], state["grid_rows"], state["elapsed"]
    teacher = build_net(state["teacher"]["net_config"]).to(device)
    teacher.load_state_dict(state["teacher"]["weights"])
    teacher.eval().requires_grad_(False)
    t_param = state["teacher"]["param"]

    for r in range(state["round"], len(rounds)):
        n_teacher, N, updates = rounds[r]
        student, s_param = make_student(teacher, t_param, cfg.eps_student)  # Alg. 2: theta <- eta, fresh optimiser
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)  # no weight decay, no EMA (official distill config)
        gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + r)
        step = 0
        if state["round"] == r and state["optimizer"] is not None:  # resume inside this round
            student.load_state_dict(state["model"]), opt.load_state_dict(state["optimizer"])
            gen.set_state(state["gen"])
            step = state["step"]
            print(f"resumed round {r + 1} ({n_teacher} -> {N} steps) at update {step}")

        def save_state(round_, step_, optimizer, teacher_state):  # ckpt.pt: a teacher checkpoint + the resume state
            save_checkpoint(path, **as_teacher(cfg, student, s_param, schedule, var, N, step_, elapsed),
                            optimizer=optimizer, round=round_, teacher=teacher_state, gen=gen.get_state(),
                            results=results, reference=reference, grid_rows=grid_rows, teacher_spec=spec)

        teacher_state = snapshot(teacher, t_param)
        clip = cfg.teacher_clip == "yes" or (cfg.teacher_clip == "auto" and t_param == "eps")
        student.train()
        loss_sum, t0, last_log = torch.zeros((), device=device), time.time(), step
        while step < updates:
            lr = lr_at(step, cfg.lr, 0, updates, "linear")  # app. E: linear anneal to zero within the round
            for g in opt.param_groups:
                g["lr"] = lr
            x = sample_batch(data, cfg.batch, gen)
            with autocast(device, cfg.dtype):
                loss = distill_loss(student, s_param, teacher, t_param, schedule, cfg.weighting, x, N, gen, clip)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            loss_sum += loss.detach()
            if step % cfg.log_every == 0 or step == updates:
                dt, n = time.time() - t0, step - last_log
                elapsed, t0, last_log = elapsed + dt, time.time(), step
                mean_loss = loss_sum.item() / n
                if not math.isfinite(mean_loss):
                    raise RuntimeError(f"round {r + 1} ({N} steps) diverged at update {step} (loss {mean_loss}); "
                                       "lower --lr (for an eps teacher keep --eps-student both)")
                log_row(cfg.out, {"stage": "distill", "round": r + 1, "steps": N, "update": step, "loss": mean_loss,
                                  "lr": lr, "sec_per_update": dt / n, "elapsed_s": elapsed})
                loss_sum.zero_()
            if step % cfg.ckpt_every == 0 and step < updates:
                save_state(r, step, opt.state_dict(), teacher_state)

        # evaluate, keep this round's student as a teacher checkpoint, and make it the next teacher (Alg. 2)
        student.eval().requires_grad_(False)
        rows, grid = evaluate(cfg, r, N, student, s_param, teacher0, info, reference, data, device)
        results, grid_rows = results + rows, grid_rows + [grid]
        write_metrics(cfg.out, "progressive", cfg.data, spec, {"sampler": f"ddim{'_clip' if cfg.eval_clip else ''}",
                                                                "steps": cfg.start_steps}, results)
        save_grid(torch.cat(grid_rows), os.path.join(cfg.out, "rounds.png"), nrow=2 * cfg.grid)
        print(f"round {r + 1}/{len(rounds)}: {N} steps  rmse student {rows[0]['rmse_to_reference']:.4f}  "
              f"undistilled DDIM {rows[1]['rmse_to_reference']:.4f}", flush=True)
        save_checkpoint(os.path.join(cfg.out, f"student_{N}steps.pt"),
                        **as_teacher(cfg, student, s_param, schedule, var, N, updates, elapsed), optimizer=None)
        teacher, t_param = student, s_param
        save_state(r + 1, 0, None, snapshot(teacher, t_param))
    return results


def check(cfg):
    """One-line errors for bad flags."""
    problems = [(cfg.param not in PARAMS, f"--param {cfg.param}: expected one of {', '.join(PARAMS)}"),
                (cfg.weighting not in WEIGHTINGS,
                 f"--weighting {cfg.weighting}: expected one of {', '.join(WEIGHTINGS)}"),
                (cfg.divisor not in (2, 4), f"--divisor {cfg.divisor}: expected 2 or 4"),
                (cfg.eps_student not in ("both", "eps"), f"--eps-student {cfg.eps_student}: expected both or eps"),
                (cfg.teacher_clip not in ("auto", "yes", "no"),
                 f"--teacher-clip {cfg.teacher_clip}: expected auto, yes or no"),
                (not 1 <= cfg.end_steps < cfg.start_steps or cfg.start_steps % cfg.end_steps
                 or (cfg.start_steps // cfg.end_steps) & (cfg.start_steps // cfg.end_steps - 1),
                 f"--start-steps {cfg.start_steps} / --end-steps {cfg.end_steps}: expected 1 <= end < start with "
                 "start/end a power of 2"),
                (cfg.updates_per_round < 1 or cfg.final_rounds_factor < 1,
                 "--updates-per-round and --final-rounds-factor must be >= 1"),
                (cfg.dtype not in ("fp32", "bf16", "fp16"), f"--dtype {cfg.dtype}: expected fp32, bf16 or fp16"),
                (cfg.eval_samples < 1 or cfg.batch < 1, "--eval-samples and --batch must be >= 1")]
    try:
        bad_gamma = any(not 0 <= g <= 1 for g in parse_gammas(cfg.stochastic))
    except ValueError:
        bad_gamma = True
    problems.append((bad_gamma, f"--stochastic {cfg.stochastic!r}: expected comma-separated numbers in [0, 1]"))
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


def main(argv=None):
    cfg = parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0])
    check(cfg)
    torch.manual_seed(cfg.seed)
    start_run(cfg.out, cfg)
    try:
        device = pick_device(cfg.device)
        ckpt = resume_path(cfg.out, cfg.resume)
        state = load_checkpoint(ckpt) if ckpt else None
        data = load_dataset(cfg.data, cfg.image_size, seed=cfg.seed)
        spec = state["teacher_spec"] if state else (cfg.teacher or train_base(cfg))
        teacher0, info = load_teacher(spec, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if info["steps"] and info["steps"] != cfg.start_steps:
        raise SystemExit(f"error: {spec} was distilled for {info['steps']} steps; pass --start-steps {info['steps']}")
    size = net_config(teacher0).get("image_size")
    if size and size != data.shape[-1]:
        raise SystemExit(f"error: the teacher works at {size}x{size}, the data at {data.shape[-1]}x{data.shape[-1]}; "
                         f"pass --image-size {size}")
    return distill(cfg, spec, teacher0, info, data.to(device), device, state)


if __name__ == "__main__":
    main()
