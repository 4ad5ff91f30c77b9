"""self_distill.py (direct self-distillation, DSD): x' and x'' of alg. 2 against two explicit DDIM steps, the
gradient of training DSD's distillation term, the schedules' plans, resume mid-schedule, one-line errors for
bad flags, and the paper's claim in small on the --quick configuration."""
import json
import math
import os

import pytest
import torch

import common as C
import runtime as R
import self_distill as S

def _den(param="eps", schedule="linear", seed=0, size=8):
    """A tiny U-Net with random (non-zero) weights read as a denoiser: every path of the model matters."""
    torch.manual_seed(seed)
    net = C.build_net("tiny", image_size=size, out_channels=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return C.Denoiser(net, C.Schedule(schedule), param)

def _close(a, b):
    """Equal up to float32 rounding of values as large as b's (an eps model's x at alpha ~ 0.006 is ~ 1e2)."""
    return (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-4

def _flat_grad(den):
    return torch.cat([p.grad.flatten() for p in den.parameters()])

def _run(tmp_path, *flags):
    metrics = S.main(["--quick", "--out", str(tmp_path), "--device", "cpu", *flags])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    return metrics, [row for row in log if "loss" in row]

def _rmse(metrics, model, steps):
    return next(r["rmse_to_reference"] for r in metrics["results"]
                if r["model"] == model and r["steps"] == steps)

@pytest.mark.parametrize("param,kind,tsd,clip", [
    ("eps", "linear", False, False), ("eps", "linear", False, True), ("v", "cosine_logsnr", False, False),
    ("eps", "linear", True, True)])
def test_x_prime_and_x_double_prime_against_two_explicit_ddim_steps(param, kind, tsd, clip):
    """Alg. 2 lines 10-16 written out in float64 per pair of steps of a 4-step grid (the last pair ends at the
    data): x' (line 12) is the model's x at z_t and carries the gradient, x'' (line 13) comes from the model's
    (for TSD the teacher's) two DDIM steps and is detached, the loss is w(lambda_t) ||x' - x''||^2, and the
    trajectory goes on from z_t''; the official code's target and weighting likewise."""
    model, teacher = _den(param, kind, seed=0), (_den(param, kind, seed=1) if tsd else None)
    mover = teacher or model
    times, alpha, sigma = S.ddim_grid(model.schedule, 4, "unit")
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for k in range(2):
        t, t1, j = float(times[2 * k]), float(times[2 * k + 1]), slice(2 * k, 2 * k + 3)
        (a_t, a1, a2), (s_t, s1, s2) = alpha[j].tolist(), sigma[j].tolist()
        zd = z.double()
        with torch.no_grad():
            x0 = mover(z, t, clip=clip)[0].double()
            z1 = a1 * x0 + s1 / s_t * (zd - a_t * x0)                                      # line 10
            x1 = mover(z1.float(), t1, clip=clip)[0].double()
            z2 = a2 * x1 + s2 / s1 * (z1 - a1 * x1)                                        # line 11
            x_model = model(z, t, clip=clip)[0].double()
        x_prime = x_model if tsd else (z1 - s1 / s_t * zd) / (a1 - s1 / s_t * a_t)          # line 12
        x_second = (z2 - s2 / s_t * zd) / (a2 - s2 / s_t * a_t)                            # line 13
        w = max(a_t ** 2 / s_t ** 2, 1.0)                                                 # truncated SNR
        assert _close(x_model, x_prime), k                                                # x' = x(z_t)
        if s2 == 0:
            assert _close(x_second, x1)                                                    # x'' = x(z_t')

        model.net.zero_grad()
        loss, z_next = S.dsd_loss(model, z, t, t1, alpha[j], sigma[j], teacher=teacher, clip=clip)
        assert _close(z_next.double(), z2), k
        expected = w * ((x_model - x_second) ** 2).mean()
        assert abs(loss.item() - expected.item()) <= 1e-4 * expected.item() + 1e-6, k
        loss.backward()
        g = _flat_grad(model)
        model.net.zero_grad()
        (w * ((model(z, t, clip=clip)[0] - x_second.float()) ** 2).mean()).backward()      # x'' constant
        assert (g - _flat_grad(model)).norm() <= 1e-2 * g.norm(), k                        # fp32 rounding
        assert not tsd or all(p.grad is None for p in teacher.parameters())

        official, _ = S.dsd_loss(model, z, t, t1, alpha[j], sigma[j], "trunc_logsnr", "next_x", teacher, clip)
        w_log = max(math.log(a_t ** 2 / s_t ** 2), 1.0)                                    # max(log SNR, 1)
        expected = w_log * ((x_model - x1) ** 2).mean().item()
        assert abs(official.item() - expected) <= 1e-4 * expected + 1e-6
        z = z_next.detach()

def test_last_step_to_alpha_bar_0_in_training_and_sampling(tmp_path):
    """--last-step alphabar0 (LDM's DDIMSampler): the grid's end is alpha-bar_0, and the trajectory of the last
    update lands where ddim_sample's last step to time 0 does; a continuous schedule has no alpha-bar_0."""
    model = _den("eps", "linear")
    times, alpha, sigma = S.ddim_grid(model.schedule, 2, "ldm", last=0)
    a0, s0 = model.schedule.alpha_sigma(0)
    assert abs(alpha[-1] - a0) < 1e-6 and abs(sigma[-1] - s0) < 1e-6 and s0 > 0.005  # float32 vs float64
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, z_end = S.dsd_loss(model, z, float(times[0]), float(times[1]), alpha, sigma)
    with torch.no_grad():
        assert _close(z_end, C.ddim_sample(model, z, times.tolist(), last=0))
    path = str(tmp_path / "v.pt")
    R.save_checkpoint(path, **_den("v", "cosine_logsnr").state(), method="teacher")
    with pytest.raises(ValueError) as e:
        S.main(["--quick", "--teacher", path, "--last-step", "alphabar0", "--out", str(tmp_path / "run")])
    assert "continuous schedule" in str(e.value) and "\n" not in str(e.value)

def test_training_dsd_distillation_term_reaches_the_weights():
    """Eq. 1 in one graph: beta ||x' - x''||^2 sends its gradient into the weights through x' = x(z_t) (this
    fails if the term is detached, as in the official code), x'' is a constant, alpha and beta add up."""
    den = _den("v", "cosine_logsnr")
    x = torch.rand(6, 3, 8, 8) * 2 - 1

    def grads(v_weight, distill_weight):
        den.net.zero_grad()
        S.training_dsd_loss(den, x, torch.Generator().manual_seed(3), 8, v_weight, distill_weight).backward()
        return _flat_grad(den)

    g_v, g_d, g_both = grads(1.0, 0.0), grads(0.0, 1.0), grads(0.85, 0.15)
    assert g_d.norm() > 1e-3 * g_v.norm() > 0
    assert (g_both - (0.85 * g_v + 0.15 * g_d)).norm() <= 1e-5 * g_both.norm()

    gen = torch.Generator().manual_seed(3)   # the same draws, written out: u, eps, z_t, x', x''
    u = torch.rand(6, generator=gen).double()
    eps = torch.randn(x.shape, generator=gen)
    us = torch.stack([u, u - 1 / 8, u - 2 / 8]).clamp_min(0)
    assert 0 < (u >= 2 / 8).sum() < len(u)                                  # both kinds of sample
    logsnr = den.schedule.logsnr(us)
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    z_t = C.bcast(alpha[0], x).float() * x + C.bcast(sigma[0], x).float() * eps
    den.net.zero_grad()
    x_pred, eps_pred = den(z_t, u)
    x_target, _, _ = S.two_step_target(den, z_t, x_pred.detach(), eps_pred.detach(), us[1], alpha, sigma)
    (((x_pred - x_target) ** 2).flatten(1).mean(1) * (u >= 2 / 8)).mean().backward()
    assert (g_d - _flat_grad(den)).norm() <= 1e-5 * g_d.norm()

def test_schedules_of_n():
    """Sec. 4.1.1 and app. J at the paper's P = 4000, N = 64: the depths, U_i trajectories of N_i/2 updates,
    about P/|N| updates per depth (DSDN, DSDI, DSDGL), exp(1/S_i) shares for DSDGEXP; TSD plans as DSDI."""
    P = 4000
    plans = {v: S.plan(v, 64, P) for v in ("dsdn", "dsdi", "dsdgl", "dsdgexp", "tsd")}
    assert plans["dsdn"] == [(64, 125, 4000)]
    assert [n for n, _, _ in plans["dsdi"]] == [64, 32, 16, 8, 4, 2] and plans["tsd"] == plans["dsdi"]
    assert [n for n, _, _ in plans["dsdgl"]] == list(range(64, 0, -2)) == [n for n, _, _ in plans["dsdgexp"]]
    for variant, rows in plans.items():
        assert all(u >= 1 and p == u * (n // 2) for n, u, p in rows), variant
        assert abs(sum(p for _, _, p in rows) - P) <= 0.01 * P, variant
        if variant != "dsdgexp":
            assert all(abs(p - P / len(rows)) <= n / 4 for n, _, p in rows), variant
    exp = plans["dsdgexp"]
    share = [math.exp(1 / max(n - 2, 1)) for n, _, _ in exp]
    for (n, _, p), w in zip(exp, share):
        assert abs(p - P * w / sum(share)) <= n / 4, n
    assert exp[-1][2] > exp[-2][2] > exp[-3][2] > exp[0][2]          # the most updates at the fewest steps
    assert S.plan("dsdi", 16, 100) == [(16, 3, 24), (8, 6, 24), (4, 12, 24), (2, 25, 25)]

@pytest.mark.parametrize("flags,message", [
    (["--variant", "dsdi", "--steps", "12"], "power of 2"), (["--variant", "dsdgl", "--steps", "7"], "even"),
    (["--eval-steps", "2,x"], "--eval-steps"), (["--variant", "nope"], "--variant"),
    (["--steps", "1"], "at least 2"), (["--lr-end", "2"], "--lr-end"),
    (["--variant", "train", "--v-weight", "0", "--distill-weight", "0"], "nothing"),
    (["--weighting", "snr"], "--weighting"), (["--clip", "maybe"], "--clip")])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, monkeypatch, flags, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")
    for name in ("load_teacher", "cached_teacher", "load_dataset", "start_run"):
        monkeypatch.setattr(R, name, no_work)
    with pytest.raises((ValueError, SystemExit)) as e:
        S.main(["--quick", "--out", str(tmp_path / "run"), *flags])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")

def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--help"])
    assert e.value.code == 0 and "--distill-weight" in capsys.readouterr().out

@pytest.mark.parametrize("variant,flags,crash_at", [
    ("dsdi", ["--steps", "4", "--updates", "12", "--skip", "ldm", "--last-step", "alphabar0",  # LDM's DDIM,
              "--eval-eta", "0.1"], 3),                    # mid-trajectory, first depth
    ("tsd", ["--steps", "4", "--updates", "12"], 9),       # after the student became the teacher
    ("train", ["--train-updates", "6", "--train-batch", "4", "--distill-steps", "4"], 3)])
def test_resume_mid_schedule_reproduces_an_uninterrupted_run(tmp_path, monkeypatch, variant, flags, crash_at):
    flags = ["--variant", variant, *flags, "--batch", "2", "--ckpt-every", "3", "--log-every", "3",
             "--eval-samples", "4", "--eval-steps", "2", "--reference-steps", "4"]
    real = R.load_dataset
    small = lambda name, size, seed, labels=False: real(name, size, n_shapes=256, labels=labels)
    monkeypatch.setattr(R, "load_dataset", small)
    straight, straight_log = _run(tmp_path / "a", *flags)

    real_save = R.save_checkpoint

    def crash(path, **state):
        real_save(path, **state)
        if state["step"] == crash_at:
            raise KeyboardInterrupt
    monkeypatch.setattr(R, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", *flags)
    monkeypatch.setattr(R, "save_checkpoint", real_save)
    resumed, resumed_log = _run(tmp_path / "b", *flags)
    assert resumed["results"] == straight["results"]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    a, b = (R.load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("a", "b"))
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert _run(tmp_path / "b", *flags)[0] == resumed                   # a finished run returns its metrics

def test_quick_run_beats_the_original_model_at_two_steps(tmp_path):
    """The paper's claim in small (table 2 in teacher-fidelity terms): after DSDI fine-tuning (16 -> 2 steps,
    no data), the model's 2-step DDIM output is closer to the original model's 16-step output than the
    original model's own 2-step DDIM from the same noise."""
    metrics, log = _run(tmp_path)
    assert metrics["method"] == "self_distill" and metrics["finished"] and metrics["reference"]["steps"] == 16
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["steps"] == 2
    student, teacher = _rmse(metrics, "student", 2), _rmse(metrics, "teacher", 2)
    assert student < 0.95 * teacher, (student, teacher)
    plan = json.load(open(tmp_path / "plan.json"))
    assert [(r["steps"], r["trajectories"], r["updates"]) for r in plan] == S.plan("dsdi", 16, 100)
    assert log[-1]["update"] == sum(r["updates"] for r in plan)
    den = R.load_teacher(str(tmp_path / "ckpt.pt"))                   # the EMA weights load as a model
    assert den.param == "eps" and os.path.exists(tmp_path / "samples.png")

def test_training_dsd_target_pass_runs_without_dropout():
    """Issue 23: x'' of training DSD comes from a pass without dropout (a fixed target, as progressive's
    frozen teacher); x' (the first pass, with the gradient) keeps it, and the model stays in train mode."""
    torch.manual_seed(0)
    net = C.build_net("tiny16", image_size=16, dropout=0.5)
    den = C.Denoiser(net, C.Schedule("cosine_logsnr"), "v", "fixed_large").train()
    modes = []
    net.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    gen = torch.Generator().manual_seed(0)
    S.training_dsd_loss(den, torch.rand(4, 3, 16, 16) * 2 - 1, gen, steps=8)
    assert modes == [True, False] and net.training
