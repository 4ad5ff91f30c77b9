"""DKDM: Data-Free Knowledge Distillation for Diffusion Models with Any Architecture.
Qianlong Xiang, Miao Zhang, Yuzhang Shang, Jianlong Wu, Yan Yan, Liqiang Nie; CVPR 2025, arXiv:2409.03550.

A pretrained diffusion model is the only data of a randomly initialised student of any architecture, which
learns the teacher's reverse steps (eqs. 19-21: the teacher's eps, and the KL between the two reverse
Gaussians for its variance) on noisy states the teacher makes itself: a set of rho T b states along its
trajectories, b of which take one teacher step per update (alg. 1, dynamic iterative distillation).
    python tools/convert_teacher.py ADM_cifar10_baseline.pt teachers/adm_cifar10.pt   # DDPM-IP's 57M ADM
    python dkdm.py --data cifar10 --teacher teachers/adm_cifar10.pt --fid-samples 50000 --out runs/dkdm_c10
    python dkdm.py ... --method datafree          # table 2's baseline: 50k teacher samples, then training
    python dkdm.py ... --eval-snapshots all       # the early stop: every EMA snapshot scored, no training
    python dkdm.py --quick                        # CPU
The teacher: https://drive.google.com/file/d/1m-a3WqfpMTibzuTC2om046yWQr20GT0I (by hand). Where the paper is
silent we follow the official code (docs/dkdm.md): the teacher's x0 clipped in its reverse step, the KL at
every t in bits per dimension with weight 1, finished entries restart from noise. Not in the paper:
--chain-steps K < T respaces the teacher's chain (Nichol & Dhariwal sec. 4), as --quick does.
"""
import dataclasses
import math
import os
import time

import torch

from common import (Denoiser, PRESETS, Schedule, ancestral_logvar, ancestral_sample, autocast, bcast,
                    build_net, check_steps, ddim_sample, ema_update, gaussian_kl, posterior, rmse,
                    sampler_spec, sampler_times, seeded_labels, variance_frac)

import runtime as R

# ---- the method (sec. 3.2, 3.3, alg. 1) ----------------------------------------------------------------

def chain_coefficients(schedule, chain_t, k, like):
    """(alpha, sigma) at t = chain_t[k] and at the step's end chain_t[k - 1] (chain_t: the timesteps of the
    teacher's reverse chain, ascending); a step from k = 0 ends at the data."""
    a_t, s_t = schedule.alpha_sigma(chain_t[k])
    a_s, s_s = schedule.alpha_sigma(chain_t[(k - 1).clamp(min=0)])
    a_s, s_s = torch.where(k == 0, 1.0, a_s), torch.where(k == 0, 0.0, s_s)
    return tuple(bcast(v, like) for v in (a_t, s_t, a_s, s_s))

def reverse_gaussian(schedule, chain_t, z_t, k, x_pred, frac):
    """p(x^{t-1} | x^t) = N(mean, e^logvar) of eqs. 7, 8, 12 on the chain: the posterior mean at the predicted
    x0, the log-variance frac log beta_t + (1 - frac) log beta~_t. At k = 0, where beta~ = 0, the next step's
    beta~ stands in (IDDPM's posterior_log_variance_clipped, as in the official KL)."""
    mean, var_small, var_large = posterior(z_t, x_pred, *chain_coefficients(schedule, chain_t, k, z_t))
    var_small_1 = posterior(z_t, x_pred, *chain_coefficients(schedule, chain_t, k.clamp(min=1), z_t))[1]
    return mean, ancestral_logvar(torch.where(bcast(k, z_t) == 0, var_small_1, var_small), var_large, frac)

@torch.no_grad()
def teacher_step(teacher, chain_t, z_t, k, noise, clip=True, y=None):
    """One reverse step of the teacher, x^{t-1} = g(x^t, t) (sec. 3.2), with what the student learns from it:
    eps_T (eq. 20) and p_T(x^{t-1} | x^t) (eq. 21). clip: x0 clipped before the posterior mean; eps_T raw.
    y: the entries' labels (a class-conditional teacher)."""
    x_pred, eps, v = teacher.full(z_t, chain_t[k], y=y)
    x_pred = x_pred.clamp(-1, 1) if clip and teacher.autoencoder is None else x_pred  # latents: never
    mean, logvar = reverse_gaussian(teacher.schedule, chain_t, z_t, k, x_pred, variance_frac(teacher.var, v))
    z_prev = mean + bcast(k > 0, z_t) * torch.exp(0.5 * logvar) * noise  # no noise into the data
    return {"eps": eps, "mean": mean, "logvar": logvar, "z_prev": z_prev}

