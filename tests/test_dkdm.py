"""dkdm.py (Xiang et al. 2025): the reverse Gaussians against IDDPM's formulas, the DKDM objective (L'vlb is
zero between identical models and trains only the variance), the dynamic set (size, spread of t, write-back),
a ViT student of a U-Net teacher, the data-free baseline, resume, bad flags, table 2 / fig. 4a in small."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common as C
import runtime as R
import dkdm as D

def _teacher(arch="dit", var="learned_range", seed=0):
    """A small teacher with random (non-zero) weights on the linear schedule: every path matters, and it is
    fast."""
    torch.manual_seed(seed)
    kw = dict(hidden=32) if arch == "dit" else dict(ch=16)
    net = C.build_net("dit_tiny" if arch == "dit" else "tiny", zero_init=False,
                      out_channels=6 if var == "learned_range" else 3, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return C.Denoiser(net, C.Schedule("linear"), "eps", var).eval()

def _teacher_file(tmp_path, **kw):
    path = str(tmp_path / "teacher.pt")
    R.save_checkpoint(path, **_teacher(**kw).state(), method="teacher", config={})
    return path

def _small(tmp_path, teacher, *flags):
    """--quick shrunk to seconds: a random teacher file, a short chain, few updates and evaluation samples."""
    return ["--quick", "--teacher", teacher, "--out", str(tmp_path), "--device", "cpu", "--chain-steps", "10",
            "--rho", "0.5", "--batch", "8", "--updates", "12", "--eval-samples", "4", "--eps-samples", "16",
            "--eval-steps", "5", "--log-every", "4", "--ckpt-every", "4", *flags]

class Spy(torch.nn.Module):
    """Keeps the network's raw output, to read the gradient that reaches it."""

    def __init__(self, net):
        super().__init__()
        self.net, self.out = net, None

    def forward(self, x, t):
        self.out = self.net(x, t)
        self.out.retain_grad()
        return self.out

def _row(metrics, model, sampler="ddim"):
    return next(r for r in metrics["results"] if r["model"] == model and r["sampler"] == sampler)

def test_reverse_gaussian_matches_iddpm_respaced_formulas():
    """Eqs. 7 and 12 on a respaced chain, written out as IDDPM's SpacedDiffusion does in float64: betas from
    the kept alpha-bars, posterior mean coefficients, log-variance clipped at the first step."""
    schedule = C.Schedule("cosine")
    grid = torch.tensor(sorted(C.sampler_times(schedule, 20, "linspace")))
    abar = schedule.alphas_cumprod[grid].numpy()
    betas = 1 - abar / np.append(1.0, abar[:-1])
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    log_small = np.log(np.append(post_var[1], post_var[1:]))
    coef_x = betas * np.sqrt(abar_prev) / (1 - abar)
    coef_z = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    k = torch.arange(20)
    z, x = torch.randn(20, 3, 4, 4, dtype=torch.float64), torch.rand(20, 3, 4, 4, dtype=torch.float64) * 2 - 1
    frac = torch.rand(20, 3, 4, 4, dtype=torch.float64)
    mean, logvar = D.reverse_gaussian(schedule, grid, z.float(), k, x.float(), frac.float())
    b = lambda a: torch.from_numpy(a).view(-1, 1, 1, 1)
    assert torch.allclose(mean.double(), b(coef_x) * x + b(coef_z) * z, atol=1e-5)
    assert torch.allclose(logvar.double(), frac * b(np.log(betas)) + (1 - frac) * b(log_small), atol=2e-4)
    # the full chain (K = T) is common.step_gaussian's
    t = torch.tensor([0, 1, 500, 999])
    ref = C.step_gaussian(schedule, z[:4].float(), t, x[:4].float(), frac[:4].float())
    ours = D.reverse_gaussian(schedule, torch.arange(1000), z[:4].float(), t, x[:4].float(), frac[:4].float())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref, ours))

