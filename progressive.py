"""Progressive Distillation for Fast Sampling of Diffusion Models.
Tim Salimans and Jonathan Ho, ICLR 2022, arXiv:2202.00512.

A student of the teacher's architecture learns to do in one DDIM step what the teacher does in two (the target
x~ of eq. 43); it becomes the next teacher, and rounds halve the steps down to 1 (Alg. 2). Without --teacher
the base model is trained first (Alg. 1, app. E's CIFAR-10 settings).
    python progressive.py --data cifar10 --out runs/pd_cifar10 --fid-samples 50000      # fig. 4, CIFAR-10
    python progressive.py --data cifar10 --teacher google/ddpm-cifar10-32 --start-steps 1024
    python progressive.py --quick                                                       # 16x16 shapes, CPU
Departures, each with its flag (docs/progressive.md has why and what was measured):
- eps teachers (the paper's predict x): students keep predicting eps down to --reparam-steps, where a
  re-parameterisation round makes them 'both' (sec. 4); their x is clipped to [-1, 1] in both teacher steps
  and in the student's prediction (--teacher-clip auto).
- x~ is the convex combination w x1 + (1 - w) x2 of the teacher's two x predictions, w in float64 (app. D);
  at the last step x~ is the teacher's second x, as the official code substitutes.
- lr 1e-4 annealed to 0 in each round (app. E; the official config: 5e-5). Discrete teachers (T = 1000) run
  in continuous time t = u (T - 1); learned-range variance channels are dropped.
"""
import dataclasses
import hashlib
import os
import shutil

import torch
import torch.nn as nn

from common import (Denoiser, PRESETS, WEIGHTINGS, ancestral_sample, autocast, bcast, build_net, ddim_sample,
                    ddim_step, eps_from_x, lr_at, net_config, rmse, sampler_spec, sampler_times,
                    seeded_labels, weighted_loss)

import runtime as R

# ---- the method (Alg. 2, app. G) ---------------------------------------------------------------------------

def angle(schedule, u):
    """phi_t = arctan(sigma_t / alpha_t) (app. D) at unit time u ((B,) float64), in float64: alpha = cos phi,
    sigma = sin phi. u = 0 is the data itself, phi = 0, (alpha, sigma) = (1, 0), where every sampler ends."""
    phi = torch.atan(torch.exp(-0.5 * schedule.logsnr(schedule.time(u))))
    return torch.where(u > 0, phi, torch.zeros_like(phi))

def target_weight(phi_t, phi_t1, phi_t2):
    """Eq. 43 as a convex combination, x~ = w x1 + (1 - w) x2, x1 and x2 the teacher's x predictions at t, t'.
    Writing out the two DDIM steps, z_t'' - (sigma_t''/sigma_t) z_t = A x2 + B x1 and the denominator of
    eq. 43 is A + B, with A ~ sin(phi_t) sin(phi_t' - phi_t'') and B ~ sin(phi_t'') sin(phi_t - phi_t'),
    both >= 0 as phi falls along t > t' > t''. Float64 keeps w exact where A + B ~ 1e-4 (t ~ 1, N = 8192)."""
    a = torch.sin(phi_t) * torch.sin(phi_t1 - phi_t2)
    b = torch.sin(phi_t2) * torch.sin(phi_t - phi_t1)
    return b / (a + b)

@torch.no_grad()
def distill_target(teacher, z_t, u, N, y=None, one_step=False, clip=False):
    """Alg. 2, lines 9-13: x~ for which one student DDIM step t -> t'' = t - 1/N lands where two teacher DDIM
    steps t -> t' = t - 0.5/N -> t'' land (u: the unit time t of each sample, (B,) float64; N: student steps;
    y: the labels of a class-conditional teacher, the student's own). one_step (the re-parameterisation
    round): one teacher step per student step, x~ = the teacher's x."""
    schedule = teacher.schedule
    x1, eps1 = teacher(z_t, schedule.time(u), clip, y)                                   # line 11
    if one_step:
        return x1
    u1, u2 = u - 0.5 / N, u - 1.0 / N
    phi, phi1, phi2 = angle(schedule, u), angle(schedule, u1), angle(schedule, u2)
    z_t1 = ddim_step(x1, eps1, bcast(phi1.cos().float(), z_t), bcast(phi1.sin().float(), z_t))
    x2, _ = teacher(z_t1, schedule.time(u1), clip, y)                                    # line 12
    w = bcast(target_weight(phi, phi1, phi2).float(), z_t)                              # line 13, eq. 43
    return w * x1 + (1 - w) * x2

