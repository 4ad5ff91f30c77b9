"""progressive.py (Salimans & Ho 2022): the teacher's two DDIM steps and the target x~ against a brute-force
computation, the round schedule, resume inside a round, an eps teacher in the google/ddpm-cifar10-32 format,
and the paper's claim in small on the --quick configuration."""
import json
import os

import pytest
import torch

import common as C
import progressive as P


def _net(param="x", size=8, seed=0):
    """A small U-Net with random (non-zero) weights: every path of the teacher matters."""
    torch.manual_seed(seed)
    net = C.make_net("tiny", image_size=size, out_channels=6 if param == "both" else 3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval().requires_grad_(False)


def _teacher_file(path, param="x", schedule="cosine_logsnr"):
    """A project checkpoint of a random teacher (loads with load_teacher)."""
    net = _net(param, size=16)
    C.save_checkpoint(str(path), net_config=C.net_config(net), model=net.state_dict(), ema=net.state_dict(),
                      schedule=C.Schedule(schedule).spec(), param=param, var="fixed_large", steps=None,
                      method="teacher", config={}, optimizer=None, step=0, elapsed=0.0)
    return str(path)


def _run(tmp_path, *flags):
    P.main(["--quick", "--out", str(tmp_path), "--device", "cpu", *flags])
    metrics = json.load(open(tmp_path / "metrics.json"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    return metrics, [row for row in log if row.get("stage") == "distill"]


def _close(a, b):
    """Equal up to float32 rounding of values as large as b's (an eps teacher's x at alpha ~ 0.006 is ~ 1e2)."""
    return (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-4


def _rmse(metrics, model, steps):
    return next(r["rmse_to_reference"] for r in metrics["results"]
                if r["model"] == model and r["steps"] == steps and r["sampler"] == "ddim")


@pytest.mark.parametrize("kind,param,clip", [("cosine_logsnr", "x", False), ("cosine_logsnr", "v", False),
                                             ("linear", "eps", False), ("linear", "eps", True)])
def test_teacher_steps_and_target_against_brute_force(kind, param, clip):
    """A one-step student predicting x~ lands exactly on the teacher's two DDIM steps (Alg. 2 lines 9-13 written
    out in float64 per sample, fractional timesteps for the discrete schedule, clipped x for eps teachers); t'
    and t'' swapped fails; at the last step x~ is the teacher's x(z_t')."""
    schedule, teacher = C.Schedule(kind), _net(param)
    for N in (1, 2, 8):
        i = torch.arange(1, N + 1).repeat(2)[: max(2, N)]
        u = i.double() / N
        z_t = torch.randn(len(u), 3, 8, 8, generator=torch.Generator().manual_seed(N))
        x_tilde = P.distill_target(teacher, schedule, param, z_t, u, N, clip)
        z_tpp_fast = P.teacher_two_steps(teacher, schedule, param, z_t, u, N, clip)
        if clip:  # x~ is a convex combination of the teacher's two (clipped) x predictions
            assert x_tilde.abs().max() <= 1 + 1e-4
        for b in range(len(u)):
            t, t1, t2 = u[b].item(), u[b].item() - 0.5 / N, u[b].item() - 1.0 / N
            a = {s: [float(v) for v in schedule.alpha_sigma(schedule.time(s))] if s > 0 else [1.0, 0.0]
                 for s in (t, t1, t2)}
            z = z_t[b:b + 1].double()
            x1 = C.denoise(teacher, schedule, param, z.float(), schedule.time(t), clip)[0].double()
            z1 = a[t1][0] * x1 + a[t1][1] / a[t][1] * (z - a[t][0] * x1)                       # line 11
            x2 = C.denoise(teacher, schedule, param, z1.float(), schedule.time(t1), clip)[0].double()
            z2 = a[t2][0] * x2 + (a[t2][1] / a[t1][1]) * (z1 - a[t1][0] * x2)                  # line 12
            assert _close(z_tpp_fast[b:b + 1].double(), z2), (N, t)
            student = a[t2][0] * x_tilde[b:b + 1].double() + a[t2][1] / a[t][1] * (z - a[t][0] * x_tilde[b:b + 1])
            assert _close(student, z2), (N, t)                               # eq. 39 = eq. 43
            if t2 == 0:
                assert _close(x_tilde[b:b + 1].double(), x2)             # last step: x(z_t')
            # the ported bug: t' and t'' swapped in the target
            swapped = (z2 - a[t1][1] / a[t][1] * z) / (a[t1][0] - a[t1][1] / a[t][1] * a[t][0])
            wrong = a[t2][0] * swapped + a[t2][1] / a[t][1] * (z - a[t][0] * swapped)
            assert (wrong - z2).abs().max() > 1e-3, (N, t)


def test_round_schedule_and_defaults():
    paper = P.round_schedule(8192, 1, 2, 50_000, 2)
    assert [r[1] for r in paper] == [2 ** k for k in range(12, -1, -1)]                    # 13 halvings to 1 step
    assert [r[2] for r in paper] == [50_000] * 11 + [100_000] * 2                           # sec. 5.2
    assert P.round_schedule(16, 1, 2, 150, 2) == [(16, 8, 150), (8, 4, 150), (4, 2, 300), (2, 1, 300)]
    assert P.round_schedule(8192, 1, 4, 5000, 2) == [(8192, 2048, 5000), (2048, 512, 5000), (512, 128, 5000),
                                                     (128, 32, 5000), (32, 8, 5000), (8, 2, 10_000), (2, 1, 10_000)]
    assert P.round_schedule(16, 1, 4, 10, 1) == [(16, 4, 10), (4, 1, 10)]
    cfg = C.parse_config(P.Config, [])
    assert (cfg.start_steps, cfg.end_steps, cfg.updates_per_round, cfg.final_rounds_factor, cfg.lr, cfg.batch) == \
        (8192, 1, 50_000, 2, 1e-4, 128)
    assert (cfg.net, cfg.schedule, cfg.param, cfg.weighting, cfg.dropout, cfg.base_updates) == \
        ("pd_cifar10", "cosine_logsnr", "x", "trunc_snr", 0.2, 800_000)
    assert C.parse_config(P.Config, ["--updates-per-round", "5000"]).updates_per_round == 5000


@pytest.mark.parametrize("flags,message", [(["--start-steps", "12"], "power of 2"), (["--divisor", "3"], "divisor"),
                                           (["--param", "y"], "--param y"), (["--stochastic", "2"], "stochastic")])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit, match=message):
        P.check(C.parse_config(P.Config, flags))


def test_resume_inside_a_round_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    teacher = _teacher_file(tmp_path / "teacher.pt")
    flags = ["--teacher", teacher, "--start-steps", "4", "--updates-per-round", "4", "--ckpt-every", "3",
             "--batch", "4", "--eval-samples", "4", "--log-every", "2"]
    straight, _ = _run(tmp_path / "a", *flags)

    real_save, saves = P.save_checkpoint, []

    def crash_after_mid_round_save(path, **state):
        real_save(path, **state)
        saves.append((state.get("round"), state["step"]))
        if os.path.basename(path) == "ckpt.pt" and state.get("round") == 1 and state["step"] == 3:
            raise KeyboardInterrupt  # killed in the middle of round 2 (2 -> 1 steps, 8 updates)
    monkeypatch.setattr(P, "save_checkpoint", crash_after_mid_round_save)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", *flags)
    assert (1, 3) in saves and (0, 3) in saves
    monkeypatch.setattr(P, "save_checkpoint", real_save)
    resumed, log = _run(tmp_path / "b", *flags)
    assert [(r["round"], r["update"]) for r in log] == [(1, 2), (1, 4), (1, 6), (1, 8), (2, 2), (2, 4), (2, 6), (2, 8)]
    assert resumed["results"] == straight["results"]
    a, b = (C.load_checkpoint(tmp_path / run / "student_1steps.pt") for run in ("a", "b"))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_eps_teacher_in_ddpm_cifar10_format_to_one_step(tmp_path):
    """A google/ddpm-cifar10-32 look-alike (diffusers UNet2DModel + scheduler_config.json, linear beta, eps)
    distils 4 -> 2 -> 1 steps with finite losses into a 'both' student that starts as the teacher at high SNR."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                                 flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path / "ddpm"
    unet.save_pretrained(folder)
    json.dump({"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
               "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"},
              open(folder / "scheduler_config.json", "w"))

    teacher, info = C.load_teacher(str(folder))
    assert info["param"] == "eps" and info["schedule"].discrete
    student, param = P.make_student(teacher, "eps", "both")
    assert param == "both" and C.net_config(student)["out_channels"] == 6
    schedule, z = info["schedule"], torch.randn(2, 3, 16, 16)
    for u in (0.05, 0.5, 1.0):  # x = sigma^2 0 + alpha^2 x(eps_teacher): the teacher at high SNR, bounded as SNR -> 0
        t = schedule.time(u)
        alpha = schedule.alpha_sigma(t)[0]
        x_student, eps_student = C.denoise(student, schedule, param, z, t)
        x_teacher, eps_teacher = C.denoise(teacher, schedule, "eps", z, t)
        assert torch.allclose(x_student, alpha ** 2 * x_teacher, atol=1e-4)

    out = tmp_path / "run"
    metrics, log = _run(out, "--teacher", str(folder), "--start-steps", "4", "--updates-per-round", "3",
                        "--batch", "4", "--eval-samples", "4", "--log-every", "3", "--stochastic", "0.5")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and {r["steps"] for r in log} == {2, 1}
    assert {(r["model"], r["steps"]) for r in metrics["results"]} >= {("student", 2), ("student", 1), ("teacher", 1)}
    assert metrics["teacher"] == str(folder) and metrics["reference"]["steps"] == 4
    one_step, info1 = C.load_teacher(str(out / "student_1steps.pt"))
    assert info1["param"] == "both" and info1["steps"] == 1 and info1["schedule"].spec() == schedule.spec()
    assert os.path.exists(out / "rounds.png")


def test_quick_run_beats_the_undistilled_teacher_at_few_steps(tmp_path):
    """The paper's claim in small (fig. 4 in teacher-fidelity terms): at 4, 2 and 1 steps the distilled student
    is at least twice as close to the teacher's 16-step DDIM output as the teacher's own DDIM at those steps."""
    metrics, log = _run(tmp_path)
    assert metrics["method"] == "progressive" and metrics["reference"]["steps"] == 16
    assert log[-1]["steps"] == 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    for k in (4, 2, 1):
        student, teacher = _rmse(metrics, "student", k), _rmse(metrics, "teacher", k)
        assert student <= 0.5 * teacher, (k, student, teacher)
    for k in (8, 4, 2, 1):
        net, info = C.load_teacher(str(tmp_path / f"student_{k}steps.pt"))
        assert info["steps"] == k and info["param"] == "x"
    assert os.path.exists(tmp_path / "rounds.png")
