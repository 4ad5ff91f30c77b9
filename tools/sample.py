"""Sample any model that runtime.load_teacher reads (NVlabs/edm's generate.py): a student with the sampler its
checkpoint records, a teacher (a checkpoint, a diffusers folder or hub id) with --steps and --sampler.

Sample s is drawn from seed s alone (its noise, an ancestral sampler's noise, a class-conditional model's
label: the methods' own evaluation seeding), so a seed's image is the same whatever the batch and number of
processes. Outputs: PNGs one per seed (OUTDIR/000042.png, sharded over torchrun's ranks, resumable: seeds
already written are skipped), one .npz in guided-diffusion's evaluator format (arr_0 uint8 (N, H, W, 3) in
seed order, arr_1 the labels of a class-conditional model), a grid, FID/IS of the folder (runtime.fid_is).
    python tools/sample.py --model runs/progressive_quick/student_1steps.pt --seeds 0-63 --grid g.png
    torchrun --standalone --nproc_per_node=8 tools/sample.py --model google/ddpm-cifar10-32 --steps 100 \
        --sampler dpm++2m --seeds 0-49999 --outdir samples/ddpm100 --npz samples/ddpm100.npz --fid true
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402
import runtime as R  # noqa: E402

SOLVERS = {"ddim": C.ddim_sample, "dpm++2m": C.dpm_solver_2m, "ancestral": C.ancestral_sample}

@dataclasses.dataclass
class Config:
    model: str = R.field("", "a checkpoint of this project (a student: its recorded sampler), a diffusers "
                             "folder or a hub id")
    seeds: str = R.field("0-63", "seeds, EDM's syntax: 0-49999 or 0,5,10-19")
    steps: int = R.field(0, "a model without a recorded sampler (a teacher): its network evaluations", low=0)
    sampler: str = R.field("ddim", "the sampler of a teacher (--steps): ddim, DPM-Solver++(2M) or ancestral "
                                   "(its own variance)", choices=tuple(SOLVERS))
    skip: str = R.field("uniform", "the timestep grid of a teacher (common.sampler_times)", choices=C.SKIPS)
    clip: str = R.field("auto", "clip x_pred to [-1, 1] while sampling a teacher (auto: eps models, as the "
                                "methods do)", choices=("auto", "yes", "no"))
    classes: str = R.field("", R.CLASSES_HELP)
    outdir: str = R.field("", "folder of PNGs, one per seed (resumable)")
    npz: str = R.field("", ".npz file: arr_0 uint8 (N, H, W, 3) in seed order, arr_1 the labels if any")
    grid: str = R.field("", "PNG grid of the first 64 seeds' samples")
    fid: bool = R.field(False, "FID/IS of the --outdir samples, a folder of these seeds alone (runtime.fid_is)")
    data: str = R.field("cifar10", f"FID reference dataset ({R.DATASETS})")
    fid_stats: str = R.field("", "FID statistics .npz (mu and sigma, or images arr_0)")
    inception: str = R.field("", "Inception weights for FID/IS ('' = download once)")
    batch: int = R.field(64, "samples per batch and process", low=1)
    device: str = R.field("auto", "auto | cpu | cuda[:N]")

def parse_seeds(text):
    """EDM's parse_int_list: '0-49999' (inclusive) or '0,5,10-19' -> a list of ints; a one-line ValueError."""
    seeds = []
    try:
        for part in text.split(","):
            a, dash, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if dash else int(a)
            if not 0 <= lo <= hi:
                raise ValueError
            seeds += range(lo, hi + 1)
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected seeds >= 0 as 0-49999 or 0,5,10-19") from None
    return seeds

def runs(seeds):
    """The seeds as (first, count) runs of consecutive seeds: sample_to_folder's unit."""
    out = []
    for s in seeds:
        if out and s == out[-1][0] + out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([s, 1])
    return out

