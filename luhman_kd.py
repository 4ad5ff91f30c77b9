"""Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed.
Eric Luhman and Troy Luhman, 2021, arXiv:2101.02388 ("Denoising Student"); official code tcl9876/Denoising_Student.

The method in three lines: (1) draw x_T ~ N(0, I) and run the teacher's deterministic DDIM to get x_0 = F_teacher(x_T),
a fixed synthetic dataset of (x_T, x_0) pairs (sec. 3.1); (2) initialise the student as a copy of the teacher network
at its highest noise level (sec. 3.2); (3) regress the student's single forward pass onto x_0 (eq. 11). One step samples.

Reproduce the paper's CIFAR-10 run (Table 1: FID 9.36, IS 8.36; teacher = 100-step quad DDIM of google/ddpm-cifar10-32):
    python luhman_kd.py --data cifar10 --fid 50000 --fid-teacher true --out runs/luhman_cifar10
  = 1,024,000 + 51,200 pairs (9.9 GB on disk, 107.5M teacher forward passes), then 50k updates at batch 512.
  Each stage alone: --stage pairs | train | eval; every stage resumes where it stopped (--resume auto).
Quick (shapes 16x16, the cached tiny shapes teacher, 10-step quad DDIM, 2,048 pairs, 384 updates at batch 32, CPU):
    python luhman_kd.py --quick

Measured, --quick on 2 CPU cores shared with other jobs (OMP_NUM_THREADS=1: 3 min 23 s wall, 3 min 10 s CPU): on 256
held-out noises the 1-step student's RMSE to the teacher's 10-step output is 0.243 against 0.656 for the teacher's own
1-step DDIM (ratio 0.37; the paper's claim in small, asserted by tests/test_luhman_kd.py, is <= 0.5); at 16x24, a size
never trained on (fig. 13): 0.197 against 0.666. Pairs: 35 pairs/s. Student 373 images/s vs teacher 42 (Table 2 in
small: 50k images in 134 s vs 1199 s). CIFAR-10 not run here (no GPU; 1.075M pairs x 100 steps is GPU work).
"""
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

from common import (DATASETS, TeacherConfig, autocast, build_net, cached_teacher, ddim_sample, ema_update, fid_is,
                    field, generate, load_checkpoint, load_dataset, load_teacher, log_row, lr_at, net_config,
                    parse_config, pick_device, resume_path, rmse, sample_to_folder, sampler_times, save_checkpoint,
                    save_grid, seeded_noise, start_run, write_json, write_metrics, write_pngs, x_eps_from_output)