def dkdm_loss(student, chain_t, z_t, k, target, y=None):
    """Eqs. 20 and 21 per sample, means over pixels: L*_simple = ||eps_T - eps_S||^2 and L*_vlb =
    KL(p_T || p_S) in bits, with the student's mean under stop-gradient, so that only its variance output
    learns from the KL (as in the hybrid objective, eq. 13)."""
    x_pred, eps, v = student.full(z_t, chain_t[k], y=y)
    simple = ((target["eps"] - eps) ** 2).flatten(1).mean(1)
    if student.var != "learned_range":  # a fixed variance: nothing for the KL to teach (eq. 20 alone)
        return simple, torch.zeros_like(simple)
    mean, logvar = reverse_gaussian(student.schedule, chain_t, z_t, k, x_pred.detach(),
                                    variance_frac(student.var, v))
    vlb = gaussian_kl(target["mean"], target["logvar"], mean, logvar).flatten(1).mean(1) / math.log(2)
    return simple, vlb

def new_set(n, K, shape, collect, gen, spread=False, num_classes=0):
    """B+_0 of alg. 1: n entries of pure noise at chain index K - 1, each with the index where its shuffle
    denoise stops: uniform over 0..K-1 (spread: evenly), or K - 1 for iterative distillation (no shuffle);
    for a class-conditional teacher each entry's label 'y', uniform, kept along its trajectory."""
    device = gen.device
    if collect == "iterative":
        stop = torch.full((n,), K - 1, device=device)
    elif spread:
        stop = ((torch.arange(n, device=device) + 0.5) * K / n).long()
    else:
        stop = torch.randint(K, (n,), generator=gen, device=device)
    kset = {"z": torch.randn((n, *shape), generator=gen, device=device),
            "k": torch.full((n,), K - 1, device=device), "stop": stop}
    if num_classes:
        kset["y"] = torch.randint(num_classes, (n,), generator=gen, device=device)
    return kset

