"""Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed ("Denoising Student").
Eric Luhman and Troy Luhman, 2021, arXiv:2101.02388; code tcl9876/Denoising_Student.

(1) The teacher's deterministic DDIM maps noise x_T to x_0 = F_teacher(x_T): a fixed dataset of pairs (sec.
3.1). (2) The student starts as the teacher network at its top noise level (sec. 3.2). (3) Its one forward
pass regresses onto x_0 (eq. 11): one network evaluation samples.
    python luhman_kd.py --data cifar10 --fid 50000 --fid-teacher true --out runs/luhman_cifar10   # Table 1
    python luhman_kd.py --quick                                                                  # CPU
Unset training flags come from the app. B table 3 column that --data or --recipe picks (see --help);
--stage pairs|train|eval runs one stage, and every stage resumes.
Departures from the official code, each a flag (docs/luhman_kd.md): 1.024M pairs for LSUN too (sec. 3.1;
--num-pairs 204800 gives the code's); table 3's 64k CelebA updates (the code: 70k); x_0 rounded to uint8
(the code truncates: --targets trunc). As the code: x0 = x_T - net(x_T, T-1) (--student-param exact: the DDPM
conversion), no dropout (app. B), the EMA of lowest held-out test loss kept.
"""
import contextlib, dataclasses, math, os, re, shutil, time

import numpy as np
import torch

from common import (SKIPS, autocast, build_net, check_steps, ddim_sample, ema_update, lr_at, net_config, rmse,
                    sampler_spec, sampler_times, seeded_labels, seeded_noise, to_float)

import runtime as R

# ---- The method: F_teacher (sec. 2.2), F_student (sec. 3.2), the loss (eq. 10-11, app. B) -----------------

def teacher_x0(teacher, x_T, times, y=None):
    """F_teacher(x_T): deterministic DDIM (eq. 8) through `times`, then the last step to x_0; unclipped inside
    the chain, clipped to [-1, 1] once (official). With times[:1]: the teacher's own 1-step DDIM. y: the
    labels of a class-conditional teacher, a pair's part as x_T is."""
    return ddim_sample(teacher, x_T, times, y=y).clamp(-1, 1)

def make_student(teacher, student_param):
    """The teacher network's architecture and weights, trainable (sec. 3.2), without dropout (app. B: "We did
    not use dropout"; Ho et al.'s CIFAR-10 network has 0.1). 'official' reads the output as x0 = x_T - out."""
    net = build_net(net_config(teacher.net), dropout=0.0)
    net.load_state_dict(teacher.net.state_dict())
    param = "resid" if student_param == "official" else teacher.param
    one_step = sampler_spec([teacher.schedule.time(1.0)], clip=True)   # student_x0, clipped as evaluated
    return teacher.copy(net=net, param=param, sampler=one_step).to(next(teacher.parameters()).device)

def student_x0(student, x_T, y=None):
    """F_student(x_T): one evaluation at the top noise level t = T-1 (official: 999.0). 'resid' subtracts the
    eps-like output with unit coefficients (official); the exact conversion (x_T - sigma_T eps)/alpha_T is
    the teacher's 1-step DDIM at initialisation but divides by alpha_T = 0.0064 (linear schedule)."""
    return student(x_T, student.schedule.time(1.0), y=y)[0]

def student_loss(x0_hat, x_0, kind):
    """Per-sample loss (B,): eq. 11 (l2, the KL between unit-variance Gaussians up to 1/2 and a constant) or
    the L1 the paper found better on CIFAR-10 (app. B); summed over pixels as the official code."""
    diff = (x0_hat.float() - x_0).flatten(1)
    return diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1)

# ---- flags -------------------------------------------------------------------------------------------------

# App. B table 3, sec. 4 (teacher steps, timesteps), app. B (L1 on CIFAR-10) and the official get_settings
# (held-out pairs; the test loss after every epoch, or every 80 shards of 2,560 pairs for LSUN). Teachers: Ho
# et al.'s EMA weights, as the official h5 files.
RECIPES = ("cifar10", "celeba", "lsun_bedroom", "lsun_church")
TABLE3 = dict(batch=(512, 512, 32, 32), updates=(50_000, 64_000, 320_000, 256_000),
              lr=(2e-4, 5e-5, 5e-6, 5e-6), beta1=(0.9, 0.9, 0.98, 0.98), beta2=(0.98, 0.98, 0.999, 0.999),
              ema=(0.995, 0.995, 0.9995, 0.9995), warmup=(5000, 5000, 1000, 1000),
              teacher_steps=(100, 100, 50, 50), skip=("quad", "quad", "uniform", "uniform"),
              loss=("l1", "l2", "l2", "l2"), num_test_pairs=(51_200, 10_240, 2560, 2560),
              test_every=(2000, 2000, 6400, 6400))