def distill_loss(student, teacher, x, y, N, weighting, generator, one_step=False, clip=False):
    """Alg. 2, the student's loss: t = i/N, i ~ U{1..N} (the student's own grid), z_t = alpha_t x +
    sigma_t eps, w(lambda_t) ||x~ - x_pred(z_t)||^2 with the weighting of sec. 4 (eps~ derived from x~).
    y: x's labels for a class-conditional teacher (None otherwise); teacher and student see the same label
    (the official loss_fn: no label dropout, no guidance)."""
    B, schedule = x.shape[0] * R.world_size(), student.schedule  # x: this rank's part of the global batch B
    i = R.mine(torch.randint(1, N + 1, (B,), generator=generator, device=generator.device))
    u = i.to(x.device, torch.float64) / N
    phi = angle(schedule, u)
    alpha, sigma = bcast(phi.cos().float(), x), bcast(phi.sin().float(), x)
    eps = R.mine(torch.randn((B, *x.shape[1:]), generator=generator, device=generator.device)).to(x.device)
    z_t = alpha * x + sigma * eps
    x_tilde = distill_target(teacher, z_t, u, N, y, one_step, clip)
    x_pred, eps_pred = student(z_t, schedule.time(u), clip, y)
    eps_tilde = eps_from_x(z_t, x_tilde, alpha, sigma)
    return weighted_loss(x_pred, eps_pred, x_tilde, eps_tilde, alpha, sigma, weighting).mean()

def make_student(teacher, steps, both=False, clip=True):
    """Alg. 2, 'theta <- eta': a copy of the teacher without dropout (app. E), for `steps` DDIM steps on the
    grid t = i/N (its recorded sampler; clip: x_pred clipped, as --eval-clip); the mean channels only (a
    learned-range teacher's variance channels are dropped). both=True makes an eps teacher's student predict
    'both' (sec. 4): its output layer gets a zero x head before the eps head."""
    cfg, state = {**net_config(teacher.net), "dropout": 0.0}, dict(teacher.net.state_dict())
    C = cfg["in_channels"]
    param = "both" if teacher.param == "eps" and both else teacher.param
    head, mean = "conv_out" if cfg["arch"] == "unet" else "out", C * (2 if teacher.param == "both" else 1)
    for k in (f"{head}.weight", f"{head}.bias"):  # rows (positions, channels): 1 (U-Net) or p*p (DiT)
        w = state[k].unflatten(0, (-1, cfg["out_channels"]))[:, :mean]
        state[k] = (torch.cat([torch.zeros_like(w), w], 1) if param != teacher.param else w).flatten(0, 1)
    cfg["out_channels"] = C * (2 if param == "both" else 1)
    net = build_net(cfg).to(next(teacher.parameters()).device)
    net.load_state_dict(state)
    var = "fixed_large" if teacher.var == "learned_range" else teacher.var
    times = sampler_times(teacher.schedule, steps, "unit")
    return Denoiser(net, teacher.schedule, param, var, sampler_spec(times, clip=clip), teacher.source).train()

