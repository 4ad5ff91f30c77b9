"""Runs on another machine than the one they started on (issue 28): fp16's loss scaling, the one-line stop on
a non-finite loss with the checkpoint before it kept, the device a run used in its files, --device auto's
fallback said, and generator states that resume per device type."""
import functools
import json
import os
import sys
import time
import warnings

import pytest
import torch

import runtime as R

def _cfg(tmp_path, **kw):
    base = dict(image_size=8, updates=4, batch=4, warmup=1, log_every=2, ckpt_every=100, sample_steps=1,
                out=str(tmp_path / "run"), device="cpu")
    return R.TeacherConfig(**{**base, **kw})

def test_fp16_loss_scaling_keeps_gradients_that_fp16_flushes_to_zero():
    """A loss of 1e-9 x the output: its gradient (1e-9 per element) is below fp16's smallest subnormal (6e-8),
    so fp16 backward through the layer gives zeros; scaled (65,536) and unscaled, it is the fp32 gradient up
    to fp16's rounding of the scaled gradients and activations (rel 1e-2)."""
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(8, 8), torch.randn(4, 8)

    def grad(dtype):
        scaler, opt = R.grad_scaler("cpu", dtype), torch.optim.SGD(lin.parameters(), lr=0.0)
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == "fp16"):
            loss = (lin(x).float() * 1e-9).sum()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        return lin.weight.grad.clone()
    exact = grad("fp32")
    with torch.autocast("cpu", dtype=torch.float16):  # the same loss without the scaler: flushed to zero
        lin.zero_grad()
        (lin(x).float() * 1e-9).sum().backward()
    assert not lin.weight.grad.any()
    assert R.grad_scaler("cpu", "bf16").is_enabled() is False
    torch.testing.assert_close(grad("fp16"), exact, rtol=1e-2, atol=0)

def test_fp16_training_resumes_with_its_loss_scale(tmp_path):
    path = R.train_teacher(_cfg(tmp_path, dtype="fp16", updates=2))
    scaler = R.load_checkpoint(path)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 2  # two finite steps since the start
    R.train_teacher(_cfg(tmp_path, dtype="fp16", updates=3))
    assert R.load_checkpoint(path)["scaler"]["_growth_tracker"] == 3

def test_a_non_finite_loss_stops_the_run_before_the_next_checkpoint(tmp_path, monkeypatch):
    """Checkpoints every 2 updates, logs every 8: update 3's nan is found when update 4's checkpoint is due
    (not at the log), so the checkpoint of update 2 stays and none holds the diverged weights."""
    real, calls = R.diffusion_loss, [0]

    def nan_at_3(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] == 3 else loss
    monkeypatch.setattr(R, "diffusion_loss", nan_at_3)
    cfg = _cfg(tmp_path, updates=8, log_every=8, ckpt_every=2)
    with pytest.raises(ValueError, match=r"^base model \(Alg. 1\): loss is not finite at update 3; rerun"):
        R.train_teacher(cfg)
    assert R.load_checkpoint(f"{cfg.out}/ckpt.pt")["step"] == 2

def test_the_meter_names_the_first_non_finite_loss_and_its_update(tmp_path):
    meter = R.Meter(str(tmp_path), 10, 20, 0.0, "cpu", names=("loss", "vlb_bits"))
    meter.add(torch.tensor(1.0), torch.tensor(2.0))
    meter.check()  # all finite: nothing happens
    meter.add(torch.tensor(1.0), torch.tensor(float("inf")))
    meter.add(torch.tensor(float("nan")), torch.tensor(float("nan")))
    with pytest.raises(ValueError, match=r"training: vlb_bits is not finite at update 12;"):
        meter.check()

def test_the_run_files_say_which_device_and_versions_it_used(tmp_path):
    cfg = _cfg(tmp_path, updates=1)
    R.train_teacher(cfg)
    config, first = json.load(open(f"{cfg.out}/config.json")), json.loads(open(f"{cfg.out}/log.jsonl").readline())
    for record in (config, first):
        assert record["device_used"] == "cpu" and record["device_name"]
        assert record["torch_version"] == torch.__version__ and record["cuda_version"] == torch.version.cuda

def test_device_auto_says_in_one_line_why_it_runs_on_the_cpu(monkeypatch, capsys):
    def old_driver():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).")
        return False
    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    monkeypatch.setattr(R, "cuda_usable", functools.lru_cache(maxsize=1)(R.cuda_usable.__wrapped__))  # afresh
    assert R.pick_device("auto") == "cpu" and R.pick_device("auto") == "cpu"  # said once a process
    err = capsys.readouterr().err
    assert err == ("--device auto: CUDA is not usable (CUDA initialization: The NVIDIA driver on your system is "
                   "too old (found version 11040).); running on the CPU\n")

