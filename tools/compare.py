"""The four methods side by side: one teacher, one evaluation, one table and one plot.

Each method file runs with its own flags on the same teacher, each into OUT/METHOD (a finished run is
reused, an unfinished one resumes: the method files do both). Then ONE evaluation scores every student,
loaded through load_teacher and drawn with the sampler its checkpoint records (Denoiser.sample), so no
method's evaluation code is trusted: the same seeds, the RMSE to the teacher's own DDIM at --reference-steps
from the same noise, FID/IS with --fid-samples; next to the undistilled teacher at the same network
evaluations with its DDIM and with DPM-Solver++(2M) (Lu et al. 2022): is distillation worth it over a good
solver at the same NFE?
    python tools/compare.py --quick              # the cached 16x16 shapes teacher, CPU (README: the table)
    python tools/compare.py --data cifar10 --teacher google/ddpm-cifar10-32 --fid-samples 50000 \
        --out runs/compare
Writes OUT/compare.json (every row), compare.md (the table) and compare.png (quality against NFE).
"""
import dataclasses
import glob
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common as C  # noqa: E402
import runtime as R  # noqa: E402
import dkdm  # noqa: E402
import luhman_kd  # noqa: E402
import progressive  # noqa: E402
import self_distill  # noqa: E402

METHODS = {"progressive": progressive, "luhman_kd": luhman_kd, "self_distill": self_distill, "dkdm": dkdm}

@dataclasses.dataclass
class Config:
    data: str = R.field("cifar10", f"dataset of the teacher ({R.DATASETS}): the FID reference")
    teacher: str = R.field("google/ddpm-cifar10-32", "the one teacher (a load_teacher spec; 'cached' = the "
                                                     "shared shapes teacher)")
    methods: str = R.field("progressive,luhman_kd,self_distill,dkdm", "method files to run, comma-separated")
    progressive: str = R.field("", "extra flags of progressive.py (e.g. '--start-steps 1024')")
    luhman_kd: str = R.field("", "extra flags of luhman_kd.py")
    self_distill: str = R.field("", "extra flags of self_distill.py")
    dkdm: str = R.field("", "extra flags of dkdm.py (an ADM teacher with learned variance, as the paper's)")
    reference_steps: int = R.field(256, "DDIM steps of the teacher's reference output", low=1)
    nfe: str = R.field("1,2,4,8,16", "network evaluations of the teacher's DDIM and DPM-Solver++(2M)")
    eval_samples: int = R.field(256, "seeds 0..n-1 of the RMSE", low=1, rehearse=4)
    fid_samples: int = R.field(0, "FID/IS samples per model (0 = off; the papers: 50000)", low=0, rehearse=32)
    fid_stats: str = R.field("", "cifar10 FID statistics .npz for offline machines")
    inception: str = R.field("", "Inception weights for FID/IS ('' = download once)")
    batch: int = R.field(256, "sampling batch", low=1)
    compile: bool = R.field(False, "torch.compile the teacher and each student for this evaluation (the methods "
                                   "take their own --compile)")
    device: str = R.field("auto", "auto | cpu | cuda[:N]")
    out: str = R.field("runs/compare", "folder of the runs (OUT/METHOD) and of compare.json/.md/.png")

QUICK = dict(data="shapes", teacher="cached", reference_steps=16, nfe="1,2,4,8,16", eval_samples=64,
             batch=64, out="runs/compare_quick")

# ---- the runs ----------------------------------------------------------------------------

def rehearsing(cfg):
    return R.full_config(cfg) is not cfg

def run_dir(cfg, name):
    """OUT/METHOD, where a method's run is (under --rehearse its own rehearsal folder inside)."""
    return os.path.join(cfg.out, name, *["rehearsal"] * rehearsing(cfg))

def run_methods(cfg, spec, quick):
    """Each method file's main with its own flags (--quick in small) on the one teacher, into OUT/METHOD
    (--rehearse: rehearsed, each its phases in the one table)."""
    for name in cfg.methods.split(","):
        argv = ["--quick"] * quick + ["--rehearse"] * rehearsing(cfg) + [
            "--teacher", spec, "--data", cfg.data, "--device", cfg.device,
            "--out", os.path.join(cfg.out, name), *shlex.split(getattr(cfg, name))]
        R.print0(f"== {name} {' '.join(argv)}")
        METHODS[name].main(argv)