def round_schedule(start, end, divisor, updates, final_factor, reparam_steps=0, reparam_updates=0):
    """[(teacher steps, student steps, updates)] of every round: N -> N/divisor (Alg. 2; app. I for 4), with
    final_factor x the updates for the rounds to 2 and 1 steps (sec. 5.2), and with reparam_steps the
    re-parameterisation round (n -> n steps) before the first round whose teacher takes n <= reparam_steps."""
    rounds, n = [], start
    while n > end:
        m = max(n // divisor, end)
        rounds.append((n, m, updates * (final_factor if m <= 2 else 1)))
        n = m
    k = next((i for i, (n, _, _) in enumerate(rounds) if n <= reparam_steps), None)
    if k is not None:
        rounds.insert(k, (rounds[k][0], rounds[k][0], reparam_updates))
    return rounds

# ---- flags -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    # data and teacher
    data: str = R.field("cifar10", f"dataset: {R.DATASETS}")
    image_size: int = R.field(0, "image resolution; 0 = the teacher's (base model: the data's or --net's)",
                              low=0)
    # The teacher to distil: a hub id (google/ddpm-cifar10-32), a diffusers folder or a checkpoint of this
    # project; 'cached' is the shared 16x16 shapes eps teacher (trained once); '' trains the base model first.
    teacher: str = R.field("", "teacher: hub id, folder, checkpoint, 'cached'; '' = train the base model "
                               "(Alg. 1)")
    # base model (Alg. 1, sec. 4, app. E): the paper's CIFAR-10 settings. OUT/base is continued if unfinished
    # and kept once finished, whatever --resume says (delete it to retrain)
    # pd_cifar10 is app. E's network: 256 channels, mult [1,1,1], 3 res blocks, attention at 16 and 8,
    # res-block resampling, scale-shift norm.
    net: str = R.field("pd_cifar10", "base network preset (app. E: pd_cifar10)", choices=tuple(PRESETS))
    schedule: str = R.field("cosine_logsnr", "base noise schedule (official: cosine log-SNR clipped to +-20)",
                            choices=("cosine_logsnr", "linear", "cosine"))
    param: str = R.field("x", "base network output (sec. 4, table 1)", choices=("x", "v", "eps", "both"))
    # The weightings: trunc_snr; snr_plus_one, the v-MSE; snr, the eps-MSE; const, the x-MSE.
    weighting: str = R.field("trunc_snr", "loss weighting w(lambda) of Alg. 1 and 2 (eps students: snr)",
                             choices=WEIGHTINGS)
    dropout: float = R.field(0.2, "base model dropout (app. E; distillation uses none)", low=0.0, below=1.0)
    # The official code adds a Dense of the one-hot label to the time embedding (= common.add_class).
    class_cond: bool = R.field(False, "class-conditional base model, labels from --data (fig. 4: ImageNet 64)")
    classes: str = R.field("", R.CLASSES_HELP, fixed=False)
    base_updates: int = R.field(800_000, "base model updates (app. E)", low=1, rehearse=2)
    base_batch: int = R.field(128, "base model batch size (app. E)", low=1)
    base_lr: float = R.field(2e-4, "base Adam lr (official cifar_base config; app. E says 3e-4)", low=0.0)
    base_warmup: int = R.field(1000, "base lr warm-up updates (official config)", low=0)
    base_weight_decay: float = R.field(0.001, "base decoupled weight decay (app. E)", low=0.0)
    base_ema: float = R.field(0.9999, "base EMA decay (app. E); students start from the EMA weights", low=0.0,
                              below=1.0)
    base_cache: bool = R.field(False,
                               "train the base model once into the shared cache (DISTILL_CACHE), not in "
                               "OUT/base")
    # distillation (Alg. 2, sec. 5.2, app. E, app. I)
    start_steps: int = R.field(8192, "teacher sampling steps at the start, a power of 2 (sec. 5.2)", low=2)
    end_steps: int = R.field(1, "student sampling steps of the last round, a power of 2", low=1)
    # With 4, the target still comes from two teacher DDIM steps.
    divisor: int = R.field(2, "student steps = teacher steps / divisor: 2 (Alg. 2) or 4 (app. I ablation)",
                           choices=(2, 4))
    updates_per_round: int = R.field(50_000, "updates per round (sec. 5.2: 50k; app. I: 25k, 10k, 5k)", low=1,
                                     rehearse=2)
    final_rounds_factor: int = R.field(2, "update multiplier for the rounds to 2 and 1 steps (sec. 5.2)",
                                       low=1)
    lr: float = R.field(1e-4, "Adam lr, annealed linearly to 0 in each round (app. E; official config: 5e-5)",
                        low=0.0)
    grad_clip: float = R.field(1.0, "clip the global gradient norm (app. E; 0 = off)", low=0.0)
    # pd_cifar10 in fp32 needs ~21 GiB of activations at 128: on a 24 GB card, use 64 or --dtype bf16.
    batch: int = R.field(128, "distillation batch size (app. E), also of sampling", low=1)
    # At that many steps, the re-parameterisation round makes the model 'both' (see the docstring).
    reparam_steps: int = R.field(2, "eps teachers: students predict eps down to this many steps (0 = never)",
                                 low=0)
    reparam_updates: int = R.field(50_000, "updates of the re-parameterisation round", low=1, rehearse=2)
    # auto clips for eps teachers only (measured: see the docstring); yes always; no never, as Alg. 2.
    teacher_clip: str = R.field("auto", "clip x to [-1, 1] in the teacher's two DDIM steps and the student's "
                                        "prediction", choices=("auto", "yes", "no"))
    # evaluation (fig. 4, fig. 7, app. F). Cost in network evaluations: eval_samples x N per model and round
    # (the start-steps reference: eval_samples x start_steps), FID fid_samples x N per model and round
    eval_samples: int = R.field(256, "samples for the RMSE to the start-steps teacher's DDIM output, seeds "
                                     "0..n-1", low=1, rehearse=4)
    # In each row the student at N steps is on the left, the undistilled teacher at N steps on the right, from
    # the same noise.
    grid: int = R.field(8, "samples per model in rounds.png, a row per round (fig. 7, 4)", low=1)
    eval_clip: bool = R.field(True, "clip x_pred to [-1, 1] in evaluation sampling (official eval)")
    # The paper's 50000 mean 50000 x N network evaluations per model.
    fid_samples: int = R.field(0, "FID/IS samples per student (0 = off; the paper: 50000)", low=0,
                               fixed=False, rehearse=32)
    # The 8192-step teacher alone costs 50000 x 8192 = 4e8 evaluations.
    fid_max_steps: int = R.field(512, "FID only models sampled with at most this many steps (fig. 4 stops at "
                                      "512)", low=1, fixed=False)
    fid_teacher: bool = R.field(False, "also FID the undistilled teacher at each round's steps (fig. 4)",
                                fixed=False)
    fid_reference: bool = R.field(False, "also FID the teacher at --start-steps (ignores --fid-max-steps)",
                                  fixed=False)
    # The default: clean-fid's, downloaded once.
    fid_stats: str = R.field("", "cifar10 FID statistics .npz (mu, sigma) for offline machines", fixed=False)
    inception: str = R.field("", "path of the Inception weights for FID/IS (default: download once)",
                             fixed=False)
    # Students and teacher alike; gamma takes the log-variance from the lower (0) to the upper (1) bound.
    stochastic: str = R.field("", "app. F: also sample ancestrally with these comma-separated gammas in "
                                  "[0, 1]", fixed=False)
    # run
    seed: int = R.field(0, "seed")
    device: str = R.field("auto", "auto | cpu | cuda[:N]", fixed=False)
    dtype: str = R.field("fp32", "network precision (schedule algebra fp32, target weights fp64; fp16: with "
                                 "loss scaling)",
                         choices=("fp32", "bf16", "fp16"))
    compile: bool = R.field(False, R.COMPILE_HELP, fixed=False)
    log_every: int = R.field(500, "log every N updates", low=1, fixed=False, rehearse=1)
    ckpt_every: int = R.field(5000, "checkpoint every N updates", low=1, fixed=False, rehearse=1)
    out: str = R.field("runs/progressive", "run directory", fixed=False)
    resume: str = R.field("auto", "auto (continue OUT/ckpt.pt) | none (restart the distillation) | PATH",
                          fixed=False)

# --quick: a paper-style base model (cosine log-SNR, x-prediction, truncated SNR; the 16-channel tiny U-Net)
# on 16x16 shapes, trained once into the shared cache; 16 -> 8 -> 4 -> 2 -> 1 steps in rounds of 200 (400)
# updates, 5x the paper's lr.
QUICK = dict(data="shapes", image_size=16, net="tiny16", dropout=0.0, base_updates=2500, base_batch=16,
             base_lr=1e-3, base_warmup=100, base_weight_decay=0.0, base_ema=0.995, base_cache=True,
             start_steps=16, updates_per_round=200, reparam_updates=300, lr=5e-4, batch=16, eval_samples=64,
             log_every=50, ckpt_every=100, out="runs/progressive_quick")

# ---- evaluation (fig. 4, fig. 7, app. F) ------------------------------------------------------------------

def sampler(den, steps, gamma, clip, classes=None):
    """DDIM on the grid t = i/N the students are trained on, or (gamma: app. F) ancestral sampling on it with
    the log-variance gamma log sigma_{t|s}^2 + (1 - gamma) log sigma~_{s|t}^2, noise (and a conditional
    model's label, uniform or of --classes) per seed."""
    times = sampler_times(den.schedule, steps, skip="unit")
    label = lambda z, seeds: seeded_labels(seeds, den.num_classes, z.device, classes)
    if gamma is None:  # a student's recorded sampler (den.sample)
        return lambda z, seeds: ddim_sample(den, z, times, clip, label(z, seeds)).clamp(-1, 1)
    return lambda z, seeds: ancestral_sample(den, z, times, seeds, gamma, clip, label(z, seeds)).clamp(-1, 1)

def sample_and_score(cfg, name, den, steps, gamma, data, device, fid):
    """Samples from seeds 0..eval_samples-1 (for the RMSE) and, with fid, FID/IS of cfg.fid_samples samples
    in OUT/samples/name, emptied first if it holds another model's samples (a student retrained after a
    restart)."""
    classes = R.eval_classes(cfg.classes, den)
    # --compile: the start-steps reference (8192 steps) too, and FID at the same batch size reuses its graph
    fast = sampler(R.compiled(den, cfg.compile), steps, gamma, cfg.eval_clip, classes)
    with autocast(device, cfg.dtype):
        images = R.generate(fast, range(cfg.eval_samples), data.shape[1:], cfg.batch, device,
                            f"evaluation {name}", R.full_config(cfg).eval_samples)
        if not (fid and cfg.fid_samples):
            return images, {"fid": None, "is": None}
        folder = os.path.join(cfg.out, "samples", name)
        owner = os.path.join(folder, "model.txt")
        stamp = hashlib.sha1(repr((steps, gamma, cfg.eval_clip)).encode())  # the model and its sampler
        for tensor in den.net.state_dict().values():
            stamp.update(tensor.cpu().numpy().tobytes())
        stamp = stamp.hexdigest()
        if R.rank() == 0:
            if os.path.isdir(folder) and (not os.path.exists(owner) or open(owner).read() != stamp):
                shutil.rmtree(folder)
            os.makedirs(folder, exist_ok=True)
            with open(owner, "w") as f:
                f.write(stamp)
        R.barrier()
        R.sample_to_folder(fast, cfg.fid_samples, folder, data.shape[1:], cfg.batch, device,
                           full=R.full_config(cfg).fid_samples)
    ref = R.reference_pngs(cfg.data, cfg.fid_samples, os.path.join(cfg.out, "samples", f"data_{cfg.fid_samples}"),
                           cfg.fid_stats, data)
    return images, R.fid_is(folder, cfg.data, device, inception=cfg.inception or None, ref_folder=ref,
                            stats=cfg.fid_stats or None, full=R.full_config(cfg).fid_samples)

def evaluate(cfg, r, N, student, teacher0, reference, data, device):
    """Round r's rows: the student and the undistilled teacher (None: already evaluated at N) at N steps,
    DDIM and the app. F sampler per gamma, as RMSE to the teacher's start-steps DDIM output from the same
    noise (fig. 4 in teacher-fidelity terms), FID/IS when asked. Returns (rows, the grid row: cfg.grid
    samples of the student, then of the teacher)."""
    rows, grid = [], {}
    for model, den in [("student", student)] + ([("teacher", teacher0)] if teacher0 is not None else []):
        for gamma in [None] + gammas(cfg.stochastic):
            kind = "ddim" if gamma is None else "stochastic"
            name = f"{model}_{N}steps_{den.param}_{kind}" + (f"{gamma:g}" if gamma is not None else "")
            fid = N <= cfg.fid_max_steps and (model == "student" or cfg.fid_teacher)
            images, scores = sample_and_score(cfg, name, den, N, gamma, data, device, fid)
            grid.setdefault(model, images[:cfg.grid])
            rows.append(dict(model=model, steps=N, round=r + 1, param=den.param, sampler=kind, gamma=gamma,
                             rmse_to_reference=rmse(images, reference), **scores))
    return rows, torch.cat([grid["student"], grid.get("teacher", reference[:cfg.grid])])

def gammas(text):
    return [float(g) for g in text.split(",") if g.strip()]

# ---- distillation: one visible loop per round --------------------------------------------------------------

def distill(cfg, spec, teacher0, data, labels, device, ckpt=None):
    """Rounds of Alg. 2 from teacher0 on data (and its labels, for a class-conditional teacher), resumable
    inside a round and across rounds: all resume state is in OUT/ckpt.pt, itself a teacher checkpoint of the
    round's student. Returns the metrics rows."""
    eps = teacher0.param == "eps"
    rounds, full_rounds = (round_schedule(c.start_steps, c.end_steps, c.divisor, c.updates_per_round,
                                          c.final_rounds_factor, c.reparam_steps if eps else 0,
                                          c.reparam_updates)
                           for c in (cfg, R.full_config(cfg)))  # the latter: the full run's, under --rehearse
    clip = cfg.teacher_clip == "yes" or (cfg.teacher_clip == "auto" and eps)
    path = os.path.join(cfg.out, "ckpt.pt")
    if ckpt is None:  # the reference: the original teacher's start-steps DDIM from the evaluation noise
        reference, scores = sample_and_score(cfg, f"teacher_{cfg.start_steps}steps_{teacher0.param}_ddim",
                                             teacher0, cfg.start_steps, None, data, device, cfg.fid_reference)
        results = [dict(model="teacher", steps=cfg.start_steps, round=0, param=teacher0.param, sampler="ddim",
                        gamma=None, rmse_to_reference=0.0, **scores)]
        ckpt = dict(round=0, step=0, results=results, reference=reference, elapsed=0.0,
                    grid_rows=[reference[:cfg.grid].repeat(2, 1, 1, 1)])  # the reference above both halves
    r0, results, reference, grid_rows, elapsed = (ckpt[k] for k in ("round", "results", "reference",
                                                                     "grid_rows", "elapsed"))
    teacher = teacher0 if "teacher" not in ckpt else \
        Denoiser.from_state(ckpt["teacher"], teacher0.source).to(device)  # a later round's teacher

    for r in range(r0, len(rounds)):
        n_teacher, N, updates = rounds[r]
        student = make_student(teacher, N, n_teacher == N, cfg.eval_clip)  # Alg. 2: theta <- eta, new Adam
        trained, fast_teacher = R.compiled(R.data_parallel(student), cfg.compile), \
            R.compiled(teacher, cfg.compile)
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr,  # no weight decay, no EMA (official config)
                               fused=device != "cpu")
        gen, scaler = torch.Generator(device).manual_seed(cfg.seed * 1000 + r), R.grad_scaler(device, cfg.dtype)
        step = 0
        if r == r0 and "optimizer" in ckpt:  # resume inside this round
            student.net.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt.get("scaler", {}))
            step = ckpt["step"]
            R.restore_generator(gen, ckpt["gen"], step)
            R.print0(f"resumed round {r + 1} ({n_teacher} -> {N} steps) at update {step}/{updates}")
        weighting = "snr" if student.param == "eps" else cfg.weighting  # eps students: their teacher's loss
        phase = f"round {r + 1}: {n_teacher} -> {N} steps"
        meter = R.Meter(cfg.out, step, updates, elapsed, device, phase=phase, full_total=full_rounds[r][2])
        while step < updates:
            lr = lr_at(step, cfg.lr, 0, updates, "linear")  # app. E: linear anneal to zero within the round
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = R.sample_batch(data, cfg.batch, gen, labels)
            with autocast(device, cfg.dtype):
                loss = distill_loss(trained, fast_teacher, x, y, N, weighting, gen, n_teacher == N, clip)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            meter.add(loss)
            stop = R.preempted()
            if step % cfg.log_every == 0 or step == updates or stop:
                meter.log(step, {"stage": "distill", "round": r + 1, "steps": N, "param": student.param,
                                 "update": step, "lr": lr}, preempted=stop)
            if step % cfg.ckpt_every == 0 or step == updates or stop:  # the one save: all resume state
                meter.check()  # never a checkpoint after a non-finite loss
                R.save_checkpoint(path, **student.state(), method="progressive",
                                  config=dataclasses.asdict(cfg), round=r, step=step,
                                  optimizer=opt.state_dict(), gen=R.generator_state(gen),
                                  scaler=scaler.state_dict(),
                                  teacher=teacher.state(), results=results, reference=reference,
                                  grid_rows=grid_rows, elapsed=meter.now(), teacher_spec=spec)
            if stop:
                raise R.Preempted(f"round {r + 1}, update {step}")

        # the round's student as a teacher checkpoint, its evaluation; it becomes the next teacher (Alg. 2)
        elapsed = meter.elapsed_s
        student.freeze()
        name = f"student_{N}steps" + ("_reparam" if n_teacher == N else "")
        R.save_checkpoint(os.path.join(cfg.out, f"{name}.pt"), **student.state(), method="progressive",
                          config=dataclasses.asdict(cfg), step=updates, teacher_spec=spec)
        undistilled = teacher0 if n_teacher != N and N != cfg.start_steps else None
        rows, grid = evaluate(cfg, r, N, student, undistilled, reference, data, device)
        results, grid_rows = results + rows, grid_rows + [grid]
        reference_sampler = {"sampler": "ddim_clip" if cfg.eval_clip else "ddim", "steps": cfg.start_steps}
        R.write_metrics(cfg.out, "progressive", cfg.data, spec, reference_sampler, results,
                        finished=r + 1 == len(rounds))
        R.save_grid(torch.cat(grid_rows), os.path.join(cfg.out, "rounds.png"), nrow=2 * cfg.grid)
        rmses = [f"{row['model']} {row['rmse_to_reference']:.4f}" for row in rows if row["sampler"] == "ddim"]
        R.print0(f"round {r + 1}/{len(rounds)}: {N} steps ({student.param}), RMSE {', '.join(rmses)}")
        teacher = student
    return results