@pytest.mark.parametrize("var", ["learned_range", "fixed_large"])
def test_vlb_is_zero_between_identical_models_and_trains_only_the_variance(var):
    teacher = _teacher(var=var)
    grid = torch.tensor(sorted(C.sampler_times(teacher.schedule, 50, "linspace")))
    z, k = torch.randn(16, 3, 16, 16), torch.arange(0, 48, 3)
    if var == "learned_range":   # the student is the teacher itself: both terms vanish
        target = D.teacher_step(teacher, grid, z, k, torch.randn_like(z), clip=False)
        simple, vlb = D.dkdm_loss(teacher.copy(), grid, z, k, target)
        assert simple.abs().max() == 0 and vlb.abs().max() < 1e-6
    target = D.teacher_step(teacher, grid, z, k, torch.randn_like(z), clip=True)
    student = D.make_student(D.Config(student="dit_tiny", seed=1), teacher)
    if var != "learned_range":  # a fixed-variance teacher's student: its variance, L*_simple alone (eq. 20)
        assert student.var == var and student.net.config.out_channels == 3
        simple, vlb = D.dkdm_loss(student, grid, z, k, target)
        assert vlb.abs().max() == 0 and (simple > 0).all()
        return
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.net = Spy(student.net)
    simple, vlb = D.dkdm_loss(student, grid, z, k, target)
    vlb.sum().backward(retain_graph=True)
    grad = student.net.out.grad.clone()
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0         # only the variance channels
    student.net.out.grad = None
    simple.sum().backward()
    grad = student.net.out.grad
    assert grad[:, 3:].abs().max() == 0 and grad[:, :3].abs().max() > 0         # L'simple only the eps ones
    assert torch.isfinite(vlb).all() and (vlb > 0).all()

def test_dynamic_set_keeps_its_size_and_a_uniform_spread_of_t():
    """Shuffle denoise spreads the entries uniformly over the chain (sec. 3.3); updates of b random entries
    (alg. 1 lines 4, 8) move just those one step, restart finished ones from noise, keep size and spread."""
    teacher, K, n, b = _teacher(), 20, 200, 10
    grid = torch.tensor(sorted(C.sampler_times(teacher.schedule, K, "linspace")))
    gen = torch.Generator().manual_seed(0)
    kset = D.shuffle_denoise(teacher, grid, D.new_set(n, K, (3, 16, 16), "dynamic", gen), 64, True, gen)
    chi2 = lambda k: float(((torch.bincount(k, minlength=K) - n / K) ** 2 / (n / K)).sum())
    assert sorted(kset) == ["k", "z"] and kset["z"].shape == (n, 3, 16, 16)
    assert chi2(kset["k"]) < 43.8                                      # p = 0.001 at 19 degrees of freedom
    for update in range(400):                                          # 4000 draws: every entry cycles ~once
        idx = D.draw(n, b, "dynamic", gen)
        z, k = kset["z"][idx], kset["k"][idx]
        before = {key: v.clone() for key, v in kset.items()}
        target = D.teacher_step(teacher, grid, z, k, torch.randn(z.shape, generator=gen), True)
        D.write_back(kset, idx, k, target["z_prev"], K, gen)
        rest = torch.ones(n, dtype=torch.bool)
        rest[idx] = False
        assert len(idx.unique()) == b and torch.equal(kset["z"][rest], before["z"][rest])
        assert torch.equal(kset["k"][idx], torch.where(k == 0, K - 1, k - 1))
        assert torch.equal(kset["z"][idx][k > 0], target["z_prev"][k > 0])
    assert kset["z"].shape == (n, 3, 16, 16) and chi2(kset["k"]) < 43.8
    assert torch.isfinite(kset["z"]).all() and kset["z"].abs().max() < 10
    # iterative distillation: one batch, no shuffle, denoised in lockstep
    it = D.shuffle_denoise(teacher, grid, D.new_set(b, K, (3, 16, 16), "iterative", gen), 64, True, gen)
    for step in range(K + 1):
        assert (it["k"] == (K - 1 - step) % K).all()
        idx = D.draw(b, b, "iterative", gen)
        noise = torch.randn(it["z"].shape, generator=gen)
        target = D.teacher_step(teacher, grid, it["z"], it["k"], noise, True)
        D.write_back(it, idx, it["k"].clone(), target["z_prev"], K, gen)