def check(cfg):
    """What argparse cannot check, before any work."""
    if not cfg.model:
        raise ValueError("--model: pass a checkpoint, a diffusers folder or a hub id")
    if not (cfg.outdir or cfg.npz or cfg.grid):
        raise ValueError("nothing to write: pass --outdir, --npz and/or --grid")
    if cfg.fid and not cfg.outdir:
        raise ValueError("--fid true scores a folder of PNGs: pass --outdir")
    for flag, path in (("--fid-stats", cfg.fid_stats), ("--inception", cfg.inception)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    seeds = parse_seeds(cfg.seeds)
    if cfg.fid and os.path.isdir(cfg.outdir):  # FID scores the whole folder: only these seeds' images
        names = {f"{s:06d}.png" for s in seeds}
        other = [f for f in R.image_files(cfg.outdir) if os.path.relpath(f, cfg.outdir) not in names]
        if other:
            raise ValueError(f"--fid true scores every image in --outdir {cfg.outdir}, which holds {len(other)} "
                             f"besides --seeds {cfg.seeds} (e.g. {os.path.relpath(other[0], cfg.outdir)}): "
                             "pass another --outdir, or the seeds it holds")
    return seeds

def sample_fn(cfg, den, classes):
    """fn(z, seeds) -> images in [-1, 1]: the student's recorded sampler, or the teacher's --sampler over
    --steps; each seed's label from the seed (seeded_labels, or --classes), as the methods evaluate."""
    if den.sampler is not None and cfg.steps:
        raise ValueError(f"{cfg.model} is a student distilled for its recorded sampler ({den.steps} network "
                         "evaluations): drop --steps")
    if den.sampler is None and not cfg.steps:
        raise ValueError(f"{cfg.model} records no sampler (a teacher): pass --steps N and --sampler")
    label = lambda z, seeds: C.seeded_labels(seeds, den.num_classes, z.device, classes)
    if den.sampler is not None:
        return lambda z, seeds: den.sample(z, seeds, label(z, seeds))
    C.check_steps(den.schedule, cfg.skip, steps=cfg.steps)
    times = C.sampler_times(den.schedule, cfg.steps, cfg.skip)
    clip = cfg.clip == "yes" or (cfg.clip == "auto" and den.param == "eps")
    if cfg.sampler == "ancestral":
        return lambda z, seeds: den.image(C.ancestral_sample(den, z, times, seeds, None, clip, label(z, seeds)))
    return lambda z, seeds: den.image(SOLVERS[cfg.sampler](den, z, times, clip, label(z, seeds)))

def read_folder(folder, seeds):
    """The seeds' PNGs as uint8 (N, C, H, W), in seed order."""
    from PIL import Image
    images = [np.asarray(Image.open(os.path.join(folder, f"{s:06d}.png"))) for s in seeds]
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

def main(argv=None):
    cfg = R.parse_config(Config, argv, doc=__doc__.split("\n\n")[0])
    seeds = check(cfg)
    device = R.setup_device(cfg.device)
    if cfg.fid:
        R.prepare_fid(cfg.data, cfg.inception or None, cfg.fid_stats or None)
    den = R.load_teacher(cfg.model, device)
    classes = R.eval_classes(cfg.classes, den)
    fn = sample_fn(cfg, den, classes)
    shape = den.noise_shape  # a latent model's latents
    if cfg.outdir:
        for first, n in runs(seeds):
            R.sample_to_folder(fn, n, cfg.outdir, shape, cfg.batch, device, seed0=first)
        wanted = seeds if cfg.npz else seeds[:64] if cfg.grid else []
        images = read_folder(cfg.outdir, wanted) if wanted else None
    else:
        images = C.to_uint8(R.generate(fn, seeds if cfg.npz else seeds[:64], shape, cfg.batch, device))
    if R.rank() == 0 and cfg.npz:
        labels = C.seeded_labels(seeds, den.num_classes, "cpu", classes)
        arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
        arrays.update({"arr_1": labels.numpy()} if labels is not None else {})
        os.makedirs(os.path.dirname(os.path.abspath(cfg.npz)), exist_ok=True)
        with open(f"{cfg.npz}.{os.getpid()}.tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(f"{cfg.npz}.{os.getpid()}.tmp", cfg.npz)
    if cfg.grid:
        R.save_grid(C.to_float(images[:64]), cfg.grid)
    scores = None
    if cfg.fid:
        ref = R.reference_pngs(cfg.data, len(seeds), cfg.outdir.rstrip("/") + f"_data_{len(seeds)}",
                               cfg.fid_stats or None, image_size=den.image_shape[-1])
        scores = R.fid_is(cfg.outdir, cfg.data, device, cfg.inception or None, ref, cfg.fid_stats or None)
        R.print0(f"{len(seeds)} samples of {cfg.model}: FID {scores['fid']:.3f}, IS {scores['is']:.3f}")
    written = ", ".join(p for p in (cfg.outdir, cfg.npz, cfg.grid) if p)
    R.print0(f"{len(seeds)} seeds of {cfg.model} -> {written}")
    return scores

if __name__ == "__main__":
    R.cli(main)