TEACHERS = ("google/ddpm-cifar10-32", "", "google/ddpm-ema-bedroom-256", "google/ddpm-ema-church-256")

def by_recipe(key, help, **kw):
    """A flag whose default comes from the recipe; --help lists every recipe's value."""
    values = ", ".join(f"{r} {v:g}" if isinstance(v, float) else f"{r} {v}"
                       for r, v in zip(RECIPES, TABLE3[key]))
    return R.field(None, f"{help}; unset = the recipe's ({values})", **kw)

@dataclasses.dataclass
class Config:
    # teacher (sec. 4): a deterministic DDIM over a pretrained diffusion model
    data: str = R.field("cifar10", f"dataset ({R.DATASETS}): picks the recipe; images for FID only")
    recipe: str = R.field("auto", "app. B table 3 column for flags left unset; auto = from --data "
                          "(shapes: cifar10)", choices=("auto", *RECIPES))
    # The recipes' teachers (TEACHERS): cifar10 google/ddpm-cifar10-32, celeba none (convert ermongroup/ddim
    # celeba), lsun_bedroom google/ddpm-ema-bedroom-256, lsun_church google/ddpm-ema-church-256.
    teacher: str = R.field("", "load_teacher spec; '' = the recipe's, for shapes the cached shapes teacher")
    # A conditional teacher's pairs carry a label each, drawn from the pair's seed as its x_T.
    class_cond: bool = R.field(False, "the class-conditional cached shapes teacher (any --teacher: its own)")
    classes: str = R.field("", R.CLASSES_HELP, fixed=False)
    image_size: int = R.field(0, "size of x_T; 0 = the teacher network's training size", low=0)
    teacher_steps: int = by_recipe("teacher_steps", "DDIM steps of the teacher", low=1)
    skip: str = by_recipe("skip", "teacher timesteps (quad: from 0.8 T)", choices=SKIPS)
    dtype: str = R.field("fp32", "network precision (autocast); schedules in fp32", choices=("fp32", "bf16"))
    compile: bool = R.field(False, R.COMPILE_HELP, fixed=False)
    # synthetic dataset (sec. 3.1)
    num_pairs: int = R.field(1_024_000, "training pairs (sec. 3.1: 1.024M for every dataset)", low=1,
                             rehearse=lambda c: min(c.num_pairs,
                                                    max(c.batch, 2 * c.gen_batch * R.world_size())))
    num_test_pairs: int = by_recipe("num_test_pairs", "held-out pairs; 0 = no early stopping", low=0,
                                    rehearse=lambda c: min(c.num_test_pairs, c.batch))
    gen_batch: int = R.field(1024, "teacher batch (a crash loses one batch of pairs)", low=1, fixed=False)
    targets: str = R.field("round", "x_0 to uint8: round | trunc (official)", choices=("round", "trunc"))
    pairs: str = R.field("", "pair folder, shared by runs of one teacher recipe; '' = OUT/pairs", fixed=False,
                         rehearse=lambda c: os.path.join(c.out, "rehearsal", "pairs"))
    seed: int = R.field(0, "seed s: the data order; the noise of seeds s*10^10 on", low=0)
    # student (sec. 3.2) and training (app. B)
    student_param: str = R.field("official", "official: x0 = x_T - net(x_T, T-1) (the code) | exact: the "
                                 "teacher's own read-out", choices=("official", "exact"))
    loss: str = by_recipe("loss", "per-sample |.| or (.)^2 summed over pixels", choices=("l1", "l2"))
    batch: int = by_recipe("batch", "batch size", low=1)
    accum: int = R.field(1, "gradient accumulation: the batch in N parts (less memory)", low=1, fixed=False)
    updates: int = by_recipe("updates", "parameter updates (constant lr: extensible)", low=1, fixed=False,
                             rehearse=2)
    lr: float = by_recipe("lr", "Adam learning rate", low=0.0)
    beta1: float = by_recipe("beta1", "Adam beta1", low=0.0, below=1.0)
    beta2: float = by_recipe("beta2", "Adam beta2", low=0.0, below=1.0)
    warmup: int = by_recipe("warmup", "linear warm-up updates", low=0)
    ema: float = by_recipe("ema", "EMA decay; the EMA of lowest test loss is kept", low=0.0, below=1.0)
    test_every: int = by_recipe("test_every", "test loss of the EMA every N updates", low=1, rehearse=1)
    # evaluation (sec. 4)
    # The first 8 make fig. 6's interpolations.
    eval_n: int = R.field(1024, "held-out noise samples for the teacher-fidelity RMSE and fig. 6", low=8,
                          fixed=False, rehearse=8)
    time_batch: int = R.field(250, "batch of the Table 2 timing (paper: 250); 0 = skip", low=0, fixed=False)
    fid: int = R.field(0, "samples for FID/IS of the student (paper: 50000); 0 = skip", low=0, fixed=False,
                       rehearse=32)
    fid_teacher: bool = R.field(False, "also FID/IS of the teacher (--teacher-steps x the cost)", fixed=False)
    fid_ref: str = R.field("", "real PNGs for FID; '' = clean-fid's (cifar10) or --data's", fixed=False)
    fid_stats: str = R.field("", "cifar10 statistics .npz (mu, sigma), offline; '' = download", fixed=False)
    inception: str = R.field("", "inception-2015-12-05.pt, offline; '' = download", fixed=False)
    other_size: str = R.field("", "HxW: also sample at a size never trained on (fig. 13)", fixed=False)
    # run
    stage: str = R.field("all", "what to run", choices=("all", "pairs", "train", "eval"), fixed=False)
    device: str = R.field("auto", "auto | cpu | cuda[:N]", fixed=False)
    log_every: int = R.field(100, "log the training loss every N updates", low=1, fixed=False, rehearse=1)
    ckpt_every: int = R.field(1000, "checkpoint every N updates (and at every test)", low=1, fixed=False,
                              rehearse=1)
    out: str = R.field("runs/luhman_kd", "run directory (config.json, log.jsonl, *.pt, metrics)", fixed=False)
    resume: str = R.field("auto", "auto (continue OUT/ckpt.pt) | none (keeps the pairs) | PATH", fixed=False)