@torch.no_grad()
def shuffle_denoise(teacher, chain_t, kset, batch, clip, gen, save=None, save_every=1000, pad=None):
    """Alg. 1 line 1, shuffle denoise: the teacher denoises every entry from pure noise down to its own stop
    index, `batch` entries per call at mixed t (the official generate()): the first entries still above their
    stop. pad (default: off the CPU): every call at the full batch, the last ones padded with finished entries,
    which do not move, so that cuDNN autotunes and --compile compiles one shape (unpadded, the last calls take
    834 sizes at CIFAR-10 size; padded, 8% more teacher evaluations), and the host reads the set's progress
    once per round, a round as many calls as the steps left need at least (none idle): no call waits for the
    one before. A CPU pads nothing (a small set would cost twice) and reads each call's count, which waits
    for nothing. Resumable: only entries above their stop move, and save() runs every save_every calls.
    Returns the set without the stop indices."""
    pad = kset["z"].device.type != "cpu" if pad is None else pad
    b, calls, t0 = min(batch, len(kset["k"])), 0, time.time()
    total = left = int((kset["k"] - kset["stop"]).sum())
    while left:
        longest = int((kset["k"] - kset["stop"]).max())
        for i in range(max(-(-left // b), longest)):  # each call moves at most b entries, each entry one step
            moving = kset["k"] > kset["stop"]
            size = b if pad else int(moving.sum().clamp(max=b))
            todo = torch.argsort((~moving).byte(), stable=True)[:size]  # the moving entries first, in order
            z, k, stop = kset["z"][todo], kset["k"][todo], kset["stop"][todo]
            y = kset["y"][todo] if "y" in kset else None
            noise = torch.randn(z.shape, generator=gen, device=gen.device)
            # ranks share out
            z_prev = teacher_step(teacher, chain_t, R.mine(z), R.mine(k), R.mine(noise), clip,
                                  None if y is None else R.mine(y))["z_prev"]
            moves = k > stop
            kset["z"][todo] = torch.where(bcast(moves, z) > 0, R.gather(z_prev, size), z)
            kset["k"][todo] = k - moves.long()
            calls += 1
            if calls % 20 == 0:  # estimated, b steps a call: no host read
                R.progress("shuffle denoise", min(total - 1, total - left + (i + 1) * b), total, t0,
                           " teacher steps/s")
            preempted = R.preempted()
            if preempted:
                R.log_preempted("shuffle denoise")  # before the checkpoint: a resumed log keeps it
            if save and (calls % save_every == 0 or preempted):
                save()
            if preempted:
                raise R.Preempted(f"shuffle denoise, teacher call {calls}")
        left = int((kset["k"] - kset["stop"]).sum())
        R.progress("shuffle denoise", total - left, total, t0, " teacher steps/s")
    return {key: v for key, v in kset.items() if key != "stop"}

def draw(n, b, collect, gen):
    """Alg. 1 line 4: b distinct random entries of the enlarged set (dynamic); iterative and shuffled
    distillation train on their whole b-entry set every update."""
    if collect == "dynamic":
        return torch.randperm(n, generator=gen, device=gen.device)[:b]
    return torch.arange(n, device=gen.device)

def write_back(kset, idx, k, z_prev, K, gen, num_classes=0):
    """Alg. 1 line 8: the teacher's one-step-denoised states replace their entries; entries that reached the
    data restart from pure noise (the official loader resets them to t = T), with a new label if any."""
    fresh = torch.randn(z_prev.shape, generator=gen, device=gen.device)
    kset["z"][idx] = torch.where(bcast(k, z_prev) == 0, fresh, z_prev)
    kset["k"][idx] = torch.where(k == 0, K - 1, k - 1)
    if num_classes:
        y = torch.randint(num_classes, k.shape, generator=gen, device=gen.device)
        kset["y"][idx] = torch.where(k == 0, y, kset["y"][idx])

def synthesize(cfg, teacher, shape, device):
    """The data-free baseline's dataset (sec. 4.1, fig. 2b): cfg.synthetic ancestral teacher samples (table 4)
    from seeds 10^6.. (evaluation uses 0..n-1), as PNGs, resumable, read back as uint8."""
    times = sampler_times(teacher.schedule, cfg.synthetic_steps, "linspace")
    folder = os.path.join(cfg.out, "synthetic")
    with autocast(device, cfg.dtype):
        R.sample_to_folder(lambda z, seeds: ancestral_sample(teacher, z, times, seeds, clip=cfg.teacher_clip),
                           cfg.synthetic, folder, shape, cfg.prep_batch, device, seed0=10 ** 6,
                           full=R.full_config(cfg).synthetic)
    return R.load_dataset(f"folder:{folder}", shape[-1]).to(device)

# ---- flags -------------------------------------------------------------------------------------------------

_ADM57 = PRESETS["adm_cifar10_57m"]
STUDENTS = {  # the paper's CNN students (official yaml/arch): the teacher's ADM, fewer channels or blocks
    "cnn_57m": _ADM57,                                                # 57,094,662 parameters
    "cnn_44m": dataclasses.replace(_ADM57, num_res_blocks=2),         # 44,177,286
    "cnn_32m": dataclasses.replace(_ADM57, ch=96),                    # 32,136,582
    "cnn_24m": dataclasses.replace(_ADM57, ch=96, num_res_blocks=2),  # 24,866,214
    "cnn_14m": dataclasses.replace(_ADM57, ch=64),                    # 14,301,446: the main CIFAR-10 student
    "cnn_tiny": PRESETS["tiny16"],                                    # 209,382: tiny at half width
    # table 3: the LDM teacher's U-Net at 128 channels (dkdm-*-ldm-vq-4.yaml), in its latent space
    "ldm_128": dataclasses.replace(PRESETS["ldm_vq4_unet"], ch=128),
    "ldm_tiny_half": dataclasses.replace(PRESETS["ldm_tiny"], ch=16, norm_groups=8),  # CPU tests
}

@dataclasses.dataclass
class Config:
    # teacher and student (sec. 4.1)
    # With shapes, no --teacher is needed.
    data: str = R.field("cifar10", f"dataset the teacher models ({R.DATASETS}); only FID/IS read it")
    # The paper's teacher is DDPM-IP's ADM_cifar10_baseline.pt (convert it with tools/convert_teacher.py);
    # google/ddpm-cifar10-32 (fixed variance) or a project checkpoint work too.
    teacher: str = R.field("", "teacher for load_teacher (paper: DDPM-IP's ADM); '' = the cached shapes "
                               "teacher")
    # A conditional teacher's labels are uniform per knowledge-set entry, kept along its trajectory.
    class_cond: bool = R.field(False, "the class-conditional cached shapes teacher (any --teacher: its own)")
    classes: str = R.field("", R.CLASSES_HELP, fixed=False)
    # The paper's ADM CNNs are cnn_57m, cnn_44m, cnn_32m, cnn_24m and cnn_14m; a common preset is e.g. dit_s2
    # (a ViT).
    student: str = R.field("cnn_14m",
                           "randomly initialised student: the paper's ADM CNNs, cnn_tiny or a common preset",
                           choices=tuple({**STUDENTS, **PRESETS}))
    dropout: float = R.field(0.3, "student dropout (official: 0.3 for every CNN; the DiT has none)", low=0.0,
                             below=1.0)
    # The datafree baseline samples a synthetic dataset from the teacher, then trains in the standard way with
    # the same budget.
    method: str = R.field("dkdm", "dkdm (sec. 3, alg. 1) | datafree (sec. 4.1 baseline)",
                          choices=("dkdm", "datafree"))
    # the DKDM objective (eqs. 19-21)
    # The official 1 equals Nichol & Dhariwal's 0.001 on L_vlb summed over T = 1000.
    vlb_weight: float = R.field(1.0,
                                "lambda of eq. 19 on the per-step KL in bits per dimension (official: 1)",
                                low=0.0)
    # As the official clip_denoised=True; the teacher's eps target is its raw output either way.
    teacher_clip: bool = R.field(True, "clip the teacher's x0 to [-1, 1] in its reverse step and KL target "
                                       "(official)")
    # knowledge collection (sec. 3.3, alg. 1)
    # iterative: one batch denoised in lockstep; shuffled: one batch at shuffled t; dynamic: b random entries
    # of a rho T b set per update.
    collect: str = R.field("dynamic", "how the teacher's knowledge is collected (sec. 3.3)",
                           choices=("iterative", "shuffled", "dynamic"))
    # The LDMs of table 3: rho 4 (BATCH: 4.0 in the official configs), 192,000 latents at batch 48.
    rho: float = R.field(0.4,
                         "the dynamic set holds round(rho T) b entries (fig. 4b; official: 0.4 = 51,200)",
                         low=0.0, rehearse=lambda c: min(c.rho, 1 / (c.chain_steps or 100)))
    # Respaced as in Nichol & Dhariwal sec. 4; the student then sees only the chain's K timesteps.
    chain_steps: int = R.field(0, "steps K of the teacher's reverse chain: 0 = all T (the paper); K < T "
                                  "respaces it", low=0)
    prep_batch: int = R.field(3072, "teacher batch of shuffle denoise and synthesis (official: 3072)", low=1)
    # training (official CIFAR10-14M-Dynamic-0.4.yaml; 200k updates with early stopping, say the authors)
    batch: int = R.field(128, "batch size b", low=1)
    updates: int = R.field(200_000, "student updates (constant lr: a run may be extended)", low=1,
                           fixed=False, rehearse=2)
    lr: float = R.field(1e-4, "AdamW learning rate, constant, no warm-up", low=0.0)
    weight_decay: float = R.field(0.0, "AdamW weight decay", low=0.0)
    ema: float = R.field(0.9999, "EMA decay; the EMA student is evaluated and saved", low=0.0, below=1.0)
    # A snapshot is a teacher checkpoint. The paper's 9.56 is '200k updates with early stop': --eval-snapshots
    # picks it.
    snapshot_every: int = R.field(10_000, "keep the EMA student every N updates as "
                                          "OUT/snapshots/ema_UPDATE.pt (0 = off)", low=0, fixed=False,
                                  rehearse=1)
    dtype: str = R.field("fp32", "network precision (official: fp16); the schedule algebra stays fp32",
                         choices=("fp32", "bf16"))
    compile: bool = R.field(False, R.COMPILE_HELP, fixed=False)
    # the data-free baseline (sec. 4.1, table 4)
    synthetic: int = R.field(50_000, "images of the baseline's synthetic dataset (table 4: 50,000)", low=1,
                             rehearse=lambda c: min(c.synthetic, c.batch))
    synthetic_steps: int = R.field(1000, "ancestral steps that sample them (table 4: IDDPM-1000)", low=1)
    # evaluation (sec. 4.1), at the end of the run
    eval_steps: int = R.field(50, "respaced steps of the IDDPM ancestral sampler (paper: 50) and of DDIM",
                              low=1, fixed=False)
    eval_samples: int = R.field(256, "seeds 0..n-1 for the teacher fidelity of both samplers", low=1,
                                fixed=False, rehearse=4)
    eps_samples: int = R.field(256,
                               "fresh teacher-trajectory states, spread over the chain, for the eps error",
                               low=1, fixed=False, rehearse=8)
    eval_clip: bool = R.field(True, "clip x0 while sampling (official clip_denoised=True)", fixed=False)
    fid_samples: int = R.field(0, "FID/IS samples of the student's ancestral sampler (paper: 50000; 0 = off)",
                               low=0, fixed=False, rehearse=32)
    fid_teacher: bool = R.field(False, "also FID/IS of the teacher's", fixed=False)
    # table 3 (the LDMs): DDIM with 200 steps, eta 0 (--eval-steps 200)
    fid_sampler: str = R.field("ancestral", "the sampler FID/IS score (table 2: ancestral; table 3: ddim)",
                               choices=("ancestral", "ddim"), fixed=False)
    # '' = clean-fid's, downloaded once.
    fid_stats: str = R.field("", "cifar10 FID statistics .npz (mu, sigma) for offline machines", fixed=False)
    inception: str = R.field("", "Inception weights for FID/IS ('' = download once)", fixed=False)
    # Evaluation only. The scores go into OUT/snapshots.json (teacher-fidelity RMSE; FID/IS with
    # --fid-samples): the early stop, fig. 4's curves.
    eval_snapshots: str = R.field("", "score the EMA snapshots, 'all' or comma-separated updates, no "
                                      "training (fig. 4)", fixed=False)
    grid: int = R.field(8, "samples per row of samples.png", low=1, fixed=False)
    # run
    seed: int = R.field(0, "seed")
    device: str = R.field("auto", "auto | cpu | cuda[:N]", fixed=False)
    log_every: int = R.field(1000, "log every N updates", low=1, fixed=False, rehearse=1)
    ckpt_every: int = R.field(10_000, "checkpoint every N updates (official: 10k)", low=1, fixed=False,
                              rehearse=1)
    out: str = R.field("runs/dkdm", "run directory", fixed=False)
    resume: str = R.field("auto", "auto (continue from --out/ckpt.pt) | none | PATH", fixed=False)

# --quick: the shared learned-variance shapes teacher (T = 1000) with its chain respaced to 50 steps, the 4x
# narrower U-Net student, 300 updates at b = 16 (lr and EMA for that length), a 160-entry dynamic set.
QUICK = dict(data="shapes", student="cnn_tiny", dropout=0.0, chain_steps=50, rho=0.2, prep_batch=512,
             batch=16, updates=300, lr=1e-3, ema=0.98, synthetic=256, synthetic_steps=50, eval_samples=32,
             eps_samples=64, log_every=50, ckpt_every=100, out="runs/dkdm_quick")

# ---- evaluation (sec. 4.1) -----------------------------------------------------------------------------

def samplers(cfg, den):
    """The paper's IDDPM ancestral sampler (learned variance) on IDDPM's respaced grid round(linspace(0, T-1,
    n)), and DDIM on the same grid; per-seed noise."""
    times, clip = sampler_times(den.schedule, cfg.eval_steps, "linspace"), cfg.eval_clip
    classes = R.eval_classes(cfg.classes, den)
    y = lambda z, seeds: seeded_labels(seeds, den.num_classes, z.device, classes)  # a conditional model's
    return {"ddim": lambda z, seeds: den.image(ddim_sample(den, z, times, clip, y(z, seeds))),
            "ancestral": lambda z, seeds: den.image(ancestral_sample(den, z, times, seeds, None, clip,
                                                                     y(z, seeds)))}

@torch.no_grad()
def teacher_reference(cfg, teacher, chain_t, shape, device):
    """The teacher's side of the evaluation: fresh states of its trajectories (a shuffle denoise from a seed
    training never uses, stopping evenly along the chain), its eps there, and its samples of seeds 0..n-1."""
    gen, t0, full = torch.Generator(device).manual_seed(10 ** 9 + cfg.seed), time.time(), R.full_config(cfg)
    with autocast(device, cfg.dtype):
        states = new_set(cfg.eps_samples, len(chain_t), shape, "shuffled", gen, True, teacher.num_classes)
        ref = shuffle_denoise(teacher, chain_t, states, cfg.prep_batch, cfg.teacher_clip, gen)
        ref["eps"] = teacher(ref["z"], chain_t[ref["k"]], y=ref.get("y"))[1]
        R.rehearsal_rate("teacher trajectory states", cfg.eps_samples, time.time() - t0, full.eps_samples,
                         "state")
        for name, fn in samplers(cfg, teacher).items():
            ref[name] = R.generate(fn, range(cfg.eval_samples), shape, cfg.batch, device,
                                   f"evaluation teacher {name}", full.eval_samples)
    return ref

def fid(cfg, name, fn, shape, device, image_size):
    """FID/IS of cfg.fid_samples samples (clean-fid's CIFAR-10 train statistics, or real images of --data)."""
    with autocast(device, cfg.dtype):
        folder = R.sample_to_folder(fn, cfg.fid_samples, os.path.join(cfg.out, "samples", name), shape,
                                    cfg.batch, device, full=R.full_config(cfg).fid_samples)
    ref = R.reference_pngs(cfg.data, cfg.fid_samples, os.path.join(cfg.out, "samples", f"data_{cfg.fid_samples}"),
                           cfg.fid_stats, image_size=image_size)
    return R.fid_is(folder, cfg.data, device, inception=cfg.inception or None, ref_folder=ref,
                    stats=cfg.fid_stats or None, full=R.full_config(cfg).fid_samples)

@torch.no_grad()
def evaluate(cfg, name, den, ref, chain_t, shape, device, want_fid=False):
    """Teacher fidelity: the eps RMSE on the teacher's fresh trajectory states, and the RMSE of each sampler's
    output to the teacher's from the same noise; FID/IS of the ancestral sampler when asked."""
    with autocast(device, cfg.dtype):
        eps_rmse = rmse(den(ref["z"], chain_t[ref["k"]], y=ref.get("y"))[1], ref["eps"])
    rows, images = [], {}
    for sampler, fn in samplers(cfg, den).items():
        with autocast(device, cfg.dtype):
            images[sampler] = R.generate(fn, range(cfg.eval_samples), shape, cfg.batch, device,
                                         f"evaluation {name} {sampler}", R.full_config(cfg).eval_samples)
        want = want_fid and sampler == cfg.fid_sampler
        fast = samplers(cfg, R.compiled(den, cfg.compile))[sampler] if want else None  # pays at FID's sizes
        scores = fid(cfg, f"{name}_{sampler}", fast, shape, device, den.image_shape[-1]) if want else {}
        rows.append({"model": name, "sampler": sampler, "steps": cfg.eval_steps, "eps_rmse": eps_rmse,
                     "rmse_to_reference": rmse(images[sampler], ref[sampler]), "fid": scores.get("fid"),
                     "is": scores.get("is")})
    return rows, images

# ---- training: one visible loop ------------------------------------------------------------------------

def make_student(cfg, teacher):
    """The randomly initialised student (seeded): an eps network at the teacher's image (or latent) size, on
    the teacher's schedule, with learned-range variance (2C outputs, as the paper's students) for a learned-
    range teacher, else the teacher's fixed variance (the LDMs of table 3: L*_simple alone, eq. 20); a latent
    teacher's student shares its autoencoder."""
    c, learned = teacher.net.config, teacher.var == "learned_range"
    torch.manual_seed(cfg.seed)
    net = build_net(STUDENTS.get(cfg.student, cfg.student), image_size=c.image_size,
                    in_channels=c.in_channels, out_channels=(1 + learned) * c.in_channels, dropout=cfg.dropout,
                    num_classes=teacher.num_classes)  # a conditional teacher's student takes its labels
    times = sampler_times(teacher.schedule, cfg.eval_steps, "linspace")  # its sampler: the paper's IDDPM one
    return Denoiser(net, teacher.schedule, "eps", teacher.var, sampler_spec(times, ancestral=True,
                                                                            clip=cfg.eval_clip),
                    autoencoder=teacher.autoencoder)

def train(cfg, spec, teacher, chain_t, ckpt, device):
    """Alg. 1 (or the data-free baseline) from scratch or from the checkpoint `ckpt`; returns the EMA
    student."""
    shape = teacher.noise_shape
    student = make_student(cfg, teacher).to(device)
    trained, ema = R.compiled(R.data_parallel(student), cfg.compile), student.copy().freeze()
    fast_teacher = R.compiled(teacher, cfg.compile)
    opt = torch.optim.AdamW(student.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device != "cpu")
    gen = torch.Generator(device).manual_seed(cfg.seed)
    step, elapsed, kset = 0, 0.0, None
    if ckpt is not None:
        student.net.load_state_dict(ckpt["model"]), ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"]), R.restore_generator(gen, ckpt["gen"], ckpt["step"])
        step, elapsed, kset = ckpt["step"], ckpt["elapsed"], ckpt["knowledge"]
        kset = kset and {key: v.to(device) for key, v in kset.items()}
    elif cfg.method == "dkdm":
        n = round(cfg.rho * len(chain_t)) * cfg.batch if cfg.collect == "dynamic" else cfg.batch
        kset = new_set(n, len(chain_t), shape, cfg.collect, gen, num_classes=teacher.num_classes)
    path, names = os.path.join(cfg.out, "ckpt.pt"), \
        ("loss", "vlb_bits") if cfg.method == "dkdm" else ("loss",)
    meter = R.Meter(cfg.out, step, cfg.updates, elapsed, device, names, "student training",
                    R.full_config(cfg).updates)
    # the set rides in ckpt.pt, atomic with the rest: at CIFAR-10 size (51,200 entries, 629 MB) a save took
    # 1.9 s (load 0.7 s) on a CPU machine's disk, against 10k updates between checkpoints
    save = lambda: R.save_checkpoint(path, **student.state(), ema=ema.net.state_dict(), method="dkdm",
                                     config=dataclasses.asdict(cfg), teacher=spec, optimizer=opt.state_dict(),
                                     step=step, gen=R.generator_state(gen), knowledge=kset,
                                     elapsed=meter.now())
    if cfg.method == "datafree":
        data = synthesize(cfg, fast_teacher, shape, device)
    elif "stop" in kset:  # alg. 1 line 1, resumable; the set is saved with the run, so it is made once
        t_prep, full = time.time(), R.full_config(cfg)
        with autocast(device, cfg.dtype):  # a CPU's calls shrink (unpadded): each size would compile
            kset = shuffle_denoise(fast_teacher if device != "cpu" else teacher, chain_t, kset, cfg.prep_batch,
                                   cfg.teacher_clip, gen, save)
        save()
        R.rehearsal_rate("shuffle denoise (the knowledge set)", len(kset["k"]), time.time() - t_prep,
                         round(full.rho * len(chain_t)) * full.batch if full.collect == "dynamic"
                         else full.batch,
                         "entry")

    student.train()
    meter.lap()  # the updates' rate from here
    while step < cfg.updates:
        torch.manual_seed(cfg.seed * 10 ** 7 + step + R.rank() * 10 ** 13)  # dropout: (seed, update, rank)
        with autocast(device, cfg.dtype):
            if cfg.method == "dkdm":                                                     # alg. 1
                idx = draw(len(kset["k"]), cfg.batch, cfg.collect, gen)                  # line 4
                noise = torch.randn((len(idx), *shape), generator=gen, device=device)
                # this rank's part
                z_t, k, noise = (R.mine(v) for v in (kset["z"][idx], kset["k"][idx], noise))
                y = R.mine(kset["y"][idx]) if "y" in kset else None  # teacher and student: the same label
                target = teacher_step(fast_teacher, chain_t, z_t, k, noise, cfg.teacher_clip, y)  # a step
                simple, vlb = dkdm_loss(trained, chain_t, z_t, k, target, y)              # lines 5-6
                loss, vlb = (simple + cfg.vlb_weight * vlb).mean(), vlb.mean()           # eq. 19
            else:  # standard hybrid training (eq. 13) on the synthetic data, with the same per-step KL weight
                x, _ = R.sample_batch(data, cfg.batch, gen)
                loss = R.diffusion_loss(trained, "snr", x, gen,
                                        vlb_weight=cfg.vlb_weight / teacher.schedule.T)
                vlb = torch.zeros((), device=device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()                                                                       # line 7
        ema_update(ema.net, student.net, cfg.ema)
        if cfg.method == "dkdm":  # line 8, on every rank: each holds the whole set, the same after each step
            write_back(kset, idx, kset["k"][idx], R.gather(target["z_prev"]), len(chain_t), gen,
                       teacher.num_classes)
        step += 1
        meter.add(*(loss, vlb) if cfg.method == "dkdm" else (loss,))
        stop = R.preempted()
        if step % cfg.log_every == 0 or step == cfg.updates or stop:
            meter.log(step, {"stage": "train", "update": step}, preempted=stop)
        if step % cfg.ckpt_every == 0 or step == cfg.updates or stop:
            meter.check()  # never a checkpoint after a non-finite loss
            save()
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:  # each a teacher, for the early stop
            meter.check()
            R.save_checkpoint(os.path.join(cfg.out, "snapshots", f"ema_{step:07d}.pt"), **ema.state(),
                              method="dkdm", teacher=spec, config=dataclasses.asdict(cfg), step=step)
        if stop:
            raise R.Preempted(f"update {step}")
    R.save_checkpoint(os.path.join(cfg.out, "student.pt"), **ema.state(), method="dkdm", teacher=spec,
                      config=dataclasses.asdict(cfg))  # the EMA student alone: a teacher for load_teacher
    return ema

def evaluate_student(cfg, teacher, ema, chain_t, device):
    """The metrics rows: the EMA student and the same student at initialisation against the teacher (its
    FID/IS with --fid-teacher), and samples.png."""
    shape = teacher.noise_shape
    ref = teacher_reference(cfg, teacher, chain_t, shape, device)
    initial = make_student(cfg, teacher).to(device).freeze()
    rows = evaluate(cfg, "student_init", initial, ref, chain_t, shape, device)[0]
    student_rows, images = evaluate(cfg, "student", ema, ref, chain_t, shape, device, cfg.fid_samples > 0)
    teacher_rows = [{"model": "teacher", "sampler": s, "steps": cfg.eval_steps, "eps_rmse": 0.0,
                     "rmse_to_reference": 0.0, "fid": None, "is": None} for s in ("ddim", "ancestral")]
    if cfg.fid_samples and cfg.fid_teacher:
        scores = fid(cfg, f"teacher_{cfg.fid_sampler}",
                     samplers(cfg, R.compiled(teacher, cfg.compile))[cfg.fid_sampler], shape, device,
                     teacher.image_shape[-1])
        row = teacher_rows[("ddim", "ancestral").index(cfg.fid_sampler)]
        row.update({"fid": scores["fid"], "is": scores["is"]})
    g = cfg.grid  # rows: teacher DDIM, student DDIM, teacher ancestral, student ancestral; columns: noises
    R.save_grid(torch.cat([ref["ddim"][:g], images["ddim"][:g], ref["ancestral"][:g],
                           images["ancestral"][:g]]),
                os.path.join(cfg.out, "samples.png"), nrow=g)
    return teacher_rows + rows + student_rows

def chain(cfg, schedule, spec):
    """The timesteps of the teacher's reverse chain the knowledge comes from, ascending (index k -> t); the
    step flags checked against its T."""
    if not schedule.discrete:
        raise ValueError(f"{spec} has a continuous-time schedule; DKDM needs a discrete teacher (T steps)")
    T = schedule.T
    K = cfg.chain_steps or T
    if K > T:
        raise ValueError(f"--chain-steps {K}: the teacher has T = {T} steps; expected at most that")
    if cfg.method == "dkdm" and cfg.collect == "dynamic" and round(cfg.rho * K) < 1:
        raise ValueError(f"--rho {cfg.rho}: round(rho K) = 0 entries per batch slot at K = {K}; expected "
                         f"rho >= {0.5 / K:.3g}")
    check_steps(schedule, "linspace", eval_steps=cfg.eval_steps, synthetic_steps=cfg.synthetic_steps)
    return sorted(sampler_times(schedule, K, "linspace"))

def snapshots(cfg):
    """{update: path} of the EMA snapshots --eval-snapshots names ('all' or updates), or a one-line error."""
    folder = os.path.join(cfg.out, "snapshots")
    have = {int(f[4:-3]): os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.startswith("ema_") and f.endswith(".pt")} if os.path.isdir(folder) else {}
    try:
        want = sorted(have) if cfg.eval_snapshots == "all" else \
            [int(u) for u in cfg.eval_snapshots.split(",")]
    except ValueError:
        raise ValueError(f"--eval-snapshots {cfg.eval_snapshots!r}: expected all or updates, e.g. "
                         "10000,20000") from None
    missing = [u for u in want if u not in have]
    if missing or not want:
        raise ValueError(f"--eval-snapshots {cfg.eval_snapshots}: no snapshot of update(s) {missing} in "
                         f"{folder} (there: {sorted(have) or 'none'}); train with --snapshot-every first")
    return {u: have[u] for u in want}

def evaluate_snapshots(cfg, chosen, teacher, chain_t, device):
    """Evaluation only: every chosen snapshot against the teacher (as the end of a run evaluates the student),
    rows with their update into OUT/snapshots.json; returns the rows."""
    shape = teacher.noise_shape
    ref = teacher_reference(cfg, teacher, chain_t, shape, device)
    rows = []
    for update, path in chosen.items():
        den = R.load_teacher(path, device)
        new = evaluate(cfg, f"snapshot_{update}", den, ref, chain_t, shape, device, cfg.fid_samples > 0)[0]
        rows += [{**row, "update": update} for row in new]
        R.print0("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in new[-1].items()))
    R.write_json(os.path.join(cfg.out, "snapshots.json"), rows)
    return rows

@R.one_writer
def main(argv=None):
    cfg = R.parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0])
    if not cfg.teacher and cfg.data != "shapes":
        raise ValueError("--teacher: which model to distil? e.g. DDPM-IP's ADM_cifar10_baseline.pt (the "
                         "paper's; convert it with tools/convert_teacher.py) or google/ddpm-cifar10-32")
    device = R.setup_device(cfg.device)
    chosen = snapshots(cfg) if cfg.eval_snapshots else None  # --rehearse: the run's own, scored in small
    # --rehearse: every count cut, into OUT/rehearsal
    cfg = R.rehearsal(cfg)
    R.check_batch(batch=cfg.batch, prep_batch=cfg.prep_batch)
    if chosen:  # evaluation writes snapshots.json and FID folders there: not beside a training run
        os.makedirs(cfg.out, exist_ok=True)
        R.lock_out(cfg.out)
    if cfg.fid_samples:
        R.prepare_fid(cfg.data, cfg.inception or None, cfg.fid_stats or None)
    ckpt = None if chosen else R.read_resume(cfg)  # refuses a resume with other result flags, before any work
    if ckpt is not None and ckpt["step"] >= cfg.updates and R.run_finished(cfg.out):
        R.print0(f"{cfg.out} is finished (metrics.json); --resume none or another --out runs again")
        return R.run_finished(cfg.out)
    if not cfg.teacher:  # the cached teacher's T is known from its config: refused before it is trained
        chain(cfg, Schedule(R.TeacherConfig().schedule), "the cached shapes teacher")
    spec = cfg.teacher or R.cached_teacher(R.TeacherConfig(class_cond=cfg.class_cond))
    teacher = R.load_teacher(spec, device)
    R.eval_classes(cfg.classes, teacher)
    if (teacher.num_classes or teacher.autoencoder is not None) and cfg.method == "datafree":
        raise ValueError("--method datafree trains on unlabelled pixel images: use an unconditional pixel teacher")
    chain_t = torch.tensor(chain(cfg, teacher.schedule, spec), device=device)
    if chosen:
        return evaluate_snapshots(cfg, chosen, teacher, chain_t, device)
    R.start_run(cfg, ckpt, outputs=("snapshots", "samples", "synthetic", "student.pt", "samples.png"),
                batch=cfg.batch)
    ema = train(cfg, spec, teacher, chain_t, ckpt, device)
    results = evaluate_student(cfg, teacher, ema, chain_t, device)
    reference = {"sampler": "the teacher's own sampler from the same noise", "steps": cfg.eval_steps}
    R.write_metrics(cfg.out, "dkdm" if cfg.method == "dkdm" else "dkdm_datafree", cfg.data, spec, reference,
                    results, finished=True)
    return R.run_finished(cfg.out)

if __name__ == "__main__":
    R.cli(main)