def test_vit_student_learns_from_a_unet_teacher(tmp_path):
    """Table 5 in small: a DiT student, randomly initialised, distilled from the shapes U-Net teacher."""
    metrics = D.main(_small(tmp_path / "run", R.cached_teacher(), "--student", "dit_tiny", "--updates", "40",
                            "--ema", "0.5"))
    student, init = _row(metrics, "student"), _row(metrics, "student_init")
    print(f"eps RMSE {init['eps_rmse']:.4f} -> {student['eps_rmse']:.4f}")
    assert student["eps_rmse"] < 0.8 * init["eps_rmse"]
    den = R.load_teacher(str(tmp_path / "run" / "student.pt"))       # the student is a teacher in its turn
    assert isinstance(den.net, C.DiT) and den.var == "learned_range"

def test_datafree_baseline_trains_on_teacher_samples_and_fid_is_wired(tmp_path, monkeypatch):
    teacher, calls = _teacher_file(tmp_path), []
    monkeypatch.setattr(R, "prepare_fid", lambda *args: None)  # offline: no Inception weights to fetch
    monkeypatch.setattr(R, "fid_is", lambda folder, data, device, inception, ref_folder, stats, full:
        calls.append((len(os.listdir(folder)), len(os.listdir(ref_folder)))) or {"fid": 1.5, "is": 2.5})
    metrics = D.main(_small(tmp_path / "run", teacher, "--method", "datafree", "--synthetic", "6",
                            "--synthetic-steps", "4", "--fid-samples", "5", "--fid-teacher", "true"))
    assert metrics["method"] == "dkdm_datafree" and math.isfinite(_row(metrics, "student")["eps_rmse"])
    folder = tmp_path / "run" / "synthetic"
    assert len(os.listdir(folder)) == 6
    den = R.load_teacher(teacher)                                      # the files are the teacher's samples
    times = C.sampler_times(den.schedule, 4, "linspace")
    seed = 10 ** 6
    sample = C.ancestral_sample(den, C.seeded_noise([seed], (3, 16, 16)), times, [seed], clip=True)
    assert torch.equal(R.load_dataset(f"folder:{folder}", 16)[0], C.to_uint8(sample[0]))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"train"' in line]
    assert [r["update"] for r in rows] == [4, 8, 12] and all(math.isfinite(r["loss"]) for r in rows)
    # FID/IS of the ancestral samplers only: the student's and the teacher's, 5 samples against 5 real images
    assert calls == [(5, 5), (5, 5)]
    assert [(r["model"], r["sampler"]) for r in metrics["results"] if r["fid"] == 1.5 and r["is"] == 2.5] == [
        ("teacher", "ancestral"), ("student", "ancestral")]

def test_resume_restores_the_dynamic_set(tmp_path, kill_on_call):
    teacher = _teacher_file(tmp_path)
    flags = ("--dropout", "0.1")                                       # dropout masks must repeat too
    straight = D.main(_small(tmp_path / "a", teacher, *flags))
    revive = kill_on_call(D, "ema_update", 7)                          # killed in update 7
    with pytest.raises(KeyboardInterrupt):
        D.main(_small(tmp_path / "b", teacher, *flags))
    crashed = R.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert crashed["step"] == 4 and crashed["knowledge"]["z"].shape[0] == 5 * 8     # round(rho K) b entries
    revive()
    resumed = D.main(_small(tmp_path / "b", teacher, *flags))
    a, b = (R.load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("a", "b"))
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert all(torch.equal(a["knowledge"][key], b["knowledge"][key]) for key in ("z", "k"))
    assert resumed["results"] == straight["results"]
    assert D.main(_small(tmp_path / "b", teacher, *flags)) == resumed          # a finished run is not redone

@pytest.mark.parametrize("flags,message", [
    (["--collect", "random"], "invalid choice: 'random'"),
    (["--student", "resnet"], "invalid choice: 'resnet'"),
    (["--batch", "0"], "--batch: must be at least 1"), (["--rho", "0.001"], "--rho 0.001: round(rho K) = 0"),
    (["--chain-steps", "5000"], "--chain-steps 5000: the teacher has T = 1000"),
    (["--ema", "1"], "--ema: must be below 1.0"),
    (["--data", "cifar10", "--teacher", ""], "--teacher: which model")])
