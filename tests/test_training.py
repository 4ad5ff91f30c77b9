"""Standard diffusion training (Alg. 1), checkpoints and resume, load_teacher on our own checkpoints,
and the flag generation of the run contract."""
import dataclasses
import json
import os

import pytest
import torch

import runtime as R

def _cfg(tmp_path, **kw):
    base = dict(image_size=8, updates=6, batch=8, warmup=2, log_every=2, ckpt_every=100, sample_steps=2,
                out=str(tmp_path / "run"), device="cpu")
    return R.TeacherConfig(**{**base, **kw})

def test_resume_restores_training_state_exactly(tmp_path):
    straight = R.load_checkpoint(R.train_teacher(_cfg(tmp_path / "a")))
    R.train_teacher(_cfg(tmp_path / "b", updates=3))                 # "crash" after 3 updates
    resumed = R.load_checkpoint(R.train_teacher(_cfg(tmp_path / "b")))
    assert resumed["step"] == straight["step"] == 6
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    for s, r in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])
    rows = [json.loads(l) for l in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert [r["step"] for r in rows if r.get("stage") == "teacher"] == [2, 3, 4, 6]
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [3]
    # the first row after resuming at update 3 averages over one update, not over log_every
    loss_4 = next(r["loss"] for r in rows if r.get("step") == 4)
    straight_rows = [json.loads(l) for l in open(tmp_path / "a" / "run" / "log.jsonl")]
    assert loss_4 < 2 * next(r["loss"] for r in straight_rows if r.get("step") == 4)
    assert os.path.exists(tmp_path / "b" / "run" / "samples.png")
    assert json.load(open(tmp_path / "b" / "run" / "config.json"))["updates"] == 6

@pytest.mark.parametrize("param,schedule,var", [("eps", "linear", "learned_range"),
                                              ("v", "cosine_logsnr", "fixed_large"),
                                              ("both", "cosine", "learned_range")])
def test_checkpoint_loads_as_teacher(tmp_path, param, schedule, var):
    path = R.train_teacher(_cfg(tmp_path, updates=2, param=param, schedule=schedule, var=var,
                                weighting="snr_plus_one"))
    den = R.load_teacher(path)
    ckpt = R.load_checkpoint(path)
    assert den.param == param and den.schedule.spec() == ckpt["schedule"] and den.steps is None
    assert not any(p.requires_grad for p in den.parameters())
    for name, tensor in den.net.state_dict().items():
        assert torch.equal(tensor, ckpt["ema"][name])
    z = torch.randn(2, 3, 8, 8)
    x, eps = den(z, den.schedule.time(0.5))
    assert x.shape == z.shape and torch.isfinite(x).all() and torch.isfinite(eps).all()

def test_loss_decreases_on_shapes():
    """Alg. 1 learns: the shared shapes teacher's logged loss (the hybrid loss, every log_every updates)
    falls. Read from its training log, so the suite trains no extra model for it."""
    cfg, path = R.TeacherConfig(), R.cached_teacher()
    rows = [json.loads(line) for line in open(path[:-3] + "_run/log.jsonl")]  # cached_teacher's run folder
    losses = [r["loss"] for r in rows if r.get("stage") == "teacher"]
    assert len(losses) == cfg.updates // cfg.log_every
    assert losses[-1] < 0.2 * losses[0] and losses[-1] < 0.7 * losses[1]

def test_cached_teacher_trains_once(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "CACHE_DIR", str(tmp_path))
    cfg = _cfg(tmp_path, updates=2)
    path = R.cached_teacher(cfg)
    mtime = os.path.getmtime(path)
    assert R.cached_teacher(dataclasses.replace(cfg, out="elsewhere", log_every=1)) == path
    assert os.path.getmtime(path) == mtime
    assert R.cached_teacher(dataclasses.replace(cfg, seed=1)) != path

def test_parse_config_quick_and_explicit_flags():
    cfg = R.parse_config(R.TeacherConfig, ["--quick", "--batch", "16", "--data", "cifar10"],
                         quick={"batch": 4, "updates": 10, "data": "shapes"})
    assert (cfg.batch, cfg.updates, cfg.data) == (16, 10, "cifar10")
    assert R.parse_config(R.TeacherConfig, []).updates == R.TeacherConfig().updates

@pytest.mark.parametrize("flags,message", [
    (["--no-such-flag", "1"], "unrecognized arguments"), (["--batch", "0"], "--batch: must be at least 1"),
    (["--batch", "-3"], "must be at least 1"), (["--log-every", "0"], "--log-every: must be at least 1"),
    (["--lr", "fast"], "expected a number"), (["--updates", "1.5"], "expected an integer"),
    (["--param", "score"], "invalid choice: 'score'"), (["--dtype", "fp8"], "invalid choice"),
    (["--image-size", "0"], "must be at least 8")])
def test_bad_flag_values_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit) as e:
        R.parse_config(R.TeacherConfig, flags)
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text

