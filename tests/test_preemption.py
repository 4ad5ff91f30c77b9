"""Preemption on one process, with the real signal handler: a SIGTERM during the Denoising Student's pair
generation stops it at the next chunk (the pairs made are kept, resumed from there), one in mid-training
stops it at the end of that update with its checkpoint and a 'preempted' row, one in DKDM's shuffle denoise
after the teacher call under way, saved, one in FID/IS scoring at the next chunk of images; the resumed run
equals an uninterrupted one. Two ranks:
tests/test_distributed.py; the exit status: tests/test_inputs.py."""
import json
import os
import signal

import pytest
import torch

import common
import dkdm
import runtime as R
import luhman_kd as kd
from test_data_eval import StandIn, _write_pngs
from test_luhman_kd import make_pairs, random_teacher, small_cfg

@pytest.fixture
def scheduler(monkeypatch):
    """The handler cli installs; sigterm_on_call(module, name, n) sends this process SIGTERM from inside the
    n-th call of module.name (a scheduler's stop, mid-update)."""
    previous = signal.signal(signal.SIGTERM, R.ask_to_stop)
    monkeypatch.setattr(R, "_PREEMPT", [False])

    def sigterm_on_call(obj, name, n):
        real, calls = getattr(obj, name), [0]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        monkeypatch.setattr(obj, name, wrapped)
        return lambda: (monkeypatch.setattr(obj, name, real), R._PREEMPT.__setitem__(0, False))
    yield sigterm_on_call
    signal.signal(signal.SIGTERM, previous)

def test_sigterm_in_pair_generation_and_in_training_loses_nothing(tmp_path, scheduler):
    teacher = random_teacher()
    straight = small_cfg(tmp_path / "straight")
    recipe = make_pairs(straight, teacher)
    kd.train(straight, teacher, None, recipe, "cpu")

    cfg = small_cfg(tmp_path / "stopped")
    resume = scheduler(teacher.net, "forward", 5)            # 2 teacher steps a chunk: in the 3rd chunk of 8
    with pytest.raises(R.Preempted, match="teacher pairs"):
        make_pairs(cfg, teacher)
    with open(os.path.join(cfg.pairs, "meta.json")) as f:
        assert json.load(f)["done"] == {"train": 24, "test": 0}  # the chunk under way finished, then stopped
    resume()
    make_pairs(cfg, teacher)
    for split, n in (("train", 40), ("test", 8)):
        assert kd.pair_array(cfg.pairs, split, n).tobytes() == kd.pair_array(straight.pairs, split, n).tobytes()

    resume = scheduler(kd, "ema_update", 7)                  # in update 7: rows every 4, checkpoints every 3
    with pytest.raises(R.Preempted, match="update 7"):
        kd.train(cfg, teacher, None, recipe, "cpu")
    ckpt = R.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"))
    assert ckpt["step"] == 7                                 # the update it was in, not the last checkpoint
    resume()
    kd.train(cfg, teacher, ckpt, recipe, "cpu")
    log = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    rows = [(row.get("event"), row["step"]) for row in log if row.get("stage") == "train" or "event" in row]
    assert rows == [(None, 4), (None, 7), ("preempted", 7), (None, 8), (None, 12)]  # updates 5-7, then 8
    a, b = (R.load_checkpoint(os.path.join(c.out, "ckpt.pt")) for c in (cfg, straight))
    assert a["step"] == b["step"] == 12 and a["best_step"] == b["best_step"]
    for key in ("model", "ema"):
        for name in b[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)

def test_sigterm_in_dkdm_shuffle_denoise_saves_and_resumes_to_the_same_set(scheduler):
    """DKDM's knowledge set (alg. 1 line 1) stops after the teacher call under way, saved; resumed from that
    save (the set and the generator), it ends equal to an uninterrupted preparation."""
    teacher, K = random_teacher(), 10
    grid = torch.tensor(common.sampler_times(teacher.schedule, K, "linspace")).flip(0)
    new_set = lambda: dkdm.new_set(12, K, (3, 16, 16), "dynamic", torch.Generator().manual_seed(0))
    straight = dkdm.shuffle_denoise(teacher, grid, new_set(), 4, True, torch.Generator().manual_seed(1))
    kset, gen, saved = new_set(), torch.Generator().manual_seed(1), []
    save = lambda: saved.append(({k: v.clone() for k, v in kset.items()}, gen.get_state()))
    resume = scheduler(teacher.net, "forward", 3)
    with pytest.raises(R.Preempted, match="shuffle denoise, teacher call 3"):
        dkdm.shuffle_denoise(teacher, grid, kset, 4, True, gen, save)
    assert len(saved) == 1                                   # saved once, at the call it stopped after
    resume()
    (kset, state), gen = saved[0], torch.Generator()
    gen.set_state(state)
    resumed = dkdm.shuffle_denoise(teacher, grid, kset, 4, True, gen)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)

def test_sigterm_in_fid_scoring_stops_at_the_next_chunk(tmp_path, scheduler):
    """FID/IS scoring reads the flag between chunks of 8 batches, every rank the same number of times (the
    largest share's): a SIGTERM during the first chunk stops it after that chunk. Scoring in chunks gives the
    numbers of one chunk."""
    shapes = R.make_shapes(60, 16, seed=0)
    _write_pngs(tmp_path / "ref", shapes[:30])
    _write_pngs(tmp_path / "ours", shapes[30:])
    det, calls = StandIn(), []
    features = det.features
    det.features = lambda x, mode: calls.append(len(x)) or features(x, mode)
    score = lambda batch: R.fid_is(str(tmp_path / "ours"), "shapes", inception=det,
                                   ref_folder=str(tmp_path / "ref"), batch_size=batch)
    chunked, one = score(2), score(30)  # 15 batches in 2 chunks (the reference then cached), and one batch
    for key in one:  # float32 features at another batch size: ~1e-8 relative here
        assert chunked[key] == pytest.approx(one[key], rel=1e-6), key
    calls.clear()
    scheduler(det, "features", 2)
    with pytest.raises(R.Preempted, match="FID/IS scoring"):
        score(2)
    assert calls == [2] * 8  # the first chunk, of the first mode