@dataclasses.dataclass
class Config:
    # teacher (sec. 4): a deterministic DDIM over a pretrained diffusion model
    data: str = field("cifar10", f"dataset the teacher models ({DATASETS}); real images are used only for FID")
    teacher: str = field("", "teacher for load_teacher; '' = google/ddpm-cifar10-32 for cifar10, else the cached "
                             "standard-trained teacher of common.cached_teacher for --data")
    image_size: int = field(0, "size of x_T; 0 = the teacher network's training size")
    teacher_steps: int = field(100, "DDIM steps of the teacher (paper: 100 for CIFAR-10/CelebA, 50 for LSUN)")
    skip: str = field("", "teacher timesteps: quad (starts at 0.8T; official for CIFAR-10/CelebA) | uniform (LSUN) | "
                          "trailing | linspace; '' = quad for cifar10/celeba, uniform otherwise")
    dtype: str = field("fp32", "network precision (autocast): fp32 | bf16; schedule algebra always fp32")
    # synthetic dataset (sec. 3.1)
    num_pairs: int = field(1_024_000, "training pairs (x_T, x_0); pair i uses noise seed --seed + i")
    num_test_pairs: int = field(51_200, "held-out pairs for the test loss (official: 51,200)")
    shard_size: int = field(102_400, "pairs per shard file; a crash loses at most one shard")
    gen_batch: int = field(1024, "teacher batch for pair generation and evaluation (official: 2 x --batch)")
    targets: str = field("round", "x_0 storage: round (uint8, rounded) | trunc (uint8, truncated like the official "
                                  "astype) | float16")
    pairs: str = field("", "pair directory, reusable across runs with the same teacher recipe; '' = OUT/pairs")
    seed: int = field(0, "seed base for every noise draw (see SEED_OFFSET)")
    # student (sec. 3.2) and training (app. B, Table 3, CIFAR-10 column)
    student_param: str = field("official", "official: x0 = x_T - net(x_T, T-1) (unit coefficients, as the code) | "
                                           "exact: the DDPM conversion x0 = (x_T - sigma_T eps)/alpha_T")
    loss: str = field("", "l1 (|.| summed per sample, batch mean; official for CIFAR-10) | l2 (eq. 11, squared, same "
                          "reduction; official elsewhere); '' = l1 for cifar10, l2 otherwise")
    batch: int = field(512, "training batch size")
    updates: int = field(50_000, "parameter updates (25 epochs over 1.024M pairs)")
    lr: float = field(2e-4, "Adam learning rate (CelebA 5e-5, LSUN 5e-6)")
    beta1: float = field(0.9, "Adam beta1 (LSUN 0.98)")
    beta2: float = field(0.98, "Adam beta2 (LSUN 0.999)")
    warmup: int = field(5000, "linear learning-rate warm-up updates, constant afterwards (LSUN 1000)")
    ema: float = field(0.995, "EMA decay (LSUN 0.9995); the EMA with the lowest test loss is kept")
    # evaluation (sec. 4)
    eval_n: int = field(1024, "held-out noise samples for the teacher-fidelity RMSE")
    time_batch: int = field(250, "batch for the Table 2 timing (paper: 250 on a V100); 0 = skip")
    fid: int = field(0, "samples for FID/IS of the student (paper: 50000); 0 = skip")
    fid_teacher: bool = field(False, "also FID/IS of the teacher (costs --teacher-steps x the student)")
    fid_ref: str = field("", "folder of real PNGs for FID on datasets other than cifar10; '' = written from --data")
    inception: str = field("", "path of inception-2015-12-05.pt for offline machines; '' = download once")
    other_size: str = field("", "HxW: also sample at a latent size never trained on (fig. 13), e.g. 32x48")
    # run
    stage: str = field("all", "all | pairs | train | eval")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    log_every: int = field(100, "log the training loss every N updates")
    ckpt_every: int = field(1000, "checkpoint every N updates (and at every epoch end)")
    out: str = field("runs/luhman_kd", "run directory: config.json, log.jsonl, ckpt.pt, best.pt, PNGs, metrics.json")
    resume: str = field("auto", "auto (continue from OUT/ckpt.pt) | none | PATH")


# --quick: the CIFAR-10 recipe in small (quad teacher, official student), on shapes with the cached tiny teacher.
QUICK = dict(data="shapes", image_size=0, teacher_steps=10, skip="quad", num_pairs=2048, num_test_pairs=256, shard_size=512,
             gen_batch=256, batch=32, updates=384, lr=1e-3, warmup=50, ema=0.99, eval_n=256, time_batch=64,
             other_size="16x24", log_every=64, ckpt_every=128, out="runs/luhman_kd_quick")

# Noise seeds: pair i of split s uses seed cfg.seed + SEED_OFFSET[s] + i, so every split (and the FID samples, which
# must not reuse training noise the student has memorised) draws disjoint noise, whatever --num-pairs is.
SEED_OFFSET = {"train": 0, "test": 10 ** 9, "eval": 2 * 10 ** 9, "fid": 3 * 10 ** 9}


# ------------------------------------------------------------------------------------------------------------------
# Teacher: deterministic DDIM (sec. 2.2, eq. 8), no clipping inside the chain; the output is clipped to [-1, 1] once.
# ------------------------------------------------------------------------------------------------------------------

def teacher_times(schedule, steps, skip):
    """The teacher's descending timesteps: quad = int(linspace(0, sqrt(0.8 T), S)^2), 800 -> 0 for T=1000 (the
    official CIFAR-10/CelebA sequence; repeated entries are identity steps), uniform = range(0, T, T//S)."""
    return sampler_times(schedule, steps, skip)


def with_autocast(fn, device, dtype):
    """fn(z) with its network calls under autocast (--dtype); the schedule algebra inside stays fp32."""
    def run(z):
        with autocast(device, dtype):
            return fn(z)
    return run


def teacher_sample(net, schedule, param, x_T, times):
    """F_teacher(x_T): DDIM through `times`, then the last step to x_0; (B,C,H,W) -> (B,C,H,W) in [-1, 1].
    With times[:1] this is the teacher's own 1-step DDIM from the same start (its first x-prediction)."""
    return ddim_sample(net, schedule, param, x_T, times, clip=False).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------------------