def test_generator_states_restore_per_device_type(capsys):
    """The same device type: the state itself (the next draws equal); another (a CUDA checkpoint's 16 bytes
    into a CPU generator): reseeded from the seed and the stored update, the same on every resume, said."""
    for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
        gen = torch.Generator(device).manual_seed(7)
        torch.randn(3, generator=gen, device=device)
        saved, expected = R.generator_state(gen), torch.randn(3, generator=gen, device=device)
        fresh = torch.Generator(device).manual_seed(7)
        R.restore_generator(fresh, saved, step=5)
        assert saved["device"] == device and torch.equal(torch.randn(3, generator=fresh, device=device), expected)
    assert capsys.readouterr().out == ""
    from_cuda = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    draws = []
    for _ in range(2):
        fresh = torch.Generator().manual_seed(7)
        R.restore_generator(fresh, from_cuda, step=5)
        draws.append(torch.randn(3, generator=fresh))
    assert torch.equal(*draws) and not torch.equal(draws[0], expected)
    assert capsys.readouterr().out.splitlines()[0] == ("resumed on cpu from a cuda checkpoint: the generator is "
                                                       "reseeded from its seed and update 5 (the draws differ "
                                                       "from an uninterrupted run's)")

def test_a_cpu_run_resumes_a_checkpoint_of_another_device_type(tmp_path, capsys):
    """The checkpoint faked as a CUDA run's (its generator state 16 bytes): --device cpu resumes it, reseeded."""
    cfg = _cfg(tmp_path, updates=2, ckpt_every=2)
    path = R.train_teacher(cfg)
    ckpt = R.load_checkpoint(path)
    ckpt["gen"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    torch.save(ckpt, path)
    capsys.readouterr()
    R.train_teacher(_cfg(tmp_path, updates=4, ckpt_every=2))
    assert "resumed on cpu from a cuda checkpoint" in capsys.readouterr().out
    assert R.load_checkpoint(path)["step"] == 4 and R.load_checkpoint(path)["gen"]["device"] == "cpu"

def test_the_gpu_check_records_every_step_and_stops_within_its_budget(tmp_path):
    """benchmarks/gpu_check.py's runner on stand-in steps (the real ones need a GPU): a result file read back,
    a method run's folder read back, a failure, a step past its own timeout and one cut by the budget (both
    killed, recorded as timed out), a step with no time left (skipped); one JSON, rewritten after each. The
    budget of 4 s holds to the 2 s a loaded machine may add to start and kill the children."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import gpu_check
    py, result, run = sys.executable, tmp_path / "result.json", tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"finished": True}))
    (run / "log.jsonl").write_text(json.dumps({"event": "started", "device_used": "cuda:0", "world_size": 1}) + "\n")
    steps = [("writes", [py, "-c", f"open({str(result)!r}, 'w').write('{{\"rate\": 2.5}}')"], 30, str(result)),
             ("a method run", [py, "-c", "pass", "--out", str(run)], 30, None),
             ("fails", [py, "-c", "raise SystemExit(3)"], 30, None),
             ("hangs", [py, "-c", "import time; time.sleep(60)"], 0.5, None),
             ("hangs past the budget", [py, "-c", "import time; time.sleep(60)"], 60, None),
             ("never starts", [py, "-c", "pass"], 30, None)]
    t0 = time.time()
    report = gpu_check.run_all(steps, 4.0, str(tmp_path / "check.json"), dict(os.environ), str(tmp_path),
                               {"torch_version": torch.__version__})
    assert time.time() - t0 < 4.0 + 2.0
    assert json.loads((tmp_path / "check.json").read_text()) == report and report["torch_version"]
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"writes": "ok", "a method run": "ok", "fails": "failed", "hangs": "timed out",
                      "hangs past the budget": "timed out", "never starts": "skipped: no time left"}
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["writes"]["figures"] == {"rate": 2.5} and steps["fails"]["returncode"] == 3
    assert steps["a method run"]["figures"] == {"metrics": {"finished": True}, "ran_on": {
        "device_used": "cuda:0", "device_name": None, "world_size": 1}}
    assert steps["hangs"]["seconds"] < 2.5 and steps["hangs past the budget"]["timeout_s"] < 4.0