# --quick: CIFAR-10's teacher sampler and student in small, eq. 11's L2, on the cached shapes teacher.
QUICK = dict(data="shapes", recipe="cifar10", teacher_steps=10, num_pairs=2048, num_test_pairs=256,
             gen_batch=256, loss="l2", batch=32, updates=384, lr=1e-3, warmup=50, ema=0.99, test_every=64,
             eval_n=256, time_batch=64, other_size="16x24", log_every=64, ckpt_every=128,
             out="runs/luhman_kd_quick")

# ---- Synthetic dataset (sec. 3.1) --------------------------------------------------------------------------
# OUT/pairs/{train,test}.npy: a preallocated memory-mapped record array per split (x_T float16, x_0 uint8);
# meta.json: the teacher recipe and the pairs done per split, counted once each --gen-batch chunk is on disk
# (a crash loses at most one chunk). Seed s owns the noise seeds [s 10^10, (s+1) 10^10), each split 10^9 of
# them (FID samples must not reuse the training noise the student has memorised): --seed values share none.
SEED_STRIDE, SPLIT = 10 ** 10, 10 ** 9
OFFSET = {"train": 0, "test": SPLIT, "eval": 2 * SPLIT, "fid": 3 * SPLIT}

def noise_seeds(seed, split, start, stop):
    return [seed * SEED_STRIDE + OFFSET[split] + i for i in range(start, stop)]

def quantize(x_0, targets):
    """x_0 in [-1, 1] -> uint8. 'trunc' is the official float_to_image (x*127.5 + 127.5 cast to uint8, which
    truncates: a bias of -0.5 level); 'round' is unbiased and matches common.to_uint8 (PNGs, FID)."""
    y = x_0.clamp(-1, 1) * 127.5 + 127.5
    return (y.round() if targets == "round" else y.floor()).to(torch.uint8)

def pairs_recipe(cfg, spec, times, shape, classes=0):
    """What the pairs depend on; a pair folder of another recipe is refused (generation and training)."""
    return dict(teacher=spec, teacher_steps=cfg.teacher_steps, skip=cfg.skip, times=list(times),
                dtype=cfg.dtype, targets=cfg.targets, seed=cfg.seed, shape=list(shape),
                **({"classes": classes} if classes else {}))

def read_meta(pairs, recipe):
    """The pairs written per split ({'train': n, 'test': n}); None for a new folder."""
    if not os.path.exists(os.path.join(pairs, "meta.json")):
        return None
    meta = R.read_file(os.path.join(pairs, "meta.json"), "pair meta file")
    diff = [k for k in recipe if meta.get(k) != recipe[k]]
    if diff:
        raise ValueError(f"{pairs} holds pairs made with other {', '.join(diff)}; pass another --pairs")
    return meta["done"]