# Synthetic dataset (sec. 3.1): shards of records (x_T float16, x_0 uint8), one .npy each, written atomically.
# ------------------------------------------------------------------------------------------------------------------

def quantize(x_0, targets):
    """x_0 in [-1, 1] -> the stored target. 'trunc' is the official utils.float_to_image (x*127.5 + 127.5 cast to
    uint8, which truncates: a bias of -0.5 levels); 'round' is unbiased and matches common.to_uint8 (PNGs, FID)."""
    if targets == "float16":
        return x_0.clamp(-1, 1).half()
    y = x_0.clamp(-1, 1) * 127.5 + 127.5
    return (y.round() if targets == "round" else y.floor()).to(torch.uint8)


def dequantize(y):
    """Stored target -> float [-1, 1] (official training.train_pyfunc: y/127.5 - 1)."""
    return y.float() / 127.5 - 1.0 if y.dtype == torch.uint8 else y.float()


def record_dtype(shape, targets):
    return np.dtype([("x_T", np.float16, shape), ("x_0", np.float16 if targets == "float16" else np.uint8, shape)])


def shard_path(pairs_dir, split, k):
    return os.path.join(pairs_dir, f"{split}_{k:05d}.npy")


def shard_sizes(n, shard_size):
    return [(k, min(shard_size, n - k * shard_size)) for k in range(math.ceil(n / shard_size))]


def shard_done(path, n):
    return os.path.exists(path) and len(np.load(path, mmap_mode="r")) == n


