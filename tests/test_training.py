"""Standard diffusion training (Alg. 1), checkpoints and resume, load_teacher on our own checkpoints,
and the flag generation of the run contract."""
import dataclasses
import json
import os

import pytest
import torch

import common as C


def _cfg(tmp_path, **kw):
    base = dict(image_size=8, updates=6, batch=8, warmup=2, log_every=2, ckpt_every=100, sample_steps=2,
                out=str(tmp_path / "run"), device="cpu")
    return C.TeacherConfig(**{**base, **kw})


def test_resume_restores_training_state_exactly(tmp_path):
    straight = C.load_checkpoint(C.train_teacher(_cfg(tmp_path / "a")))
    C.train_teacher(_cfg(tmp_path / "b", updates=3))                 # "crash" after 3 updates
    resumed = C.load_checkpoint(C.train_teacher(_cfg(tmp_path / "b")))
    assert resumed["step"] == straight["step"] == 6
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    for s, r in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])
    rows = [json.loads(l) for l in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert os.path.exists(tmp_path / "b" / "run" / "samples.png")
    assert json.load(open(tmp_path / "b" / "run" / "config.json"))["updates"] == 6


@pytest.mark.parametrize("param,schedule", [("eps", "linear"), ("v", "cosine_logsnr"), ("both", "cosine_logsnr")])
def test_checkpoint_loads_as_teacher(tmp_path, param, schedule):
    path = C.train_teacher(_cfg(tmp_path, updates=2, param=param, schedule=schedule, weighting="snr_plus_one"))
    net, info = C.load_teacher(path)
    ckpt = C.load_checkpoint(path)
    assert info["param"] == param and info["schedule"].spec() == ckpt["schedule"] and info["steps"] is None
    assert not any(p.requires_grad for p in net.parameters())
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ckpt["ema"][name])
    z = torch.randn(2, 3, 8, 8)
    x, eps = C.denoise(net, info["schedule"], info["param"], z, info["schedule"].time(0.5))
    assert x.shape == z.shape and torch.isfinite(x).all() and torch.isfinite(eps).all()


def test_loss_decreases_on_shapes(tmp_path):
    cfg = _cfg(tmp_path, updates=150, batch=32, log_every=50, lr=1e-3, warmup=10)
    C.train_teacher(cfg)
    losses = [json.loads(l)["loss"] for l in open(os.path.join(cfg.out, "log.jsonl"))]
    assert losses[-1] < 0.7 * losses[0]


def test_cached_teacher_trains_once(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CACHE_DIR", str(tmp_path))
    cfg = _cfg(tmp_path, updates=2)
    path = C.cached_teacher(cfg)
    mtime = os.path.getmtime(path)
    assert C.cached_teacher(dataclasses.replace(cfg, out="elsewhere", log_every=1)) == path
    assert os.path.getmtime(path) == mtime
    assert C.cached_teacher(dataclasses.replace(cfg, seed=1)) != path


def test_parse_config_quick_and_explicit_flags():
    cfg = C.parse_config(C.TeacherConfig, ["--quick", "--batch", "16", "--data", "cifar10"],
                         quick={"batch": 4, "updates": 10, "data": "shapes"})
    assert (cfg.batch, cfg.updates, cfg.data) == (16, 10, "cifar10")
    assert C.parse_config(C.TeacherConfig, []).updates == C.TeacherConfig().updates
    with pytest.raises(SystemExit):
        C.parse_config(C.TeacherConfig, ["--no-such-flag", "1"])


def test_bad_teacher_and_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a"):
        C.load_teacher("no_such_file.pt")
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        C.load_checkpoint(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        C.resume_path(str(tmp_path), str(tmp_path / "missing.pt"))
    assert C.resume_path(str(tmp_path), "auto") is None and C.resume_path(str(tmp_path), "none") is None