def pair_array(pairs, split, n, dtype=None):
    """A split's memory-mapped record array, >= n pairs; with a dtype made if missing, its disk reserved."""
    path = os.path.join(pairs, f"{split}.npy")
    if dtype is not None and not os.path.exists(path):
        if n * dtype.itemsize > shutil.disk_usage(pairs).free:
            raise ValueError(f"{n * dtype.itemsize / 1e9:.2f} GB of {split} pairs do not fit in {pairs}; "
                             "free space or pass --pairs on a larger disk")
        np.lib.format.open_memmap(path + ".tmp", "w+", dtype, (n,)).flush()
        if hasattr(os, "posix_fallocate"):                        # a full disk fails here, not as SIGBUS
            with open(path + ".tmp", "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path + ".tmp"))
        os.replace(path + ".tmp", path)
    data = np.load(path, mmap_mode="r" if dtype is None else "r+")
    if len(data) < n:
        raise ValueError(f"{path} holds {len(data):,} pairs, fewer than {n:,}; pass another --pairs")
    return data

@torch.no_grad()
def generate_pairs(cfg, teacher, recipe, shape, device):
    """The --num-pairs and --num-test-pairs pairs (x_T, F_teacher(x_T)), each from its own seed, in rounds of
    one --gen-batch chunk per rank (each rank fills its own rows); resumes with any number of ranks."""
    os.makedirs(cfg.pairs, exist_ok=True)
    R.lock_out(cfg.pairs, "--pairs")  # a --pairs folder shared by runs is filled by one at a time
    done = read_meta(cfg.pairs, recipe) or {"train": 0, "test": 0}
    classes = recipe.get("classes", 0)  # a class-conditional teacher: each pair's label, from its seed
    dtype = np.dtype([("x_T", np.float16, shape), ("x_0", np.uint8, shape)] + [("y", np.int16)] * (classes > 0))
    splits = (("train", cfg.num_pairs), ("test", cfg.num_test_pairs))
    todo = sum(max(0, n - done[split]) for split, n in splits)
    R.print0(f"pairs: {cfg.num_pairs + cfg.num_test_pairs:,} x {dtype.itemsize} B in {cfg.pairs}; {todo:,} "
             f"to make with {len(recipe['times'])} teacher steps each")
    R.write_json(os.path.join(cfg.pairs, "meta.json"), {**recipe, "done": done})
    made, t0, full = 0, time.time(), R.full_config(cfg)
    for split, n in splits:
        if R.rank() == 0:
            pair_array(cfg.pairs, split, n, dtype)                # made (and its disk reserved) once
        R.barrier()
        data, starts = pair_array(cfg.pairs, split, n, dtype), range(done[split], n, cfg.gen_batch)
        for r in range(0, len(starts), R.world_size()):
            R.stop_if_preempted("teacher pairs")  # the rounds before are on disk and counted: resumed there
            chunks, t_round = starts[r:r + R.world_size()], time.time()  # this round: chunk k is rank k's
            if R.rank() < len(chunks):
                i, j = chunks[R.rank()], min(chunks[R.rank()] + cfg.gen_batch, n)
                seeds = noise_seeds(cfg.seed, split, i, j)
                x_T, y = seeded_noise(seeds, shape, device), seeded_labels(seeds, classes, device)  # (b, C, H, W)
                with autocast(device, cfg.dtype):
                    x_0 = teacher_x0(teacher, x_T, recipe["times"], y)
                data["x_T"][i:j] = x_T.half().cpu().numpy()
                data["x_0"][i:j] = quantize(x_0, cfg.targets).cpu()
                if y is not None:
                    data["y"][i:j] = y.cpu().numpy()
                data.flush()
            # the round's pairs on disk before the count
            R.barrier()
            made += min(chunks[-1] + cfg.gen_batch, n) - done[split]
            done[split] = min(chunks[-1] + cfg.gen_batch, n)
            R.write_json(os.path.join(cfg.pairs, "meta.json"), {**recipe, "done": done})
            R.progress("pairs", made, todo, t0, " pairs/s")
            R.rehearsal_rate("teacher pairs", min(chunks[-1] + cfg.gen_batch, n) - chunks[0],
                             time.time() - t_round, full.num_pairs + full.num_test_pairs, "pair", last=True)
    R.barrier()                                                     # meta.json counts them all
    if made:
        R.log_row(cfg.out, {"stage": "pairs", "pairs": made, "pairs_per_s": made / (time.time() - t0),
                            "world_size": R.world_size()})

def fetch(data, idx, device):
    """Pairs idx -> (x_T, x_0, y), float32 (B, C, H, W) each on the device, in sorted index order; y the
    labels (B,) of a class-conditional teacher's pairs, else None."""
    rec = data[np.sort(idx)]                                      # sorted: forward reads of the memory map
    keys = ("x_T", "x_0", "y") if "y" in data.dtype.names else ("x_T", "x_0")
    parts = [torch.from_numpy(np.ascontiguousarray(rec[k])) for k in keys]
    if device.startswith("cuda"):                                 # no host stall per step
        parts = [p.pin_memory() for p in parts]
    x_T, x_0, *y = (p.to(device, non_blocking=True) for p in parts)
    return x_T.float(), to_float(x_0), y[0].long() if y else None  # official train_pyfunc: x_0/127.5 - 1

# ---- Training: Adam with warm-up, EMA, the EMA's test loss every --test-every updates, the best EMA kept --

@torch.no_grad()
def test_loss(ema, test_set, cfg, device):
    """Mean per-sample loss of the EMA student on the held-out pairs, shared out over the ranks (one host
    sync)."""
    ours, b = R.mine(torch.arange(cfg.num_test_pairs)).numpy(), cfg.batch // R.world_size() // cfg.accum
    total = torch.zeros((), device=device)
    for i in range(0, len(ours), b):
        x_T, x_0, y = fetch(test_set, ours[i:i + b], device)
        with autocast(device, cfg.dtype):
            total += student_loss(student_x0(ema, x_T, y), x_0, cfg.loss).sum()
    return (R.mean_over_ranks(total) * R.world_size()).item() / cfg.num_test_pairs  # the sum over the ranks

def train(cfg, teacher, ckpt, recipe, device):
    done = read_meta(cfg.pairs, recipe)                           # refuses pairs of another recipe
    if done is None or done["train"] < cfg.num_pairs or done["test"] < cfg.num_test_pairs:
        raise ValueError(f"{cfg.pairs} lacks pairs ({done}); run --stage pairs first (it resumes)")
    train_set, test_set = pair_array(cfg.pairs, "train", cfg.num_pairs), pair_array(cfg.pairs, "test",
                                                                                    cfg.num_test_pairs)
    student = make_student(teacher, cfg.student_param)
    trained, ema = R.compiled(R.data_parallel(student), cfg.compile), student.copy().freeze()
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                           fused=device != "cpu")
    step, elapsed, best, best_step = 0, 0.0, math.inf, None
    if ckpt is not None:                                          # the data order is a function of the step
        if ckpt.get("optimizer") is None:
            raise ValueError(f"--resume {cfg.resume}: no optimizer state (best.pt?); resume from a ckpt.pt")
        student.net.load_state_dict(ckpt["model"]), ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, elapsed, best, best_step = ckpt["step"], ckpt["elapsed"], ckpt["best_test"], ckpt["best_step"]
    for name in ("metrics.json", "best.pt")[:1 if ckpt else 2] if step < cfg.updates else ():
        if R.rank() == 0 and os.path.exists(os.path.join(cfg.out, name)):  # the student changes: no stale
            os.remove(os.path.join(cfg.out, name))                        # result (rank 0 writes the folder)
    save = lambda path, opt: R.save_checkpoint(
        path, **student.state(), ema=ema.net.state_dict(), method="luhman_kd", config=dataclasses.asdict(cfg),
        optimizer=opt and opt.state_dict(), step=step, elapsed=meter.now(), best_test=best,
        best_step=best_step)
    per_epoch = cfg.num_pairs // cfg.batch                        # the last partial batch is dropped
    meter = R.Meter(cfg.out, step, cfg.updates, elapsed, device, phase="student training",
                    full_total=R.full_config(cfg).updates)
    order = None
    while step < cfg.updates:
        epoch, i = divmod(step, per_epoch)
        if i == 0 or order is None:                               # a function of (seed, epoch): no loader
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(cfg.num_pairs, generator=gen).numpy()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup)             # warm-up, then constant (app. B)
        opt.zero_grad(set_to_none=True)
        ours = R.mine(torch.from_numpy(order[i * cfg.batch:(i + 1) * cfg.batch])).numpy()  # this rank's part
        loss = 0.0
        for a, part in enumerate(np.array_split(ours, cfg.accum)):
            x_T, x_0, y = fetch(train_set, part, device)          # (B / ranks / accum, C, H, W) each
            last = R.world_size() == 1 or a + 1 == cfg.accum         # DDP averages the gradients at the end
            with autocast(device, cfg.dtype), contextlib.nullcontext() if last else trained.net.no_sync():
                part_loss = student_loss(student_x0(trained, x_T, y), x_0, cfg.loss).sum() / len(ours)
                part_loss.backward()                              # summed over the parts: the batch mean
            loss = loss + part_loss.detach()
        opt.step()                                                # no gradient clipping (app. B)
        ema_update(ema.net, student.net, cfg.ema)
        step += 1
        meter.add(loss)
        stop = R.preempted()
        if step % cfg.log_every == 0 or step == cfg.updates or stop:
            meter.log(step, {"stage": "train", "step": step, "lr": g["lr"]}, preempted=stop)
        tested = cfg.num_test_pairs > 0 and (step % cfg.test_every == 0 or step == cfg.updates)
        if tested or step % cfg.ckpt_every == 0 or step == cfg.updates:
            meter.check()                                         # never a checkpoint after a non-finite loss
        if tested:                                                # early stopping on the test loss (official)
            t_test, full = time.time(), R.full_config(cfg)
            loss_test = test_loss(ema, test_set, cfg, device)
            R.rehearsal_rate("held-out test loss", cfg.num_test_pairs, time.time() - t_test,
                             full.num_test_pairs * (full.updates // full.test_every), "pair", last=True)
            if loss_test < best:
                best, best_step = loss_test, step
                save(os.path.join(cfg.out, "best.pt"), None)
            R.log_row(cfg.out, {"stage": "test", "step": step, "epoch": step / per_epoch,
                                "test_loss": loss_test, "best_test_loss": best})
        if tested or step % cfg.ckpt_every == 0 or step == cfg.updates or stop:
            save(os.path.join(cfg.out, "ckpt.pt"), opt)
        if stop:
            raise R.Preempted(f"update {step}")

# ---- Evaluation (sec. 4): teacher fidelity, Table 2 timing, fig. 6 slerp, fig. 13 other size, FID/IS -----

def slerp(z0, z1, a):
    """Spherical interpolation between two latents (fig. 6, as Song et al. 2021 for DDIM)."""
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)

@torch.no_grad()
def evaluate(cfg, teacher, times, shape, device):
    R.barrier()                                                     # rank 0's checkpoints are on disk
    paths = [p for p in (os.path.join(cfg.out, n) for n in ("best.pt", "ckpt.pt")) if os.path.exists(p)]
    if not paths:
        raise ValueError(f"no student checkpoint in {cfg.out}; run --stage train first")
    student = R.load_teacher(paths[0], device)                      # the best EMA, read as any teacher is
    if cfg.fid:                                                   # compiling pays for FID's samples only
        student, teacher = R.compiled(student, cfg.compile), R.compiled(teacher, cfg.compile)
    last = R.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"))
    amp = autocast(device, cfg.dtype)                             # sample_fn(z, seeds) under --dtype
    classes = R.eval_classes(cfg.classes, teacher)
    y = lambda z, seeds: seeded_labels(seeds, teacher.num_classes, z.device, classes)  # a conditional model's
    F_student = amp(lambda z, seeds: student.sample(z, y=y(z, seeds)))  # its sampler: student_x0, clipped
    F_teacher = amp(lambda z, seeds: teacher_x0(teacher, z, times, y(z, seeds)))
    F_teacher_1 = amp(lambda z, seeds: teacher_x0(teacher, z, times[:1], y(z, seeds)))

    # Teacher fidelity on held-out noise: the student's 1 step vs the teacher's own 1-step DDIM, same x_T.
    seeds, full = noise_seeds(cfg.seed, "eval", 0, cfg.eval_n), R.full_config(cfg)
    x_ref, x_one, x_stu = (R.generate(fn, seeds, shape, cfg.gen_batch, device, f"evaluation {name}",
                                      full.eval_n)
                           for fn, name in ((F_teacher, "teacher"), (F_teacher_1, "teacher 1 step"),
                                              (F_student, "student")))
    rows = [dict(model="teacher", steps=len(times), sampler="ddim", rmse_to_reference=0.0),
            dict(model="teacher", steps=1, sampler="ddim", rmse_to_reference=rmse(x_one, x_ref)),
            dict(model="student", steps=1, sampler="ddim", rmse_to_reference=rmse(x_stu, x_ref),
                 updates=last["step"],
                 selected_update=last["best_step"] if paths[0].endswith("best.pt") else last["step"],
                 test_loss=last["best_test"] if math.isfinite(last["best_test"]) else None)]
    for row in rows:
        row.update(fid=None, **{"is": None})
    for name, x in (("student", x_stu), ("teacher", x_ref), ("teacher_1step", x_one)):
        R.save_grid(x[:64], os.path.join(cfg.out, f"samples_{name}.png"))        # same noise, side by side
    z = seeded_noise(seeds[:8], shape, device)                    # fig. 6: slerp, 4 rows x 10 points
    zs = torch.stack([slerp(z[2 * r], z[2 * r + 1], a) for r in range(4) for a in torch.linspace(0, 1, 10)])
    R.save_grid(F_student(zs, [seeds[2 * r] for r in range(4) for _ in range(10)]),  # a row: a label
                os.path.join(cfg.out, "interpolation.png"), nrow=10)
    if cfg.time_batch:                                            # Table 2: 1 evaluation vs len(times)
        z, z_seeds = torch.randn(cfg.time_batch, *shape, device=device), range(cfg.time_batch)
        for row, fn, repeats in ((rows[2], F_student, 10), (rows[0], F_teacher, 1)):
            fn(z, z_seeds).sum().item()                           # warm-up at the timed batch (cuDNN
            # autotunes, --compile compiles each new size: not in the timing); .item(): the device has finished
            t0 = time.time()
            torch.stack([fn(z, z_seeds).sum() for _ in range(repeats)]).sum().item()
            row["images_per_s"] = repeats * len(z) / (time.time() - t0)
            row["time_50k_s"] = 50_000 / row["images_per_s"]
    if cfg.other_size:                                            # fig. 13: a size never trained on
        h, w = (int(v) for v in cfg.other_size.lower().split("x"))
        o_ref, o_stu, o_one = (R.generate(fn, seeds[:16], (shape[0], h, w), cfg.gen_batch, device)
                               for fn in (F_teacher, F_student, F_teacher_1))
        # teacher over student
        R.save_grid(torch.cat([o_ref, o_stu]), os.path.join(cfg.out, "other_size.png"))
        rows += [dict(model="teacher", steps=1, sampler="ddim", rmse_to_reference=rmse(o_one, o_ref),
                      image_size=[h, w]),
                 dict(model="student", steps=1, sampler="ddim", rmse_to_reference=rmse(o_stu, o_ref),
                      image_size=[h, w])]
    R.print0(f"student 1-step RMSE {rows[2]['rmse_to_reference']:.4f}, teacher 1-step DDIM RMSE "
             f"{rows[1]['rmse_to_reference']:.4f} (claim in small: the student's at most half the teacher's)")

    # FID / IS (Table 1) on seeds no pair used; metrics.json before and after, so a failed FID keeps the rows.
    metrics = lambda finished: R.write_metrics(cfg.out, "luhman_kd", cfg.data, teacher.source, {
        "sampler": f"ddim_{cfg.skip}", "steps": len(times)}, rows, finished=finished)
    metrics(False)
    if cfg.fid:
        ref = cfg.fid_ref or R.reference_pngs(cfg.data, cfg.fid, os.path.join(cfg.out, f"fid_real_{cfg.fid}"),
                                              cfg.fid_stats, image_size=shape[-1])
        models = ((rows[2], F_student, "student"), (rows[0], F_teacher, "teacher"))[:1 + cfg.fid_teacher]
        for row, fn, name in models:
            folder = R.sample_to_folder(fn, cfg.fid, os.path.join(cfg.out, f"fid_{name}"), shape,
                                        cfg.gen_batch, device, seed0=cfg.seed * SEED_STRIDE + OFFSET["fid"],
                                        full=full.fid)
            scores = R.fid_is(folder, cfg.data, device, inception=cfg.inception or None, ref_folder=ref,
                              stats=cfg.fid_stats or None, full=full.fid)
            row.update(fid=scores["fid"], fid_clean=scores.get("fid_clean"), **{"is": scores["is"]})
    metrics(True)
    for row in rows:
        R.log_row(cfg.out, {"stage": "eval", **{k: v for k, v in row.items() if v is not None}})
    return R.run_finished(cfg.out)

# ---- flags and main ----------------------------------------------------------------------------------------

def resolve(cfg):
    """Fill what the recipe decides, check what argparse cannot; nothing is loaded or written."""
    recipe = cfg.recipe
    if recipe == "auto":
        recipe = "cifar10" if cfg.data == "shapes" else next(
            (r for r in RECIPES if r.split("_")[-1] in cfg.data.lower()), None)
        if recipe is None:
            raise ValueError(f"--data {cfg.data}: which table 3 column? pass --recipe {' | '.join(RECIPES)}")
    k = RECIPES.index(recipe)
    fill = {key: values[k] for key, values in TABLE3.items() if getattr(cfg, key) is None}
    cfg = dataclasses.replace(cfg, recipe=recipe, teacher=cfg.teacher or ("" if cfg.data == "shapes" else
                              TEACHERS[k]), pairs=cfg.pairs or os.path.join(cfg.out, "pairs"), **fill)
    for ok, message in [
            (cfg.teacher or cfg.data == "shapes", "--teacher: the paper's CelebA teacher is ermongroup/ddim"
             "'s ckpt.pth: python tools/convert_teacher.py ckpt.pth celeba.pt, then --teacher celeba.pt"),
            (not cfg.other_size or re.fullmatch(r"\d+x\d+", cfg.other_size.lower()),
             f"--other-size {cfg.other_size!r}: expected HxW, e.g. 32x48"),
            (cfg.stage == "pairs" or cfg.batch % (cfg.accum * R.world_size()) == 0,
             f"--accum {cfg.accum}: expected a divisor of --batch {cfg.batch}" + (
                 f" / {R.world_size()} processes" if R.world_size() > 1 else "")),
            (cfg.stage == "pairs" or cfg.batch <= cfg.num_pairs,
             f"--batch {cfg.batch} exceeds --num-pairs {cfg.num_pairs}"),
            (cfg.stage != "train" or os.path.isfile(os.path.join(cfg.pairs, "meta.json")),
             f"--pairs {cfg.pairs}: no pairs there (no meta.json); run --stage pairs first (it resumes)"),
            (not os.path.exists(cfg.pairs) or os.path.isdir(cfg.pairs), f"--pairs {cfg.pairs}: not a folder"),
            (max(cfg.num_pairs, cfg.num_test_pairs, cfg.eval_n, cfg.fid) < SPLIT and cfg.seed < 10 ** 8,
             "--num-pairs, --num-test-pairs, --eval-n, --fid: expected below 10^9; --seed: below 10^8"),
            *[(not path or os.path.exists(path), f"--{flag} {path}: no such file or folder") for flag, path in
              (("fid-ref", cfg.fid_ref), ("fid-stats", cfg.fid_stats), ("inception", cfg.inception))]]:
        if not ok:
            raise ValueError(message)
    return cfg

def check_sizes(cfg, net_cfg):
    """x_T's sides must be multiples of the network's total downsampling (U-Net) or patch size (DiT)."""
    step = net_cfg["patch_size"] if net_cfg["arch"] == "dit" else 2 ** (len(net_cfg["ch_mult"]) - 1)
    sides = [cfg.image_size or net_cfg["image_size"]] + [int(v) for v in re.findall(r"\d+", cfg.other_size)]
    if any(s < 8 or s % step for s in sides):
        raise ValueError(f"--image-size/--other-size {sides}: this teacher needs multiples of {step}, >= 8")

@R.one_writer
def main(argv=None):
    cfg = R.parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0])
    device = R.setup_device(cfg.device)                             # first: the batch splits over the ranks
    cfg = R.rehearsal(resolve(cfg))                                 # --rehearse: every count cut
    R.dataset_classes(cfg.data)                                     # an unknown dataset, a missing folder
    if cfg.fid:
        R.prepare_fid(cfg.data, cfg.inception or None, cfg.fid_stats or None)
    ckpt = R.read_resume(cfg)                                       # refuses a resume with other result flags
    if R.run_finished(cfg.out) and cfg.stage == "all" and ckpt is not None and ckpt["step"] >= cfg.updates:
        R.print0(
            f"{cfg.out} is finished (metrics.json); --stage eval evaluates again, --resume none restarts")
        return R.run_finished(cfg.out)
    if not cfg.teacher:                                           # the cached shapes teacher: sizes checked
        shapes = R.TeacherConfig()                                  # before it is trained (once per machine)
        check_sizes(cfg, net_config(build_net(shapes.net, image_size=shapes.image_size)))
    spec = cfg.teacher or R.cached_teacher(R.TeacherConfig(class_cond=cfg.class_cond))
    teacher = R.pixel_teacher(R.load_teacher(spec, device), "luhman_kd.py")
    R.eval_classes(cfg.classes, teacher)
    if cfg.student_param == "official" and teacher.param != "eps":
        raise ValueError(f"--student-param official reads the output as eps; {teacher.source} predicts "
                         f"{teacher.param}: use --student-param exact")
    check_sizes(cfg, net_config(teacher.net))
    check_steps(teacher.schedule, cfg.skip, teacher_steps=cfg.teacher_steps)
    R.start_run(cfg, ckpt,
                outputs=("best.pt", "samples_*.png", "interpolation.png", "other_size.png", "fid_*"),
                batch=cfg.batch)
    size = cfg.image_size or net_config(teacher.net)["image_size"]
    shape = (3, size, size)
    times = sampler_times(teacher.schedule, cfg.teacher_steps, cfg.skip)
    recipe = pairs_recipe(cfg, teacher.source, times, shape, teacher.num_classes)
    R.print0(f"teacher {teacher.source}: {len(times)}-step DDIM ({cfg.skip}) from t={times[0]}; {cfg.recipe} "
             f"recipe: lr {cfg.lr:g}, batch {cfg.batch}, {cfg.updates} updates")
    if cfg.stage in ("all", "pairs"):
        generate_pairs(cfg, R.compiled(teacher, cfg.compile), recipe, shape, device)
    if cfg.stage in ("all", "train"):
        train(cfg, teacher, ckpt, recipe, device)
    if cfg.stage in ("all", "eval"):
        return evaluate(cfg, teacher, times, shape, device)

if __name__ == "__main__":
    R.cli(main)