def students(cfg):
    """{(method, checkpoint name): path} of every student the runs left, each a teacher checkpoint."""
    found = {}
    for name in cfg.methods.split(","):
        out = run_dir(cfg, name)
        paths = {"progressive": sorted(glob.glob(os.path.join(out, "student_*steps.pt"))),
                 "luhman_kd": [p for p in (os.path.join(out, "best.pt"),) if os.path.exists(p)]
                 or [os.path.join(out, "ckpt.pt")],
                 "self_distill": [os.path.join(out, "ckpt.pt")],
                 "dkdm": [os.path.join(out, "student.pt")]}[name]
        found.update({(name, os.path.basename(p)[:-3]): p for p in paths if "_reparam" not in p})
    return found

def cost(cfg, name):
    """Updates, teacher network evaluations (images times passes) and wall time of a run, from its files."""
    out = run_dir(cfg, name)
    run = json.load(open(os.path.join(out, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    train = [r for r in rows if "loss" in r and r.get("stage") not in ("teacher", "test")]
    groups = {}
    for r in train:  # progressive counts updates per round
        groups[r.get("round")] = max(groups.get(r.get("round"), 0), r.get("update", r.get("step", 0)))
    pairs = sum(r["pairs"] / r["pairs_per_s"] for r in rows if r.get("stage") == "pairs")
    wall = max(r["elapsed_s"] for r in train) + pairs  # elapsed_s counts from the start of the training
    updates = sum(groups.values())
    if name == "progressive":  # two teacher passes per image, one in the re-parameterisation round
        one_step = {r["round"] for r in train if r["round"] > 1 and any(
            p["round"] == r["round"] - 1 and p["steps"] == r["steps"] for p in train)}
        evals = sum(u * run["batch"] * (1 if k in one_step else 2) for k, u in groups.items())
    elif name == "luhman_kd":  # the pairs: a teacher DDIM chain each
        evals = (run["num_pairs"] + run["num_test_pairs"]) * run["teacher_steps"]
    elif name == "self_distill":  # the target's passes: the model's own (DSD), the frozen teacher's (TSD)
        evals = updates * run["batch"] * (2 if run["variant"] == "tsd" else 1)
    else:  # one teacher step per entry and update (the dynamic set's preparation is not counted)
        evals = updates * run["batch"]
    return {"updates": updates, "teacher_evals": evals, "wall_s": wall}

# ---- one evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(cfg, teacher, models, device):
    """Rows of the table: the teacher's DDIM and DPM-Solver++(2M) at each --nfe, then every model
    ({(method, name): Denoiser with a recorded sampler}), as RMSE to the teacher's --reference-steps DDIM from
    the same seeds; FID/IS with --fid-samples."""
    seeds, shape = range(cfg.eval_samples), teacher.noise_shape
    clip = teacher.param == "eps"  # an eps model's x explodes as alpha -> 0 (the method files clip it too)
    full = R.full_config(cfg)  # the full run's counts, under --rehearse
    label = lambda z, seeds: C.seeded_labels(seeds, teacher.num_classes, z.device)  # a conditional teacher's

    fast = R.compiled(teacher, cfg.compile)

    def teacher_sampler(solver, n):
        times = C.sampler_times(teacher.schedule, n, "unit")
        return lambda z, seeds: teacher.image(solver(fast, z, times, clip, label(z, seeds)))

    def row(method, model, steps, sampler, fn):
        images = R.generate(fn, seeds, shape, cfg.batch, device, f"{method} {model}", full.eval_samples)
        scores = {}
        if cfg.fid_samples:
            folder = os.path.join(cfg.out, "samples", f"{method}_{model}_{sampler}_{steps}")
            R.sample_to_folder(fn, cfg.fid_samples, folder, shape, cfg.batch, device, full=full.fid_samples)
            ref = R.reference_pngs(cfg.data, cfg.fid_samples,
                                   os.path.join(cfg.out, "samples", f"data_{cfg.fid_samples}"), cfg.fid_stats,
                                   image_size=teacher.image_shape[-1])
            scores = R.fid_is(folder, cfg.data, device, cfg.inception or None, ref, cfg.fid_stats or None,
                              full=full.fid_samples)
        result = {"method": method, "model": model, "steps": steps, "sampler": sampler,
                  "rmse_to_reference": C.rmse(images, reference), "fid": scores.get("fid"),
                  "is": scores.get("is"), "fidelity": sampler != "ancestral"}  # ancestral: its own noise
        R.print0(f"{method:13s} {model:20s} {steps:4d} NFE  {sampler:9s} "
                 f"RMSE {result['rmse_to_reference']:.4f}")
        return result

    reference = R.generate(teacher_sampler(C.ddim_sample, cfg.reference_steps), seeds, shape, cfg.batch,
                           device, "reference", full.eval_samples)
    rows = []
    for n in [int(v) for v in cfg.nfe.split(",")]:
        rows.append(row("teacher", "ddim", n, "ddim", teacher_sampler(C.ddim_sample, n)))
        rows.append(row("teacher", "dpm_solver_2m", n, "dpm++2m", teacher_sampler(C.dpm_solver_2m, n)))
    for (method, name), den in models.items():
        sampler = "ancestral" if den.sampler["ancestral"] else "ddim"
        rows.append(row(method, name, den.steps, sampler,
                        lambda z, seeds, den=R.compiled(den, cfg.compile): den.sample(z, seeds, label(z, seeds))))
    return rows

# ---- the table and the plot ----------------------------------------------------------------------------

def report(rows, out):
    """compare.json, compare.md and compare.png in out (rank 0). A row of an ancestral sampler (DKDM's) draws
    its own noise, which the DDIM reference does not share: its RMSE is no fidelity number, so it is marked
    in the table and left off the RMSE plot, and with FID a second panel plots FID against NFE for all."""
    if R.rank() > 0:
        return
    R.write_json(os.path.join(out, "compare.json"), rows)
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    lines = ["| method | model | NFE | sampler | RMSE to reference | FID | IS | updates | teacher evals "
             "| wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["fidelity"] else " (not fidelity)"
        lines.append(f"| {r['method']} | {r['model']} | {r['steps']} | {r['sampler']} | "
                     f"{r['rmse_to_reference']:.4f}{mark} | {fmt(r['fid'], '.2f')} | {fmt(r['is'], '.2f')} | "
                     f"{fmt(r.get('updates'), ',')} | {fmt(r.get('teacher_evals'), ',')} | "
                     f"{fmt(r.get('wall_s'), '.0f')} |")
    if not all(r["fidelity"] for r in rows):
        lines += ["", "(not fidelity): an ancestral sampler draws its own noise, not the reference's; compare it "
                      "by FID (--fid-samples)."]
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib  # the comparison's alone (requirements.txt)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("rmse_to_reference", "RMSE to the teacher's reference")] + \
        [("fid", "FID")] * any(r["fid"] is not None for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        shown = [r for r in rows if r[key] is not None and (key == "fid" or r["fidelity"])]
        for model, style in (("ddim", "k--"), ("dpm_solver_2m", "k:")):
            pts = [(r["steps"], r[key]) for r in shown if (r["method"], r["model"]) == ("teacher", model)]
            if pts:
                ax.plot(*zip(*pts), style, marker=".", label=f"teacher, {model.replace('_', '-')}")
        for method in dict.fromkeys(r["method"] for r in shown if r["method"] != "teacher"):
            pts = sorted((r["steps"], r[key]) for r in shown if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        apart = [f"{r['method']} {r['model']}" for r in rows if key != "fid" and not r["fidelity"]]
        if apart:  # ancestral rows: no fidelity number
            ax.set_title(f"not shown (ancestral, own noise): {', '.join(apart)}", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"))
    plt.close(fig)

def main(argv=None):
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    cfg = R.parse_config(Config, argv, quick=QUICK, doc=__doc__.split("\n\n")[0])
    unknown = set(cfg.methods.split(",")) - set(METHODS)
    if unknown:
        raise ValueError(f"--methods: unknown {sorted(unknown)}; expected some of {', '.join(METHODS)}")
    device = R.setup_device(cfg.device)
    cfg = R.rehearsal(cfg)  # --rehearse: every count cut, each method rehearsed, into OUT/rehearsal
    if cfg.fid_samples:
        R.prepare_fid(cfg.data, cfg.inception or None, cfg.fid_stats or None)
    spec = R.cached_teacher() if cfg.teacher == "cached" else cfg.teacher
    teacher = R.load_teacher(spec, device)
    run_methods(cfg, spec, quick)
    models = {key: R.load_teacher(path, device) for key, path in students(cfg).items()}
    rows = evaluate(cfg, teacher, models, device)
    for r in rows:
        r.update(cost(cfg, r["method"]) if r["method"] != "teacher" else {})
    report(rows, cfg.out)
    if R.rank() == 0:
        print(open(os.path.join(cfg.out, "compare.md")).read())
    return rows

if __name__ == "__main__":
    R.cli(main)
