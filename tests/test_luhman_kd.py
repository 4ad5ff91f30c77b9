"""Tests of luhman_kd.py (Luhman & Luhman 2021): the quick run with the paper's claim in small, the teacher's
timestep sequences, the recipes of app. B table 3, the pair storage (crash, resume, seeds, recipe checks), the
student (no dropout, its checkpoint read through load_teacher), training (exact resume, gradient accumulation,
no test pairs), evaluation (metrics.json around FID) and the run contract. CPU; the shared shapes teacher is
trained once and cached (conftest.py)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import common
import runtime
import luhman_kd as kd

# teacher_checkpoints.md sec. 5 (ermongroup/Luhman quad and DDIM-paper uniform, T = 1000)
QUAD_10 = [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
QUAD_100 = [800, 783, 768, 752, 736, 721, 705, 690, 675, 661, 646, 632, 617, 603, 589, 575, 562, 548, 535,
            522, 509, 496, 483, 471, 459, 446, 434, 423, 411, 399, 388, 377, 366, 355, 344, 334, 323, 313,
            303, 293, 284, 274, 265, 255, 246, 238, 229, 220, 212, 204, 195, 188, 180, 172, 165, 158, 150,
            143, 137, 130, 124, 117, 111, 105, 99, 94, 88, 83, 78, 73, 68, 63, 59, 55, 51, 47, 43, 39, 35, 32,
            29, 26, 23, 20, 18, 15, 13, 11, 9, 8, 6, 5, 3, 2, 2, 1, 0, 0, 0, 0]
# App. B table 3 (batch, lr, beta1, beta2, EMA, warm-up, updates) and sec. 4 (teacher steps)
TABLE3 = {"cifar10": (512, 2e-4, 0.9, 0.98, 0.995, 5000, 50_000, 100),
          "celeba": (512, 5e-5, 0.9, 0.98, 0.995, 5000, 64_000, 100),
          "lsun_bedroom": (32, 5e-6, 0.98, 0.999, 0.9995, 1000, 320_000, 50),
          "lsun_church": (32, 5e-6, 0.98, 0.999, 0.9995, 1000, 256_000, 50)}
SHAPE = (3, 16, 16)

def random_teacher(dropout=0.0):
    """A random tiny eps teacher with learned-range variance channels (6 outputs), as the shapes teacher."""
    torch.manual_seed(0)
    net = common.build_net("tiny", zero_init=False, out_channels=6, dropout=dropout)
    return common.Denoiser(net, common.Schedule("linear"), "eps", "learned_range").eval()

def small_cfg(path, **kw):
    """A few dozen pairs with a 2-step teacher: enough for the storage, resume and training on a CPU."""
    kw = {**dict(data="shapes", teacher="test", image_size=16, teacher_steps=2, skip="uniform", num_pairs=40,
                 num_test_pairs=8, gen_batch=8, batch=8, updates=12, warmup=3, lr=1e-3, loss="l2",
                 test_every=5, log_every=4, ckpt_every=3, eval_n=8, time_batch=0, out=str(path)), **kw}
    cfg = kd.resolve(dataclasses.replace(kd.Config(), **kw))
    os.makedirs(cfg.out, exist_ok=True)
    return cfg

def make_pairs(cfg, teacher):
    times = common.sampler_times(teacher.schedule, cfg.teacher_steps, cfg.skip)
    recipe = kd.pairs_recipe(cfg, cfg.teacher, times, SHAPE)
    kd.generate_pairs(cfg, teacher, recipe, SHAPE, "cpu")
    return recipe

def test_teacher_timesteps_match_reference_lists():
    schedule = common.Schedule("linear")
    assert common.sampler_times(schedule, 10, "quad") == QUAD_10
    assert common.sampler_times(schedule, 100, "quad") == QUAD_100
    assert common.sampler_times(schedule, 50, "uniform") == list(range(980, -1, -20))      # LSUN

def test_uint8_targets_round_trip():
    grid = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 127.5 - 1  # every uint8 level
    stored = kd.quantize(grid, "round")
    assert torch.equal(stored, torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16))
    data = np.zeros(1, np.dtype([("x_T", np.float16, (1, 16, 16)), ("x_0", np.uint8, (1, 16, 16))]))
    data["x_0"][0] = stored[0].numpy()
    assert torch.allclose(kd.fetch(data, [0], "cpu")[1], grid, atol=1e-6)           # what training reads
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2   # some beyond +-1
    err = kd.quantize(x, "round").float() / 127.5 - 1 - x.clamp(-1, 1)
    assert err.abs().max() <= 0.5 / 127.5 + 1e-6                                      # rounding: half a level
    err = kd.quantize(x, "trunc").float() / 127.5 - 1 - x.clamp(-1, 1)
    assert err.max() <= 1e-6 and err.min() >= -1 / 127.5 - 1e-6                       # official: always down
    assert err.mean() < -0.2 / 127.5                                                  # bias: about -0.5 level

def test_recipes_follow_table3_and_show_in_help(capsys):
    for data, recipe in (("cifar10", "cifar10"), ("folder:/data/celeba64", "celeba"),
                         ("folder:/data/lsun_bedroom", "lsun_bedroom"), ("folder:/x/church", "lsun_church")):
        cfg = kd.resolve(runtime.parse_config(kd.Config, ["--data", data, "--teacher", "t.pt"]))
        assert cfg.recipe == recipe
        assert (cfg.batch, cfg.lr, cfg.beta1, cfg.beta2, cfg.ema, cfg.warmup, cfg.updates,
                cfg.teacher_steps) == TABLE3[recipe]
        assert cfg.loss == ("l1" if recipe == "cifar10" else "l2")                     # app. B
        assert cfg.skip == ("uniform" if "lsun" in recipe else "quad")                 # official
    cfg = kd.resolve(runtime.parse_config(kd.Config, ["--recipe", "lsun_church", "--lr", "1e-5"]))
    assert cfg.teacher == "google/ddpm-ema-church-256" and cfg.lr == 1e-5 and cfg.batch == 32  # flag wins
    with pytest.raises(ValueError, match="which table 3 column"):
        kd.resolve(runtime.parse_config(kd.Config, ["--data", "folder:/data/imagenet"]))
    with pytest.raises(ValueError, match="convert_teacher"):                          # no hub id for CelebA
        kd.resolve(runtime.parse_config(kd.Config, ["--recipe", "celeba"]))
    with pytest.raises(SystemExit):
        kd.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for values in TABLE3.values():
        for v in values:
            assert f"{v:g}" in text                                                   # every value, in --help

def test_student_starts_as_the_teacher_network_without_dropout():
    teacher = random_teacher(dropout=0.1)                                             # as Ho et al.'s
    x_T = common.seeded_noise(range(4), SHAPE)
    for param in ("official", "exact"):
        student = kd.make_student(teacher, param)
        assert student.net.config.dropout == 0 and student.net.training             # app. B: no dropout
        assert all(p.requires_grad for p in student.parameters())
        for (name, p), q in zip(student.net.state_dict().items(), teacher.net.state_dict().values()):
            assert torch.equal(p, q), name
        with torch.no_grad():
            x0 = kd.student_x0(student, x_T)
            assert torch.equal(x0, kd.student_x0(student, x_T))                       # no random dropout
            if param == "official":                                                   # x0 = x_T - eps, T-1
                assert torch.equal(x0, x_T - teacher.net(x_T, torch.full((4,), 999.0))[:, :3])
            else:                                                                     # the 1-step DDIM
                assert torch.allclose(x0, common.ddim_sample(teacher, x_T, [999]), atol=1e-4)

def test_pair_generation_resumes_after_a_crash(tmp_path):
    teacher = random_teacher()

    class Crashing(torch.nn.Module):                                                  # dies in forward pass 5
        def __init__(self):
            super().__init__()
            self.net, self.calls = teacher.net, 0

        def forward(self, x, t):
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt("killed")
            return self.net(x, t)

    cfg = small_cfg(tmp_path / "crash")
    crashing = common.Denoiser(Crashing(), teacher.schedule, "eps", "learned_range")
    with pytest.raises(KeyboardInterrupt):                                            # in the 3rd chunk of 8
        make_pairs(cfg, crashing)
    with open(os.path.join(cfg.pairs, "meta.json")) as f:
        assert json.load(f)["done"] == {"train": 16, "test": 0}                      # one chunk lost at most
    make_pairs(cfg, teacher)
    straight = small_cfg(tmp_path / "straight")
    make_pairs(straight, teacher)
    for split, n in (("train", 40), ("test", 8)):
        resumed, ref = kd.pair_array(cfg.pairs, split, n), kd.pair_array(straight.pairs, split, n)
        assert len(resumed) == n and resumed.tobytes() == ref.tobytes()             # = the uninterrupted run
        noise = common.seeded_noise(kd.noise_seeds(0, split, 0, n), SHAPE).half().numpy()
        assert np.array_equal(resumed["x_T"], noise)                                 # pair i: seed i's noise
    with pytest.raises(ValueError, match="other teacher_steps"):                      # another recipe
        make_pairs(dataclasses.replace(cfg, teacher_steps=3), teacher)

def test_seeds_of_two_runs_share_no_noise(tmp_path):
    teacher = random_teacher()
    runs = [small_cfg(tmp_path / f"seed{s}", seed=s, num_pairs=16) for s in (0, 1)]
    for cfg in runs:
        make_pairs(cfg, teacher)
    noise = [np.concatenate([kd.pair_array(c.pairs, s, n)["x_T"] for s, n in (("train", 16), ("test", 8))])
             for c in runs]
    flat = [{a.tobytes() for a in x} for x in noise]
    assert len(flat[0]) == len(flat[1]) == 24 and not flat[0] & flat[1]              # --seed 1 reuses nothing
    ends = sorted((kd.noise_seeds(s, split, 0, 1)[0], kd.noise_seeds(s, split, kd.SPLIT - 1, kd.SPLIT)[0])
                  for s in (0, 1, 2) for split in kd.OFFSET)                          # 10^9 pairs a split
    assert all(a[1] < b[0] for a, b in zip(ends, ends[1:]))                          # disjoint seed ranges

def test_stage_train_refuses_missing_pairs_and_pairs_of_another_recipe(tmp_path):
    teacher = random_teacher()
    cfg = small_cfg(tmp_path / "run")
    times = common.sampler_times(teacher.schedule, 2, "uniform")
    with pytest.raises(ValueError, match="run --stage pairs first"):
        kd.train(cfg, teacher, None, kd.pairs_recipe(cfg, cfg.teacher, times, SHAPE), "cpu")
    make_pairs(cfg, teacher)
    other = dataclasses.replace(cfg, teacher_steps=3, targets="trunc")
    with pytest.raises(ValueError, match="other teacher_steps, times, targets"):
        kd.train(other, teacher, None, kd.pairs_recipe(other, other.teacher, [999, 500, 0], SHAPE), "cpu")

def test_training_resumes_exactly_and_the_student_samples_through_load_teacher(tmp_path, kill_on_call):
    teacher = random_teacher()
    straight = small_cfg(tmp_path / "straight")
    recipe = make_pairs(straight, teacher)
    kd.train(straight, teacher, None, recipe, "cpu")

    crash = small_cfg(tmp_path / "crash", pairs=straight.pairs)
    revive = kill_on_call(kd, "ema_update", 8)                                        # killed in update 8
    with pytest.raises(KeyboardInterrupt):
        kd.train(crash, teacher, None, recipe, "cpu")
    ckpt = runtime.load_checkpoint(os.path.join(crash.out, "ckpt.pt"))
    assert ckpt["step"] == 6                                                          # the last checkpoint
    revive()
    kd.train(crash, teacher, ckpt, recipe, "cpu")
    a, b = (runtime.load_checkpoint(os.path.join(c.out, "ckpt.pt")) for c in (crash, straight))
    assert a["step"] == b["step"] == 12 and a["best_step"] == b["best_step"]
    for key in ("model", "ema"):
        for name in b[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)

    # every checkpoint is a teacher: loaded with load_teacher, one DDIM step from T-1 is the student's own x0
    den = runtime.load_teacher(os.path.join(straight.out, "best.pt"))
    assert (den.param, den.steps, den.net.config.dropout) == ("resid", 1, 0)
    student = kd.make_student(teacher, "official")
    student.net.load_state_dict(runtime.load_checkpoint(os.path.join(straight.out, "best.pt"))["ema"])
    z = common.seeded_noise(range(4), SHAPE)
    with torch.no_grad():
        assert torch.equal(common.ddim_sample(den, z, [999]), kd.student_x0(student, z))
        initial = kd.student_x0(kd.make_student(teacher, "official"), z)
        assert not torch.allclose(kd.student_x0(student, z), initial)                # it has trained

def test_accumulation_gives_the_same_updates_and_no_test_pairs_work(tmp_path):
    teacher = random_teacher()
    full = small_cfg(tmp_path / "full", updates=4)
    recipe = make_pairs(full, teacher)
    kd.train(full, teacher, None, recipe, "cpu")
    parts = small_cfg(tmp_path / "parts", updates=4, accum=4, num_test_pairs=0, pairs=full.pairs)
    kd.train(parts, teacher, None, recipe, "cpu")                                   # 4 x 2 samples per update
    logs = [[json.loads(line) for line in open(os.path.join(c.out, "log.jsonl"))] for c in (full, parts)]
    losses = [[r["loss"] for r in log if r.get("stage") == "train"] for log in logs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)                            # the batch mean
    # The same updates, so the same student (weights are not compared: Adam turns the rounding noise of
    # exactly-zero gradients, e.g. of attention key biases, into steps of up to lr).
    z = common.seeded_noise(range(8), SHAPE)
    with torch.no_grad():
        x0 = [kd.student_x0(runtime.load_teacher(os.path.join(c.out, "ckpt.pt")), z) for c in (full, parts)]
        assert torch.allclose(x0[0], x0[1], atol=1e-4)
        assert not torch.allclose(x0[0], kd.student_x0(kd.make_student(teacher, "official"), z), atol=1e-2)
    assert not os.path.exists(os.path.join(parts.out, "best.pt"))                    # no test loss: the last
    metrics = kd.evaluate(parts, teacher, recipe["times"], SHAPE, "cpu")             # EMA is evaluated
    student = [r for r in metrics["results"] if r["model"] == "student"][0]
    assert student["test_loss"] is None and student["selected_update"] == 4 and metrics["finished"]
    for name in ("samples_student.png", "samples_teacher.png", "interpolation.png"):
        assert os.path.exists(os.path.join(parts.out, name)), name

def test_metrics_are_written_before_fid_and_the_statistics_file_is_used(tmp_path, monkeypatch):
    teacher = random_teacher()
    stats = tmp_path / "cifar10_stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    cfg = small_cfg(tmp_path / "run", data="cifar10", updates=2, fid=4, fid_stats=str(stats))
    recipe = make_pairs(cfg, teacher)
    kd.train(cfg, teacher, None, recipe, "cpu")

    def offline(*args, **kw):
        raise ValueError("clean-fid's CIFAR-10 statistics are unavailable")
    monkeypatch.setattr(runtime, "fid_is", offline)
    with pytest.raises(ValueError, match="unavailable"):
        kd.evaluate(cfg, teacher, recipe["times"], SHAPE, "cpu")
    with open(os.path.join(cfg.out, "metrics.json")) as f:
        metrics = json.load(f)
    assert not metrics["finished"] and metrics["results"][2]["rmse_to_reference"] > 0  # the rows survive
    seen = {}

    def fake_fid(folder, dataset, device, inception=None, ref_folder=None, stats=None, full=None):
        seen.update(n=len(os.listdir(folder)), stats=stats, ref=ref_folder)
        return {"fid": 12.5, "is": 3.0, "is_std": 0.1}
    monkeypatch.setattr(runtime, "fid_is", fake_fid)
    metrics = kd.evaluate(cfg, teacher, recipe["times"], SHAPE, "cpu")
    assert seen == {"n": 4, "stats": str(stats), "ref": None}
    assert metrics["finished"] and metrics["results"][2]["fid"] == 12.5 and runtime.run_finished(cfg.out)

def test_bad_flags_are_rejected_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("a teacher was trained or loaded before the flags were checked")
    monkeypatch.setattr(runtime, "cached_teacher", no_work)
    monkeypatch.setattr(runtime, "load_teacher", no_work)
    out = str(tmp_path / "run")
    for argv, error, message in [
            (["--accum", "3"], ValueError, "--accum 3: expected a divisor of --batch 32"),
            (["--image-size", "17"], ValueError, "multiples of 2"),
            (["--other-size", "16x23"], ValueError, "multiples of 2"),
            (["--other-size", "16by24"], ValueError, "expected HxW"),
            (["--batch", "4096"], ValueError, "exceeds --num-pairs"),
            (["--ema", "1.5"], SystemExit, "below 1"),
            (["--inception", str(tmp_path / "no.pt")], ValueError, "no such file"),
            (["--resume", str(tmp_path / "no.pt")], ValueError, "no such checkpoint"),
            (["--data", "cifar100"], ValueError, "expected cifar10, shapes, folder:PATH"),
            (["--batch", "0"], SystemExit, "at least 1"),
            (["--num-test-pairs", "-1"], SystemExit, "at least 0"),
            (["--recipe", "imagenet"], SystemExit, "invalid choice"),
            (["--student-param", "bogus"], SystemExit, "invalid choice"),
            (["--fid-teacher", "maybe"], SystemExit, "expected true or false")]:
        with pytest.raises(error, match=message):
            kd.main(["--quick", "--out", out, *argv])
    assert not os.path.exists(out)                                                    # nothing written

def test_run_contract_refuses_changed_flags_and_reports_a_finished_run(tmp_path, capsys):
    tiny = ["--quick", "--out", str(tmp_path / "run"), "--num-pairs", "32", "--num-test-pairs", "8",
            "--teacher-steps", "2", "--batch", "8", "--updates", "4", "--test-every", "2", "--eval-n", "8",
            "--time-batch", "0", "--other-size", "", "--gen-batch", "16"]
    first = kd.main(tiny)
    assert first["finished"] and first["results"][2]["updates"] == 4
    assert kd.main(tiny) == first and "is finished" in capsys.readouterr().out      # a rerun says so
    with pytest.raises(ValueError, match="--loss 'l1' \\(was 'l2'\\)"):                # l1 on an l2 run
        kd.main(tiny + ["--loss", "l1"])
    longer = kd.main(tiny + ["--updates", "6"])                                       # constant lr: extended
    assert longer["finished"] and longer["results"][2]["updates"] == 6
    with open(tmp_path / "run" / "log.jsonl") as f:
        assert sum(json.loads(line).get("event") == "resumed" for line in f) == 1     # rerun, refused: none

def test_quick_run_shows_the_papers_claim(tmp_path):
    """--quick end to end with half its pairs and half its batch (the claim's budget): the 1-step student is
    at least twice as close to the teacher's 10-step output on held-out noise as the teacher's own 1-step DDIM
    (measured: 0.272 against 0.643)."""
    metrics = kd.main(["--quick", "--out", str(tmp_path / "run"), "--num-pairs", "1024", "--num-test-pairs",
                       "128", "--batch", "16", "--eval-n", "128", "--time-batch", "0", "--other-size", ""])
    assert metrics["method"] == "luhman_kd" and metrics["reference"] == {"sampler": "ddim_quad", "steps": 10}
    by = {(r["model"], r["steps"]): r for r in metrics["results"]}
    student, teacher_1 = by[("student", 1)]["rmse_to_reference"], by[("teacher", 1)]["rmse_to_reference"]
    print(f"student {student:.4f} vs teacher 1-step {teacher_1:.4f}")
    assert student <= 0.5 * teacher_1
    for name in ("config.json", "log.jsonl", "best.pt", "samples_student.png", "interpolation.png"):
        assert os.path.exists(tmp_path / "run" / name), name
