"""The four methods side by side (tools/compare.py): every student samples itself from its checkpoint exactly
as its method's own evaluation sampled it, one metrics schema, and the comparison's evaluation, table and plot
on tiny checkpoints."""
import json
import os
import sys

import pytest
from PIL import Image

import common as C
import runtime as R
import dkdm
import luhman_kd
from test_inputs import METHODS, _teacher_file, _tiny

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import compare  # noqa: E402

def _own_rows(method, out, teacher):
    """(images of the loaded student from den.sample, the reference images, the row its method wrote)."""
    cfg = json.load(open(out / "config.json"))
    rows = json.load(open(out / "metrics.json"))["results"]
    shape = (3, 16, 16)
    if method == "progressive":
        den = R.load_teacher(str(out / "student_1steps.pt"))
        reference = R.load_checkpoint(out / "ckpt.pt")["reference"]
        seeds, batch = range(cfg["eval_samples"]), cfg["batch"]
        row = next(r for r in rows if r["model"] == "student" and r["steps"] == 1 and r["sampler"] == "ddim")
    elif method == "luhman_kd":
        den = R.load_teacher(str(out / "best.pt"))
        seeds, batch = luhman_kd.noise_seeds(cfg["seed"], "eval", 0, cfg["eval_n"]), cfg["gen_batch"]
        times = C.sampler_times(teacher.schedule, cfg["teacher_steps"], cfg["skip"])
        reference = R.generate(lambda z, s: luhman_kd.teacher_x0(teacher, z, times), seeds, shape, batch,
                               "cpu")
        row = next(r for r in rows if r["model"] == "student" and "image_size" not in r)
    elif method == "self_distill":
        den = R.load_teacher(str(out / "ckpt.pt"))
        seeds, batch = range(cfg["eval_samples"]), cfg["eval_batch"]
        times = C.sampler_times(teacher.schedule, cfg["reference_steps"], cfg["skip"])
        reference = R.generate(lambda z, s: C.ddim_sample(teacher, z, times, clip=True).clamp(-1, 1), seeds,
                               shape, batch, "cpu")
        row = next(r for r in rows if r["model"] == "student" and r["steps"] == den.steps)
    else:
        den = R.load_teacher(str(out / "student.pt"))
        seeds, batch = range(cfg["eval_samples"]), cfg["batch"]
        run = R.parse_config(dkdm.Config, [f"--eval-steps={cfg['eval_steps']}"])
        reference = R.generate(dkdm.samplers(run, teacher)["ancestral"], seeds, shape, batch, "cpu")
        row = next(r for r in rows if r["model"] == "student" and r["sampler"] == "ancestral")
    images = R.generate(lambda z, s: den.sample(z, s), seeds, shape, batch, "cpu")
    return den, images, reference, row

@pytest.mark.parametrize("method", METHODS)
def test_a_student_loaded_from_its_checkpoint_samples_as_its_method_evaluated_it(tmp_path, method):
    """Issue 22: load_teacher gives a Denoiser that samples with one call, den.sample(z, seeds), exactly as
    the method's own evaluation did (the same images: the same RMSE to the bit), without knowing the method;
    and every metrics row has the one schema."""
    teacher_path = _teacher_file(tmp_path / "t.pt", var="learned_range")
    out = tmp_path / "run"
    METHODS[method].main(["--quick", "--device", "cpu", "--out", str(out), *_tiny(method, teacher_path)])
    den, images, reference, row = _own_rows(method, out, R.load_teacher(teacher_path))
    assert den.steps == row["steps"] and C.rmse(images, reference) == row["rmse_to_reference"]
    for r in json.load(open(out / "metrics.json"))["results"]:
        assert {"model", "steps", "sampler", "rmse_to_reference", "fid", "is"} <= set(r), r
    expected = {"progressive": (1, False), "luhman_kd": (1, False), "self_distill": (2, False),
                "dkdm": (5, True)}[method]
    assert (den.steps, den.sampler["ancestral"]) == expected

def test_the_comparison_scores_every_student_and_the_teacher_baselines(tmp_path, monkeypatch):
    """The comparison's one evaluation on tiny checkpoints: a row per student and per teacher solver and NFE,
    RMSEs equal to a direct computation, every network through --compile, and the table and the plot written,
    DKDM's ancestral row marked as no fidelity number."""
    compiled = []
    monkeypatch.setattr(R, "compiled", lambda den, on=True: compiled.append(on) or den)  # CPU: no inductor
    teacher = R.load_teacher(_teacher_file(tmp_path / "t.pt", var="learned_range"))
    spec = lambda n, **kw: C.sampler_spec(C.sampler_times(teacher.schedule, n, "unit"), **kw)
    models = {("progressive", "student_2steps"): teacher.copy(sampler=spec(2, clip=True)).eval(),
              ("luhman_kd", "best"): teacher.copy(sampler=spec(1, clip=True)).eval(),
              ("self_distill", "ckpt"): teacher.copy(sampler=spec(4, clip=True)).eval(),
              ("dkdm", "student"): teacher.copy(sampler=spec(3, ancestral=True, clip=True)).eval()}
    cfg = R.parse_config(compare.Config, ["--quick", "--nfe", "1,2,4", "--eval-samples", "6",
                                          "--batch", "4", "--reference-steps", "8", "--compile", "true",
                                          "--out", str(tmp_path / "cmp")],
                         quick=compare.QUICK)
    os.makedirs(cfg.out)
    rows = compare.evaluate(cfg, teacher, models, "cpu")
    assert [(r["method"], r["model"], r["steps"]) for r in rows] == [
        ("teacher", solver, n) for n in (1, 2, 4) for solver in ("ddim", "dpm_solver_2m")] + [
        ("progressive", "student_2steps", 2), ("luhman_kd", "best", 1), ("self_distill", "ckpt", 4),
        ("dkdm", "student", 3)]
    z = C.seeded_noise(range(6), (3, 16, 16))
    times = C.sampler_times(teacher.schedule, 8, "unit")
    reference = C.ddim_sample(teacher, z, times, clip=True).clamp(-1, 1)
    dkdm_row, dpm_row = rows[-1], rows[5]  # rel 1e-4: float32 at another batch size moves an RMSE ~1e-5 rel.
    direct = models[("dkdm", "student")].sample(z, range(6))
    assert dkdm_row["rmse_to_reference"] == pytest.approx(C.rmse(direct, reference), rel=1e-4)
    dpm = C.dpm_solver_2m(teacher, z, C.sampler_times(teacher.schedule, 4, "unit"), clip=True).clamp(-1, 1)
    assert dpm_row["rmse_to_reference"] == pytest.approx(C.rmse(dpm, reference), rel=1e-4)
    assert compiled == [True] * 5 and [r["fidelity"] for r in rows] == [True] * 9 + [False]
    compare.report(rows, cfg.out)
    assert json.load(open(os.path.join(cfg.out, "compare.json"))) == rows
    table = open(os.path.join(cfg.out, "compare.md")).read().splitlines()
    assert len(table) == 4 + len(rows) and all(f"| {r['method']} | {r['model']} |" in "\n".join(table)
                                               for r in rows)
    assert f"| {dkdm_row['rmse_to_reference']:.4f} (not fidelity) |" in table[-3] and "FID" in table[-1]
    with Image.open(os.path.join(cfg.out, "compare.png")) as image:
        assert image.format == "PNG" and image.size[0] > 300
