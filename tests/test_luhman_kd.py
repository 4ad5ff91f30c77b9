"""Tests of luhman_kd.py (Luhman & Luhman 2021): the quick run end to end with the paper's claim in small, the
teacher's timestep sequences, the synthetic dataset (uint8 round trip, resume after a crash), the student's
initialisation and resume of training. CPU; the shapes teacher is trained once and cached (see conftest.py)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import common
import luhman_kd as kd

# teacher_checkpoints.md sec. 5 (ermongroup/Luhman quad and DDIM-paper uniform, T = 1000)
QUAD_10 = [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
QUAD_100 = [800, 783, 768, 752, 736, 721, 705, 690, 675, 661, 646, 632, 617, 603, 589, 575, 562, 548, 535, 522, 509,
            496, 483, 471, 459, 446, 434, 423, 411, 399, 388, 377, 366, 355, 344, 334, 323, 313, 303, 293, 284, 274,
            265, 255, 246, 238, 229, 220, 212, 204, 195, 188, 180, 172, 165, 158, 150, 143, 137, 130, 124, 117, 111,
            105, 99, 94, 88, 83, 78, 73, 68, 63, 59, 55, 51, 47, 43, 39, 35, 32, 29, 26, 23, 20, 18, 15, 13, 11, 9,
            8, 6, 5, 3, 2, 2, 1, 0, 0, 0, 0]


@pytest.fixture(scope="session")
def teacher():
    """The cached standard-trained shapes teacher (16x16, tiny U-Net, linear beta, eps), as (net, info)."""
    return common.load_teacher(common.cached_teacher())


def small_cfg(tmp_path, **kw):
    """A few dozen pairs with a 2-step teacher: enough to exercise shards, resume and training on a CPU."""
    kw = {"out": str(tmp_path), "pairs": str(tmp_path / "pairs"), **kw}
    cfg = dataclasses.replace(kd.Config(), data="shapes", teacher="test", image_size=16, teacher_steps=2,
                              skip="uniform", num_pairs=40, num_test_pairs=8, shard_size=16, gen_batch=8,
                              batch=8, updates=12, warmup=3, lr=1e-3, loss="l2", log_every=4, ckpt_every=3, **kw)
    os.makedirs(cfg.out, exist_ok=True)
    return cfg


def random_teacher():
    torch.manual_seed(0)
    net = common.build_net(common.net_preset("tiny")).eval()                          # random, not zero-initialised
    return net.requires_grad_(False), {"schedule": common.Schedule("linear"), "param": "eps", "var": "fixed_large"}


def read_split(cfg, split, n):
    return np.concatenate([np.asarray(s) for s in kd.open_pairs(cfg.pairs, split, n, cfg.shard_size)])


def test_teacher_timesteps_match_reference_lists():
    schedule = common.Schedule("linear")
    assert kd.teacher_times(schedule, 10, "quad") == QUAD_10
    assert kd.teacher_times(schedule, 100, "quad") == QUAD_100
    assert kd.teacher_times(schedule, 10, "uniform") == list(range(900, -1, -100))
    assert kd.teacher_times(schedule, 100, "uniform") == list(range(990, -1, -10))


def test_uint8_round_trip():
    grid = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 127.5 - 1  # every uint8 level
    assert torch.equal(kd.quantize(grid, "round"), torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16))
    assert torch.allclose(kd.dequantize(kd.quantize(grid, "round")), grid, atol=1e-6)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2   # some outside [-1, 1]
    x_c = x.clamp(-1, 1)
    err = kd.dequantize(kd.quantize(x, "round")) - x_c
    assert err.abs().max() <= 0.5 / 127.5 + 1e-6                                      # rounding: half a level
    err = kd.dequantize(kd.quantize(x, "trunc")) - x_c
    assert err.max() <= 1e-6 and err.min() >= -1 / 127.5 - 1e-6                       # official: always rounds down
    assert err.mean() < -0.2 / 127.5                                                  # ... a bias of about -0.5 level
    assert (kd.dequantize(kd.quantize(x, "float16")) - x_c).abs().max() <= 1e-3
    assert kd.quantize(x, "round").dtype == torch.uint8 and kd.quantize(x, "float16").dtype == torch.float16


def test_student_at_initialisation_equals_teacher_network(teacher):
    net, info = teacher
    schedule, param = info["schedule"], info["param"]
    student = kd.make_student(net)
    assert all(p.requires_grad for p in student.parameters())
    for (name, p), (_, q) in zip(student.state_dict().items(), net.state_dict().items()):
        assert torch.equal(p, q), name
    x_T = common.seeded_noise(range(4), (3, 16, 16))
    with torch.no_grad():
        eps = net(x_T, torch.full((4,), 999.0))
        assert torch.equal(kd.student_x0(student, x_T, schedule, param, "official"), x_T - eps)
        # the exact DDPM conversion is the teacher's own 1-step DDIM from T-1
        one_step = common.ddim_sample(net, schedule, param, x_T, [999])
        assert torch.allclose(kd.student_x0(student, x_T, schedule, param, "exact"), one_step, atol=1e-4)


def test_pair_generation_resumes_after_a_crash(tmp_path):
    net, info = random_teacher()
    shape, times = (3, 16, 16), kd.teacher_times(info["schedule"], 2, "uniform")

    class Crashing(torch.nn.Module):                                                  # dies in the 5th forward pass
        def __init__(self):
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x, t):
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt("killed")
            return self.net(x, t)

    cfg = small_cfg(tmp_path / "crash")
    with pytest.raises(KeyboardInterrupt):                                            # 2 batches x 2 steps = shard 0
        kd.generate_pairs(cfg, Crashing(), info, times, shape, "cpu")
    assert sorted(os.listdir(cfg.pairs)) == ["meta.json", "train_00000.npy"]          # no partial shard left behind
    first = os.stat(kd.shard_path(cfg.pairs, "train", 0)).st_mtime_ns
    kd.generate_pairs(cfg, net, info, times, shape, "cpu")
    assert os.stat(kd.shard_path(cfg.pairs, "train", 0)).st_mtime_ns == first        # finished shard skipped

    straight = small_cfg(tmp_path / "straight")
    kd.generate_pairs(straight, net, info, times, shape, "cpu")
    for split, n, offset in (("train", 40, 0), ("test", 8, kd.SEED_OFFSET["test"])):
        resumed, ref = read_split(cfg, split, n), read_split(straight, split, n)
        assert len(resumed) == n and resumed.tobytes() == ref.tobytes()             # equal to the uninterrupted run
        # pair i holds the noise of seed i: no pair duplicated, none missing
        noise = common.seeded_noise([offset + i for i in range(n)], shape).half().numpy()
        assert np.array_equal(resumed["x_T"], noise)
    with pytest.raises(SystemExit, match="other teacher_steps"):                      # a different recipe is refused
        kd.generate_pairs(dataclasses.replace(cfg, teacher_steps=3), net, info, [999, 500, 0], shape, "cpu")


def test_training_resumes_exactly(tmp_path, monkeypatch):
    net, info = random_teacher()
    shape, times = (3, 16, 16), kd.teacher_times(info["schedule"], 2, "uniform")
    straight = small_cfg(tmp_path / "straight")
    kd.generate_pairs(straight, net, info, times, shape, "cpu")
    kd.train(straight, net, info, "cpu")

    crash = small_cfg(tmp_path / "crash", pairs=straight.pairs)
    calls = {"n": 0}
    ema_update = kd.ema_update

    def crashing_ema_update(*args):                                                   # killed during update 8
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        ema_update(*args)
    monkeypatch.setattr(kd, "ema_update", crashing_ema_update)
    with pytest.raises(KeyboardInterrupt):
        kd.train(crash, net, info, "cpu")
    assert common.load_checkpoint(os.path.join(crash.out, "ckpt.pt"))["step"] == 6   # last checkpoint: update 6
    monkeypatch.setattr(kd, "ema_update", ema_update)
    kd.train(crash, net, info, "cpu")                                                 # --resume auto
    a = common.load_checkpoint(os.path.join(crash.out, "ckpt.pt"))
    b = common.load_checkpoint(os.path.join(straight.out, "ckpt.pt"))
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for name in b[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["best_test"] == pytest.approx(b["best_test"])


def test_bad_flag_gives_one_line_error():
    with pytest.raises(SystemExit, match="--student-param 'bogus': expected one of official, exact"):
        kd.main(["--quick", "--student-param", "bogus"])


def test_quick_run_shows_the_papers_claim(teacher, tmp_path):
    """--quick end to end: the 1-step student is at least twice as close to the teacher's multi-step output on
    held-out noise as the teacher's own 1-step DDIM (RMSE)."""
    metrics = kd.main(["--quick", "--out", str(tmp_path / "run")])
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f) == metrics
    assert metrics["method"] == "luhman_kd" and metrics["reference"] == {"sampler": "ddim_quad", "steps": 10}
    by = {(r["model"], r["steps"]): r for r in metrics["results"] if "image_size" not in r}
    student, teacher_1 = by[("student", 1)]["rmse_to_reference"], by[("teacher", 1)]["rmse_to_reference"]
    print(f"student {student:.4f} vs teacher 1-step {teacher_1:.4f}")
    assert student <= 0.5 * teacher_1
    assert by[("student", 1)]["images_per_s"] > by[("teacher", 10)]["images_per_s"]
    for name in ("config.json", "log.jsonl", "ckpt.pt", "best.pt", "samples_student.png", "interpolation.png",
                 "other_size.png"):
        assert os.path.exists(tmp_path / "run" / name), name
    assert common.load_teacher(str(tmp_path / "run" / "best.pt"))[1]["steps"] == 1   # every checkpoint is a teacher