def test_bad_flags_are_one_line_errors_before_any_work(tmp_path, flags, message):
    teacher = _teacher_file(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as e:
        D.main(["--quick", "--teacher", teacher, "--out", str(tmp_path / "run"), *flags])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")

def test_quick_run_shows_table_2_and_fig_4a_in_small(tmp_path):
    """--quick end to end, and in small what table 2 and fig. 4a claim: with the same number of updates, the
    dynamic student's eps error against the teacher on fresh teacher trajectories is lower than the iterative
    student's, and its DDIM output is closer to the teacher's than at initialisation."""
    dynamic = D.main(["--quick", "--out", str(tmp_path / "dynamic")])
    iterative = D.main(["--quick", "--out", str(tmp_path / "iterative"), "--collect", "iterative",
                        "--eval-samples", "4"])
    d, i = _row(dynamic, "student"), _row(iterative, "student")
    print(f"eps RMSE: dynamic {d['eps_rmse']:.4f}, iterative {i['eps_rmse']:.4f}; DDIM RMSE to the teacher: "
          f"{_row(dynamic, 'student_init')['rmse_to_reference']:.4f} at init -> {d['rmse_to_reference']:.4f}")
    assert d["eps_rmse"] < i["eps_rmse"]
    assert d["rmse_to_reference"] < 0.7 * _row(dynamic, "student_init")["rmse_to_reference"]
    assert dynamic["method"] == "dkdm" and dynamic == json.load(open(tmp_path / "dynamic" / "metrics.json"))
    for name in ("config.json", "log.jsonl", "ckpt.pt", "student.pt", "samples.png"):
        assert os.path.exists(tmp_path / "dynamic" / name), name
    assert R.load_checkpoint(str(tmp_path / "dynamic" / "ckpt.pt"))["knowledge"]["z"].shape[0] == 10 * 16

def test_ema_snapshots_load_as_teachers_and_an_evaluation_only_run_scores_them(tmp_path):
    """Issue 23: the early stop of '200k with early stop' is reproducible: EMA snapshots every
    --snapshot-every updates, each a teacher checkpoint; --eval-snapshots scores all or some of them (the same
    rows as the run's own evaluation) without training or touching the run's results."""
    teacher = _teacher_file(tmp_path)
    out = tmp_path / "run"
    metrics = D.main(_small(out, teacher, "--snapshot-every", "4"))
    assert sorted(os.listdir(out / "snapshots")) == ["ema_0000004.pt", "ema_0000008.pt", "ema_0000012.pt"]
    last, student = (R.load_teacher(str(out / p)) for p in ("snapshots/ema_0000012.pt", "student.pt"))
    for name, tensor in student.net.state_dict().items():
        assert torch.equal(tensor, last.net.state_dict()[name]), name
    before = {n: open(out / n, "rb").read() for n in ("metrics.json", "log.jsonl", "config.json")}
    rows = D.main(_small(out, teacher, "--eval-snapshots", "all"))
    assert [(r["update"], r["sampler"]) for r in rows] == [(u, s) for u in (4, 8, 12)
                                                           for s in ("ddim", "ancestral")]
    final = [r for r in metrics["results"] if r["model"] == "student"]
    for row, ours in zip(final, rows[-2:]):  # the last snapshot is the evaluated student
        assert row["eps_rmse"] == ours["eps_rmse"] and row["rmse_to_reference"] == ours["rmse_to_reference"]
    assert json.load(open(out / "snapshots.json")) == rows
    assert [r["update"] for r in D.main(_small(out, teacher, "--eval-snapshots", "8"))] == [8, 8]
    assert {n: open(out / n, "rb").read() for n in before} == before
    with pytest.raises(ValueError, match=r"no snapshot of update\(s\) \[5\]"):
        D.main(_small(out, teacher, "--eval-snapshots", "4,5"))