@torch.no_grad()
def generate_pairs(cfg, net, info, times, shape, device):
    """Write cfg.num_pairs training and cfg.num_test_pairs held-out pairs (x_T, F_teacher(x_T)) into cfg.pairs.
    Pair i of a split depends only on its seed; finished shards are skipped, so a rerun resumes."""
    recipe = dict(teacher=cfg.teacher, teacher_steps=cfg.teacher_steps, skip=cfg.skip, times=times, dtype=cfg.dtype,
                  targets=cfg.targets, seed=cfg.seed, shard_size=cfg.shard_size, shape=list(shape))
    os.makedirs(cfg.pairs, exist_ok=True)
    meta = os.path.join(cfg.pairs, "meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            old = json.load(f)
        diff = sorted(k for k in recipe if old.get(k) != recipe[k])
        if diff:
            raise SystemExit(f"{cfg.pairs} holds pairs made with other {', '.join(diff)}; pass another --pairs or "
                             f"delete that folder")
    write_json(meta, recipe)
    rec_dtype = record_dtype(shape, cfg.targets)
    jobs = [(split, k, n) for split, total in (("train", cfg.num_pairs), ("test", cfg.num_test_pairs))
            for k, n in shard_sizes(total, cfg.shard_size)]
    todo = [(split, k, n) for split, k, n in jobs if not shard_done(shard_path(cfg.pairs, split, k), n)]
    n_todo, n_all = sum(n for *_, n in todo), cfg.num_pairs + cfg.num_test_pairs
    free = shutil.disk_usage(cfg.pairs).free
    print(f"pairs: {n_all:,} x {rec_dtype.itemsize} B (float16 x_T + {cfg.targets} x_0) = "
          f"{n_all * rec_dtype.itemsize / 1e9:.2f} GB in {len(jobs)} shards; {n_todo:,} pairs "
          f"({n_todo * rec_dtype.itemsize / 1e9:.2f} GB) to generate with {len(times)} teacher steps each; "
          f"{free / 1e9:.1f} GB free in {cfg.pairs}", flush=True)
    if n_todo * rec_dtype.itemsize > free:
        raise SystemExit(f"not enough disk in {cfg.pairs}; free some space or pass --pairs on a larger disk")
    F_teacher = with_autocast(lambda z: teacher_sample(net, info["schedule"], info["param"], z, times), device, cfg.dtype)
    done, t0 = 0, time.time()
    for split, k, n in todo:
        seeds = [cfg.seed + SEED_OFFSET[split] + k * cfg.shard_size + i for i in range(n)]
        rec = np.empty(n, rec_dtype)
        for i in range(0, n, cfg.gen_batch):
            x_T = seeded_noise(seeds[i:i + cfg.gen_batch], shape, device)              # (b, C, H, W) float32
            x_0 = F_teacher(x_T)
            rec["x_T"][i:i + len(x_T)] = x_T.half().cpu().numpy()
            rec["x_0"][i:i + len(x_T)] = quantize(x_0, cfg.targets).cpu().numpy()
            done += len(x_T)
            rate = done / (time.time() - t0)
            print(f"\r{split} shard {k}: {done:,}/{n_todo:,} pairs, {rate:.1f} pairs/s, "
                  f"ETA {(n_todo - done) / rate / 60:.1f} min", end="", file=sys.stderr, flush=True)
        path = shard_path(cfg.pairs, split, k)
        with open(path + ".tmp", "wb") as f:                                           # atomic: tmp, then rename
            np.save(f, rec)
        os.replace(path + ".tmp", path)
    if todo:
        print(file=sys.stderr)
        log_row(cfg.out, {"stage": "pairs", "pairs": n_todo, "pairs_per_s": n_todo / (time.time() - t0)})


def open_pairs(pairs_dir, split, n, shard_size):
    """The first n pairs of a split as a list of memory-mapped shards (np.load(mmap_mode='r'))."""
    shards = []
    for k, size in shard_sizes(n, shard_size):
        path = shard_path(pairs_dir, split, k)
        if not shard_done(path, size):
            raise SystemExit(f"{path} is missing or incomplete; run --stage pairs first (it resumes)")
        shards.append(np.load(path, mmap_mode="r"))
    return shards


def fetch(shards, idx, shard_size, device):
    """Pairs idx (global indices) -> (x_T, x_0) float32 on the device, (B, C, H, W) each, in sorted index order."""
    idx = np.sort(np.asarray(idx))
    rec = np.concatenate([shards[k][idx[idx // shard_size == k] - k * shard_size] for k in np.unique(idx // shard_size)])
    x_T, x_0 = (torch.from_numpy(np.ascontiguousarray(rec[k])) for k in ("x_T", "x_0"))
    if device.startswith("cuda"):                                                      # no host stall per step
        x_T, x_0 = x_T.pin_memory(), x_0.pin_memory()
    return x_T.to(device, non_blocking=True).float(), dequantize(x_0.to(device, non_blocking=True))


def epoch_order(n, seed, epoch):
    """The shuffled pair order of one epoch, a function of (seed, epoch) only: resuming needs no loader state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()


# ------------------------------------------------------------------------------------------------------------------
# Student (sec. 3.2) and its objective (eq. 10-11, app. B)
# ------------------------------------------------------------------------------------------------------------------

def make_student(teacher_net):
    """Same architecture and weights as the teacher network eps_theta (sec. 3.2), trainable."""
    return copy.deepcopy(teacher_net).train().requires_grad_(True)


def student_x0(net, x_T, schedule, param, student_param):
    """F_student(x_T) (sec. 3.2): the network conditioned on the highest noise level t = T-1 (the official 999.0,
    although the quad teacher starts at 800) predicts the noise, which is subtracted from x_T. 'official' subtracts
    it with unit coefficients, x0 = x_T - eps; 'exact' uses the DDPM conversion (x_T - sigma_T eps)/alpha_T, which at
    initialisation is the teacher's 1-step DDIM from T-1 but divides by alpha_T = 0.0064 for the linear schedule."""
    t = schedule.time(1.0)                                                             # T - 1 (or 1.0 if continuous)
    out = net(x_T, schedule.net_time(torch.full((len(x_T),), float(t))).to(x_T.device)).float()
    if student_param == "official":
        return x_T - out[:, :x_T.shape[1]]
    alpha, sigma = schedule.alpha_sigma(t)
    return x_eps_from_output(out, x_T, alpha.to(x_T.device), sigma.to(x_T.device), param)[0]


def student_loss(x0_hat, x_0, kind):
    """Per-sample loss (B,): eq. 11 (l2, the KL between unit-variance Gaussians up to 1/2 and a constant) or the
    L1 the paper found better on CIFAR-10 (app. B); summed over pixels, as the official code (then batch mean)."""
    diff = (x0_hat.float() - x_0).flatten(1)
    return diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1)


# ------------------------------------------------------------------------------------------------------------------
# Training: Adam with warm-up, EMA, test loss of the EMA after every epoch, the best EMA kept (official code)
# ------------------------------------------------------------------------------------------------------------------

def save_student(path, cfg, info, net, ema, opt, step, elapsed, best):
    """One self-describing checkpoint (loadable by load_teacher: its EMA weights, the teacher's schedule)."""
    save_checkpoint(path, net_config=net_config(net), model=net.state_dict(), ema=ema.state_dict(),
                    schedule=info["schedule"].spec(), param=info["param"], var=info["var"], steps=1,
                    method="luhman_kd", student_param=cfg.student_param, config=dataclasses.asdict(cfg),
                    optimizer=opt.state_dict() if opt else None, step=step, elapsed=elapsed, best_test=best)


@torch.no_grad()
def test_loss(ema, test_set, cfg, info, device):
    """Mean per-sample loss of the EMA student on the held-out pairs (one host sync)."""
    total = torch.zeros((), device=device)
    for i in range(0, cfg.num_test_pairs, cfg.batch):
        x_T, x_0 = fetch(test_set, np.arange(i, min(i + cfg.batch, cfg.num_test_pairs)), cfg.shard_size, device)
        with autocast(device, cfg.dtype):
            x0_hat = student_x0(ema, x_T, info["schedule"], info["param"], cfg.student_param)
        total += student_loss(x0_hat, x_0, cfg.loss).sum()
    return total.item() / cfg.num_test_pairs


def train(cfg, teacher_net, info, device):
    schedule, param = info["schedule"], info["param"]
    train_set = open_pairs(cfg.pairs, "train", cfg.num_pairs, cfg.shard_size)
    test_set = open_pairs(cfg.pairs, "test", cfg.num_test_pairs, cfg.shard_size)
    per_epoch = cfg.num_pairs // cfg.batch                                             # last partial batch dropped
    if per_epoch == 0:
        raise SystemExit(f"--batch {cfg.batch} exceeds --num-pairs {cfg.num_pairs}; lower --batch")
    net = make_student(teacher_net).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    step, elapsed, best = 0, 0.0, float("inf")
    path, best_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "best.pt")
    if resume_path(cfg.out, cfg.resume):                                               # the data order is a
        ckpt = load_checkpoint(resume_path(cfg.out, cfg.resume))                       # function of the step
        if ckpt.get("optimizer") is None:
            raise SystemExit(f"--resume {cfg.resume}: no optimizer state (best.pt?); resume from a ckpt.pt")
        net.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        step, elapsed, best = ckpt["step"], ckpt["elapsed"], ckpt["best_test"]
        print(f"resumed at update {step} (best test loss {best:.4g})", flush=True)
    loss_sum, t0, order = torch.zeros((), device=device), time.time(), None
    while step < cfg.updates:
        epoch, i = divmod(step, per_epoch)
        if i == 0 or order is None:
            order = epoch_order(cfg.num_pairs, cfg.seed, epoch)
        x_T, x_0 = fetch(train_set, order[i * cfg.batch:(i + 1) * cfg.batch], cfg.shard_size, device)  # (B,C,H,W)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup)                                  # warm-up, then constant
        with autocast(device, cfg.dtype):
            x0_hat = student_x0(net, x_T, schedule, param, cfg.student_param)
        loss = student_loss(x0_hat, x_0, cfg.loss).mean()                              # no gradient clipping (app. B)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, net, cfg.ema)
        step += 1
        loss_sum += loss.detach()
        if step % cfg.log_every == 0 or step == cfg.updates:
            dt, n = time.time() - t0, step % cfg.log_every or cfg.log_every
            elapsed, t0 = elapsed + dt, time.time()
            log_row(cfg.out, {"stage": "train", "step": step, "loss": loss_sum.item() / n, "lr": g["lr"],
                              "images_per_s": n * cfg.batch / dt, "elapsed_s": elapsed})
            loss_sum.zero_()
        epoch_end = step % per_epoch == 0 or step == cfg.updates
        if epoch_end:                                                                  # early stopping on test loss
            loss_test = test_loss(ema, test_set, cfg, info, device)
            if loss_test < best:
                best = loss_test
                save_student(best_path, cfg, info, net, ema, None, step, elapsed, best)
            log_row(cfg.out, {"stage": "test", "step": step, "epoch": step / per_epoch, "test_loss": loss_test,
                              "best_test_loss": best})
        if epoch_end or step % cfg.ckpt_every == 0:
            save_student(path, cfg, info, net, ema, opt, step, elapsed, best)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation (sec. 4): teacher fidelity, Table 2 timing, grids, fig. 6 interpolation, fig. 13 other size, FID/IS
# ------------------------------------------------------------------------------------------------------------------

def slerp(z0, z1, a):
    """Spherical interpolation between two latents (fig. 6, as Song et al. 2021 for DDIM)."""
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def images_per_second(sample_fn, shape, batch, device, repeats):
    z = torch.randn(batch, *shape, device=device)
    sample_fn(z[:2])                                                                   # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(repeats):
        sample_fn(z)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return repeats * batch / (time.time() - t0)


@torch.no_grad()
def evaluate(cfg, teacher_net, info, times, shape, device):
    schedule, param = info["schedule"], info["param"]
    paths = [p for p in (os.path.join(cfg.out, n) for n in ("best.pt", "ckpt.pt")) if os.path.exists(p)]
    if not paths:
        raise SystemExit(f"no student checkpoint in {cfg.out}; run --stage train first")
    ckpt = load_checkpoint(paths[0])                                                   # the best EMA (official)
    student = build_net(ckpt["net_config"])
    student.load_state_dict(ckpt["ema"])
    student = student.to(device).eval()
    F_student = with_autocast(lambda z: student_x0(student, z, schedule, param, ckpt["student_param"]).clamp(-1, 1),
                              device, cfg.dtype)
    F_teacher = with_autocast(lambda z: teacher_sample(teacher_net, schedule, param, z, times), device, cfg.dtype)
    F_teacher_1 = with_autocast(lambda z: teacher_sample(teacher_net, schedule, param, z, times[:1]), device, cfg.dtype)

    # Teacher fidelity on held-out noise: the student's 1 step vs the teacher's own 1-step DDIM from the same x_T.
    seeds = [cfg.seed + SEED_OFFSET["eval"] + i for i in range(cfg.eval_n)]
    x_ref = generate(F_teacher, seeds, shape, cfg.gen_batch, device)                  # (eval_n, C, H, W)
    x_one = generate(F_teacher_1, seeds, shape, cfg.gen_batch, device)
    x_stu = generate(F_student, seeds, shape, cfg.gen_batch, device)
    rows = [dict(model="teacher", steps=len(times), rmse_to_reference=0.0),
            dict(model="teacher", steps=1, rmse_to_reference=rmse(x_one, x_ref)),
            dict(model="student", steps=1, rmse_to_reference=rmse(x_stu, x_ref), test_loss=ckpt["best_test"],
                 updates=ckpt["step"])]
    for row in rows:
        row.update(fid=None, **{"is": None})
    save_grid(x_stu[:64], os.path.join(cfg.out, "samples_student.png"))
    save_grid(x_ref[:64], os.path.join(cfg.out, "samples_teacher.png"))               # same noise, side by side
    save_grid(x_one[:64], os.path.join(cfg.out, "samples_teacher_1step.png"))

    # Fig. 6: slerp between pairs of latents, 4 rows x 10 points.
    z = seeded_noise([cfg.seed + SEED_OFFSET["eval"] + i for i in range(8)], shape, device)
    zs = torch.stack([slerp(z[2 * r], z[2 * r + 1], a) for r in range(4) for a in torch.linspace(0, 1, 10).tolist()])
    save_grid(F_student(zs), os.path.join(cfg.out, "interpolation.png"), nrow=10)

    # Table 2: time to generate 50k images, student (1 evaluation) vs teacher (len(times) evaluations).
    if cfg.time_batch:
        for row, fn, repeats in ((rows[2], F_student, 10), (rows[0], F_teacher, 1)):
            row["images_per_s"] = images_per_second(fn, shape, cfg.time_batch, device, repeats)
            row["time_50k_s"] = 50_000 / row["images_per_s"]

    # Fig. 13: a latent size the student (and teacher) never saw.
    if cfg.other_size:
        h, w = (int(v) for v in cfg.other_size.lower().split("x"))
        other = (shape[0], h, w)
        o_ref = generate(F_teacher, seeds[:16], other, cfg.gen_batch, device)
        o_stu, o_one = generate(F_student, seeds[:16], other, cfg.gen_batch, device), \
            generate(F_teacher_1, seeds[:16], other, cfg.gen_batch, device)
        save_grid(torch.cat([o_ref, o_stu]), os.path.join(cfg.out, "other_size.png"))  # top: teacher, bottom: student
        rows += [dict(model="teacher", steps=1, rmse_to_reference=rmse(o_one, o_ref), image_size=[h, w]),
                 dict(model="student", steps=1, rmse_to_reference=rmse(o_stu, o_ref), image_size=[h, w])]

    # FID / IS (Table 1), 50k samples on noise seeds no training pair used.
    if cfg.fid:
        ref = None if cfg.data == "cifar10" else \
            cfg.fid_ref or write_pngs(load_dataset(cfg.data, cfg.image_size), os.path.join(cfg.out, "fid_real"))
        for row, fn, name in ((rows[2], F_student, "student"), (rows[0], F_teacher, "teacher")):
            if name == "teacher" and not cfg.fid_teacher:
                continue
            folder = sample_to_folder(fn, cfg.fid, os.path.join(cfg.out, f"fid_{name}"), shape, cfg.gen_batch,
                                      device, seed0=cfg.seed + SEED_OFFSET["fid"])
            scores = fid_is(folder, cfg.data, device, inception=cfg.inception or None, ref_folder=ref)
            row.update(fid=scores["fid"], fid_clean=scores["fid_clean"], **{"is": scores["is"]})

    write_metrics(cfg.out, "luhman_kd", cfg.data, cfg.teacher,
                  {"sampler": f"ddim_{cfg.skip}", "steps": len(times)}, rows)
    for row in rows:
        log_row(cfg.out, {"stage": "eval", **{k: v for k, v in row.items() if v is not None}})
    ratio = rows[2]["rmse_to_reference"] / rows[1]["rmse_to_reference"]
    print(f"student 1-step RMSE / teacher 1-step DDIM RMSE = {ratio:.3f} (paper's claim in small: <= 0.5)", flush=True)
    with open(os.path.join(cfg.out, "metrics.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------------

def resolve(cfg):
    """Fill the '' defaults that depend on the dataset; one-line errors for bad values."""
    for name, value, allowed in (("stage", cfg.stage, ("all", "pairs", "train", "eval")), ("dtype", cfg.dtype,
                                 ("fp32", "bf16")), ("targets", cfg.targets, ("round", "trunc", "float16")),
                                 ("student-param", cfg.student_param, ("official", "exact")),
                                 ("loss", cfg.loss, ("", "l1", "l2"))):
        if value not in allowed:
            raise SystemExit(f"--{name} {value!r}: expected one of {', '.join(a for a in allowed if a)}")
    if cfg.other_size and not re.fullmatch(r"\d+x\d+", cfg.other_size.lower()):
        raise SystemExit(f"--other-size {cfg.other_size!r}: expected HxW, e.g. 32x48")
    paper = cfg.data == "cifar10" or "celeba" in cfg.data.lower()
    teacher = cfg.teacher or ("google/ddpm-cifar10-32" if cfg.data == "cifar10" else cached_teacher(
        TeacherConfig(data=cfg.data, image_size=cfg.image_size or TeacherConfig.image_size)))
    return dataclasses.replace(cfg, teacher=teacher, skip=cfg.skip or ("quad" if paper else "uniform"),
                               loss=cfg.loss or ("l1" if cfg.data == "cifar10" else "l2"),
                               pairs=cfg.pairs or os.path.join(cfg.out, "pairs"))


def main(argv=None):
    cfg = resolve(parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0]))
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net, info = load_teacher(cfg.teacher, device)
    if cfg.student_param == "official" and info["param"] != "eps":
        raise SystemExit(f"--student-param official reads the output as eps; this teacher predicts "
                         f"{info['param']}: use --student-param exact")
    cfg = dataclasses.replace(cfg, image_size=cfg.image_size or net_config(net)["image_size"])
    start_run(cfg.out, cfg)
    shape = (3, cfg.image_size, cfg.image_size)
    times = teacher_times(info["schedule"], cfg.teacher_steps, cfg.skip)
    print(f"teacher {cfg.teacher}: {len(times)}-step DDIM ({cfg.skip}) from t={times[0]}; student at t=T-1", flush=True)
    if cfg.stage in ("all", "pairs"):
        generate_pairs(cfg, net, info, times, shape, device)
    if cfg.stage in ("all", "train"):
        train(cfg, net, info, device)
    if cfg.stage in ("all", "eval"):
        return evaluate(cfg, net, info, times, shape, device)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:                                                            # common.py's one-line errors
        sys.exit(f"error: {e}")