# ---- flags, teacher, main ----------------------------------------------------------------------------------

def check(cfg):
    """What argparse cannot check, before any work: one-line ValueErrors."""
    classes = R.dataset_classes(cfg.data)  # checks the name (and that a folder exists)
    if cfg.class_cond and not cfg.teacher and not classes:
        raise ValueError(f"--class-cond: --data {cfg.data} has no class labels; use {R.LABELLED}")
    pow2 = lambda n: n & (n - 1) == 0
    if not (pow2(cfg.start_steps) and pow2(cfg.end_steps) and cfg.end_steps < cfg.start_steps):
        raise ValueError(f"--start-steps {cfg.start_steps} / --end-steps {cfg.end_steps}: expected powers of "
                         "2 with end < start")
    try:
        bad = [g for g in gammas(cfg.stochastic) if not 0 <= g <= 1]
    except ValueError:
        bad = [cfg.stochastic]
    if bad:
        raise ValueError(f"--stochastic {cfg.stochastic!r}: expected comma-separated numbers in [0, 1]")
    for flag, path in (("--fid-stats", cfg.fid_stats), ("--inception", cfg.inception)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    if not cfg.teacher:
        net = PRESETS[cfg.net]
        size = cfg.image_size or R.dataset_size(cfg.data) or net.image_size
        factor = net.patch_size if hasattr(net, "patch_size") else 2 ** (len(net.ch_mult) - 1)
        if size < 8 or size % factor:
            raise ValueError(f"--image-size {size}: the {cfg.net} network needs a multiple of {factor}, >= 8")

def base_config(cfg):
    """The base model's Alg. 1 run into OUT/base (app. E's recipe: the --base-* flags)."""
    size = cfg.image_size or R.dataset_size(cfg.data) or PRESETS[cfg.net].image_size
    return R.TeacherConfig(data=cfg.data, image_size=size, net=cfg.net,
                           dropout=cfg.dropout, class_cond=cfg.class_cond, schedule=cfg.schedule,
                           param=cfg.param, weighting=cfg.weighting, var="fixed_large", updates=cfg.base_updates,
                           batch=cfg.base_batch, lr=cfg.base_lr, warmup=cfg.base_warmup,
                           weight_decay=cfg.base_weight_decay, ema=cfg.base_ema, grad_clip=cfg.grad_clip,
                           seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
                           log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                           sample_steps=min(50, cfg.start_steps),  # its grid: at most as costly as a reference
                           out=os.path.join(cfg.out, "base"), resume="auto")

def get_teacher(cfg, device):
    """(spec, Denoiser) of the start teacher: --teacher, the shared eps teacher, or the base model of Alg. 1
    (OUT/base, continued if unfinished and kept if finished: --resume is the distillation's; or the cache)."""
    if cfg.teacher == "cached":
        spec = R.cached_teacher(R.TeacherConfig(class_cond=cfg.class_cond))
    elif cfg.teacher:
        spec = cfg.teacher
    else:
        base = base_config(cfg)
        spec = R.cached_teacher(base) if cfg.base_cache else \
            R.train_teacher(base, full_updates=R.full_config(cfg).base_updates)
    return spec, R.pixel_teacher(R.load_teacher(spec, device), "progressive.py")

@R.one_writer
def main(argv=None):
    cfg = R.parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0])
    check(cfg)
    device = R.setup_device(cfg.device)
    cfg = R.rehearsal(cfg)  # --rehearse: every count cut, into OUT/rehearsal
    R.check_batch(batch=cfg.batch, **({} if cfg.teacher else {"base_batch": cfg.base_batch}))
    if cfg.fid_samples:
        R.prepare_fid(cfg.data, cfg.inception or None, cfg.fid_stats or None)
    ckpt = R.read_resume(cfg)  # before any work: the base model is trained only for a run that can go on
    if ckpt is not None and R.run_finished(cfg.out):
        R.print0(f"{cfg.out} is finished (metrics.json); pass --resume none or another --out to run it again")
        return R.run_finished(cfg.out)
    spec, teacher0 = get_teacher(cfg, device)
    if teacher0.steps and teacher0.steps != cfg.start_steps:
        raise ValueError(f"{spec} was distilled for {teacher0.steps} steps; pass --start-steps "
                         f"{teacher0.steps}")
    size = net_config(teacher0.net)["image_size"]
    if cfg.image_size not in (0, size):
        raise ValueError(f"the teacher works at {size}x{size}; pass --image-size {size} (or 0)")
    data, labels = R.load_dataset(cfg.data, size, seed=cfg.seed, labels=True)
    labels = R.check_labels(teacher0, labels, cfg.data)  # a conditional teacher's, else None
    R.eval_classes(cfg.classes, teacher0)
    R.start_run(cfg, ckpt, outputs=("samples", "rounds.png", "student_*.pt"), batch=cfg.batch)
    torch.manual_seed(cfg.seed)
    distill(cfg, spec, teacher0, *R.data_to(device, data, labels), device, ckpt)
    return R.run_finished(cfg.out)

if __name__ == "__main__":
    R.cli(main)