def test_changed_settings_are_refused_on_resume_and_config_json_kept(tmp_path):
    cfg = _cfg(tmp_path, updates=2)
    R.train_teacher(cfg)
    before = open(os.path.join(cfg.out, "config.json")).read()
    with pytest.raises(ValueError, match=r"--net 'dit_tiny' \(was 'tiny'\), --lr 0.01 \(was 0.0005\)"):
        R.train_teacher(dataclasses.replace(cfg, lr=0.01, net="dit_tiny", updates=4))
    assert open(os.path.join(cfg.out, "config.json")).read() == before
    # a finished run is left as it is; flags that do not change results may differ, and are recorded
    R.train_teacher(dataclasses.replace(cfg, log_every=1, sample_steps=3))
    assert open(os.path.join(cfg.out, "config.json")).read() == before
    R.train_teacher(dataclasses.replace(cfg, log_every=1, sample_steps=3, updates=3))
    assert json.load(open(os.path.join(cfg.out, "config.json")))["sample_steps"] == 3
    # --resume none starts over
    R.train_teacher(dataclasses.replace(cfg, lr=0.01, resume="none"))
    assert R.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"))["config"]["lr"] == 0.01

def test_checkpoints_are_plain_data_with_normal_permissions_and_no_orphans(tmp_path):
    path = R.train_teacher(_cfg(tmp_path, updates=2))
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    torch.load(path, weights_only=True)  # nothing but tensors and plain containers
    orphan = os.path.join(os.path.dirname(path), "ckpt.pt.999.tmp")
    open(orphan, "w").write("half a checkpoint")
    R.train_teacher(_cfg(tmp_path, updates=3))  # the next start (a finished run is left as it is)
    assert not os.path.exists(orphan)

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))

def test_a_malicious_checkpoint_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": R.CKPT_FORMAT, "x": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt is not a readable checkpoint"):
        R.load_checkpoint(str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="evil.pt"):
        R.load_teacher(str(tmp_path / "evil.pt"))
    assert not os.path.exists(tmp_path / "pwned")

def test_bad_teacher_and_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        R.load_teacher("runs/no_such_file.pt")
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        R.load_checkpoint(str(tmp_path / "x.pt"))
    (tmp_path / "trunc.pt").write_bytes(open(R.train_teacher(_cfg(tmp_path, updates=1)), "rb").read()[:5000])
    with pytest.raises(ValueError, match="trunc.pt is not a readable checkpoint"):
        R.load_checkpoint(str(tmp_path / "trunc.pt"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        R.train_teacher(_cfg(tmp_path, resume=str(tmp_path / "missing.pt")))

def test_cli_turns_expected_failures_into_one_line(capsys):
    def fail(exc):
        def main():
            raise exc
        return main
    for exc in (ValueError("bad value"), OSError(28, "No space left on device", "out/ckpt.pt")):
        with pytest.raises(SystemExit) as e:
            R.cli(fail(exc))
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        R.cli(fail(ZeroDivisionError()))
