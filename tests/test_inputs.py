"""Bad input, refused before any work in one line, class by class over the four method files; and the run
contract that keeps runs from lying: a run started over clears the old results, a resumed log holds one row
per update, elapsed time runs to the checkpoint, a finished run is left untouched, a folder has one writer."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import common as C
import runtime as R
import dkdm
import luhman_kd
import progressive
import self_distill

METHODS = {"progressive": progressive, "luhman_kd": luhman_kd, "self_distill": self_distill, "dkdm": dkdm}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _teacher_file(path, param="eps", var="fixed_small"):
    """A random 16x16 tiny16 teacher on the linear schedule (T = 1000), saved as a project checkpoint."""
    torch.manual_seed(0)
    net = C.build_net("tiny16", image_size=16, out_channels=6 if var == "learned_range" else 3,
                      zero_init=False)
    R.save_checkpoint(str(path), **C.Denoiser(net, C.Schedule("linear"), param, var).state(), method="t")
    return str(path)

@pytest.fixture
def no_work(monkeypatch):
    """Every method's work starts with start_run, a cached teacher or the base model: each raises here."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    for name in ("start_run", "cached_teacher", "train_teacher", "generate", "sample_to_folder"):
        monkeypatch.setattr(R, name, refuse)

def _refused(method, flags, message, out):
    with pytest.raises((ValueError, SystemExit)) as e:
        METHODS[method].main(["--quick", "--device", "cpu", "--out", str(out), *flags])
    text = str(e.value)
    assert message in text and "\n" not in text, text
    return text

# ---- bad input, by class -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_flags_must_be_finite(tmp_path, no_work, method, value):
    _refused(method, [f"--lr={value}"], "--lr: must be a finite number", tmp_path / "run")
    assert not os.path.exists(tmp_path / "run")

@pytest.mark.parametrize("method,flags,message", [
    ("progressive", ["--base-ema", "1"], "--base-ema: must be below 1.0"),
    ("progressive", ["--dropout", "1"], "--dropout: must be below 1.0"),
    ("luhman_kd", ["--ema", "1"], "--ema: must be below 1.0"),
    ("luhman_kd", ["--beta2", "1.5"], "--beta2: must be below 1.0"),
    ("self_distill", ["--warmup", "1"], "--warmup: must be below 1.0"),
    ("self_distill", ["--lr-end", "1.5"], "--lr-end: must be at most 1.0"),
    ("self_distill", ["--train-ema", "1"], "--train-ema: must be below 1.0"),
    ("self_distill", ["--beta1", "-0.1"], "--beta1: must be at least 0.0"),
    ("dkdm", ["--ema", "1"], "--ema: must be below 1.0"),
    ("dkdm", ["--rho", "-1"], "--rho: must be at least 0.0"),
    ("dkdm", ["--dropout", "1"], "--dropout: must be below 1.0")])
def test_decays_probabilities_and_fractions_stay_in_range(tmp_path, no_work, method, flags, message):
    _refused(method, flags, message, tmp_path / "run")

@pytest.mark.parametrize("method,flags,message", [
    ("luhman_kd", ["--teacher-steps", "1001", "--skip", "uniform"], "--teacher-steps 1001: the model has T"),
    ("self_distill", ["--skip", "linspace", "--eval-steps", "2,1024"], "--eval-steps 1024: the model has T"),
    ("self_distill", ["--skip", "trailing", "--reference-steps", "2000"], "--reference-steps 2000: the"),
    ("dkdm", ["--eval-steps", "1001"], "--eval-steps 1001: the model has T = 1000"),
    ("dkdm", ["--synthetic-steps", "4000", "--method", "datafree"], "--synthetic-steps 4000: the model"),
    ("dkdm", ["--chain-steps", "5000"], "--chain-steps 5000: the teacher has T = 1000")])
def test_step_counts_beyond_the_teachers_T(tmp_path, no_work, method, flags, message):
    teacher = _teacher_file(tmp_path / "teacher.pt")
    _refused(method, ["--teacher", teacher, *flags], message, tmp_path / "run")
    assert not os.path.exists(tmp_path / "run")

@pytest.mark.parametrize("method,flags,message", [
    ("progressive", ["--start-steps", "4", "--end-steps", "4"], "expected powers of 2 with end < start"),
    ("progressive", ["--stochastic", "0.5,x"], "--stochastic"),
    ("luhman_kd", ["--teacher-steps", "0"], "--teacher-steps: must be at least 1"),
    ("self_distill", ["--eval-steps", ""], "--eval-steps ''"),
    ("self_distill", ["--eval-steps", "0,2"], "--eval-steps '0,2'"),
    ("dkdm", ["--eval-steps", "0"], "--eval-steps: must be at least 1")])
def test_step_lists_empty_or_zero_and_no_round(tmp_path, no_work, method, flags, message):
    _refused(method, flags, message, tmp_path / "run")

@pytest.mark.parametrize("method,flags,message", [
    ("progressive", ["--eval-samples", "0"], "--eval-samples: must be at least 1"),
    ("luhman_kd", ["--num-pairs", "4", "--batch", "8"], "--batch 8 exceeds --num-pairs 4"),
    ("luhman_kd", ["--batch", "8", "--accum", "3"], "--accum 3: expected a divisor of --batch 8"),
    ("self_distill", ["--eval-samples", "0"], "--eval-samples: must be at least 1"),
    ("dkdm", ["--rho", "0.001"], "--rho 0.001: round(rho K) = 0")])
def test_sizes_that_make_an_empty_set_or_an_uneven_batch(tmp_path, no_work, method, flags, message):
    teacher = _teacher_file(tmp_path / "teacher.pt")
    _refused(method, ["--teacher", teacher, *flags], message, tmp_path / "run")

@pytest.mark.parametrize("method,flag", [("progressive", "--net"), ("self_distill", "--train-net"),
                                         ("dkdm", "--student")])
def test_unknown_network_presets(tmp_path, no_work, method, flag):
    _refused(method, [flag, "unet9000"], "invalid choice: 'unet9000'", tmp_path / "run")
    with pytest.raises(SystemExit, match="invalid choice"):
        R.parse_config(R.TeacherConfig, ["--net", "unet9000"])

@pytest.mark.parametrize("method", METHODS)
def test_a_teacher_folder_without_a_model(tmp_path, no_work, method):
    (tmp_path / "empty").mkdir()
    _refused(method, ["--teacher", str(tmp_path / "empty")], "has no config.json", tmp_path / "run")
    assert not os.path.exists(tmp_path / "run")

@pytest.mark.parametrize("method", METHODS)
def test_missing_or_unreadable_checkpoints_before_the_cached_teacher(tmp_path, no_work, method):
    """No --teacher: the cached teacher (or progressive's base model) would be trained first, and is not."""
    _refused(method, ["--resume", str(tmp_path / "nope.pt")], "no such checkpoint", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"half a checkpoint")
    _refused(method, [], "ckpt.pt is not a readable checkpoint", tmp_path / "run")

def test_a_pairs_folder_without_pairs(tmp_path, no_work):
    (tmp_path / "pairs").mkdir()
    _refused("luhman_kd", ["--stage", "train", "--pairs", str(tmp_path / "pairs")], "no pairs there",
             tmp_path / "run")
    (tmp_path / "file").write_text("")
    _refused("luhman_kd", ["--pairs", str(tmp_path / "file")], "not a folder", tmp_path / "run")

@pytest.mark.parametrize("method", METHODS)
def test_an_out_that_cannot_be_written(tmp_path, no_work, method):
    (tmp_path / "file").write_text("")
    _refused(method, [], "is not a folder; pass another --out", tmp_path / "file" / "run")
    _refused(method, [], "/proc is not writable", "/proc/run")  # read-only, though os.access says yes to root

@pytest.mark.parametrize("flags,message",
                         [(["--rho", "0.001"], "--rho 0.001: round(rho K) = 0"),
                          (["--chain-steps", "5000"], "--chain-steps 5000: the teacher has T")])
def test_dkdm_chain_flags_refused_before_the_cached_teacher_is_trained(tmp_path, no_work, flags, message):
    _refused("dkdm", flags, message, tmp_path / "run")

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device,message", [("cuda:7", "--device cuda:7"), ("tpu", "expected auto, cpu"),
                                            ("cuda:x", "expected auto, cpu")])
def test_devices_that_do_not_exist(tmp_path, no_work, method, device, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    _refused(method, ["--device", device], message, tmp_path / "run")

@pytest.mark.parametrize("method,flag", [("progressive", "--fid-samples"), ("luhman_kd", "--fid"),
                                         ("self_distill", "--fid-samples"), ("dkdm", "--fid-samples")])
def test_fid_that_cannot_be_computed_fails_at_the_start(tmp_path, no_work, monkeypatch, method, flag):
    """Offline: neither the Inception weights nor clean-fid's CIFAR-10 statistics can be fetched."""
    monkeypatch.setattr(R, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(R, "INCEPTION_URL", "http://127.0.0.1:9/inception.pt")      # refused at once
    _refused(method, [flag, "8"], "Inception weights unavailable", tmp_path / "run")
    import cleanfid.features

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(cleanfid.features, "get_reference_statistics", offline)
    (tmp_path / "inception.pt").write_bytes(b"")
    teacher = _teacher_file(tmp_path / "teacher.pt")
    _refused(method, [flag, "8", "--inception", str(tmp_path / "inception.pt"), "--data", "cifar10",
                      "--teacher", teacher], "CIFAR-10 statistics (legacy_tensorflow) are unavailable",
             tmp_path / "run")
    _refused(method, [flag, "8", "--inception", str(tmp_path / "inception.pt"), "--data", "cifar10",
                      "--teacher", teacher, "--fid-stats", str(tmp_path / "none.npz")], "no such file",
             tmp_path / "run")
    assert not os.path.exists(tmp_path / "run")

def test_a_pairs_stage_ignores_training_flags(tmp_path):
    """--stage pairs makes pairs; --batch (larger than --num-pairs here) and --accum belong to training."""
    teacher = _teacher_file(tmp_path / "teacher.pt")
    luhman_kd.main(["--quick", "--device", "cpu", "--teacher", teacher, "--out", str(tmp_path / "run"),
                    "--stage", "pairs", "--num-pairs", "24", "--num-test-pairs", "8", "--teacher-steps", "2",
                    "--batch", "512", "--accum", "3", "--gen-batch", "16"])
    assert json.load(open(tmp_path / "run" / "pairs" / "meta.json"))["done"] == {"train": 24, "test": 8}

# ---- runs never lie --------------------------------------------------------------------------------

def _tiny(method, teacher):
    """A few seconds of each method on a random teacher, one evaluation."""
    return {"progressive": ["--teacher", teacher, "--start-steps", "2", "--reparam-steps", "0",
                            "--updates-per-round", "2", "--final-rounds-factor", "1", "--batch", "4",
                            "--eval-samples", "4", "--grid", "2", "--log-every", "1"],
            "luhman_kd": ["--teacher", teacher, "--num-pairs", "16", "--num-test-pairs", "4",
                          "--teacher-steps", "2", "--batch", "4", "--updates", "3", "--test-every", "3",
                          "--eval-n", "8", "--time-batch", "0", "--other-size", "", "--gen-batch", "16",
                          "--log-every", "1"],
            "self_distill": ["--teacher", teacher, "--steps", "4", "--updates", "4", "--batch", "2",
                             "--reference-steps", "4", "--eval-steps", "2", "--eval-samples", "4",
                             "--log-every", "1"],
            "dkdm": ["--teacher", teacher, "--chain-steps", "10", "--rho", "0.5", "--batch", "4",
                     "--updates", "3", "--eval-samples", "4", "--eps-samples", "8", "--eval-steps", "5",
                     "--log-every", "1", "--snapshot-every", "2"]}[method]

@pytest.mark.parametrize("method", METHODS)
def test_a_run_started_over_and_killed_reports_nothing_of_the_old_run(tmp_path, monkeypatch, method):
    """--resume none over a finished run, killed in its evaluation: the next start finds no finished
    metrics of the old run (nor its samples); a finished run rerun with a new non-result flag is left as it
    is."""
    module, out = METHODS[method], tmp_path / "run"
    argv = ["--quick", "--device", "cpu", "--out", str(out),
            *_tiny(method, _teacher_file(tmp_path / "t.pt", var="learned_range"))]
    first = module.main(argv)
    assert first["finished"]
    files = {name: open(out / name, "rb").read() for name in ("config.json", "log.jsonl", "metrics.json")}
    assert module.main(argv + ["--log-every", "2"]) == first                # finished: untouched
    assert {name: open(out / name, "rb").read() for name in files} == files

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        module.main(argv + ["--resume", "none"])
    assert R.run_finished(str(out)) is None and not os.path.exists(out / "metrics.json")
    names = set(os.listdir(out))
    assert not names & {"samples.png", "rounds.png", "samples_student.png", "samples"}
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert not any(row.get("event") == "resumed" for row in log)                    # a fresh log

def test_a_resumed_log_has_one_row_per_update_and_time_runs_to_the_checkpoint(tmp_path, kill_on_call):
    cfg = R.TeacherConfig(net="tiny16", updates=6, batch=2, log_every=1, ckpt_every=3, sample_steps=2,
                          out=str(tmp_path / "run"), device="cpu")
    restore = kill_on_call(R, "log_row", 6)     # the started row, updates 1-4, killed at update 5's row
    with pytest.raises(KeyboardInterrupt):
        R.train_teacher(cfg)
    restore()
    ckpt = R.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    before = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r.get("event") for r in before[:1]] == ["started"] and ckpt["step"] == 3
    assert [r["step"] for r in before[1:]] == [1, 2, 3, 4]
    assert ckpt["elapsed"] > before[3]["elapsed_s"]                         # to the checkpoint
    R.train_teacher(cfg)
    after = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r.get("step") for r in after if r.get("stage") == "teacher"] == [1, 2, 3, 4, 5, 6]
    assert [r.get("event") for r in after][4] == "resumed"
    assert after[5]["elapsed_s"] > ckpt["elapsed"]

def _teacher_run(out):
    """`python runtime.py` (Alg. 1, a tiny net, a checkpoint every update) into `out`, in the background."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "runtime.py"), "--net", "tiny16",
                             "--batch", "2", "--updates", "100000", "--ckpt-every", "1",
                             "--sample-steps", "2", "--device", "cpu", "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

def _wait(until, run):
    deadline = time.time() + 120
    while not until() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert until(), run.stderr.read() if run.poll() is not None else "timed out"

def test_a_folder_has_one_writer(tmp_path):
    """A second run on a folder that a live run holds is refused in one line before any work; kill -9 frees
    the folder (the OS drops the lock with its process); SIGUSR1 preempts a run: the checkpoint of its
    update, one line, status PREEMPTED_STATUS."""
    out = tmp_path / "run"
    cfg = R.TeacherConfig(net="tiny16", batch=2, updates=1, ckpt_every=1, sample_steps=2, device="cpu",
                          out=str(out))  # done at once if it were let in
    events = lambda: [row.get("event") for row in map(json.loads, open(out / "log.jsonl")) if "event" in row]
    runs = [_teacher_run(out)]
    try:
        first = runs[0]
        _wait(lambda: os.path.exists(out / "ckpt.pt"), first)
        config = (out / "config.json").read_bytes()
        with pytest.raises(ValueError) as e:
            R.train_teacher(cfg)
        said = str(e.value)
        assert said.startswith(f"--out {out} is in use by pid {first.pid} on {socket.gethostname()} since ")
        assert said.endswith("; wait for it to end, stop it, or pass another --out") and "\n" not in said
        assert (out / "config.json").read_bytes() == config and events() == ["started"]   # no work done
        first.kill()
        first.wait()
        step = R.load_checkpoint(out / "ckpt.pt")["step"]
        R.train_teacher(dataclasses.replace(cfg, updates=step + 1))  # the lock went with the killed process
        assert events() == ["started", "resumed"] and R.load_checkpoint(out / "ckpt.pt")["step"] == step + 1
        runs.append(_teacher_run(out))
        _wait(lambda: events() == ["started", "resumed", "resumed"], runs[1])
        runs[1].send_signal(signal.SIGUSR1)  # a scheduler's warning (SLURM's --signal)
        assert runs[1].wait(timeout=60) == R.PREEMPTED_STATUS
        said, step = runs[1].stderr.read(), R.load_checkpoint(out / "ckpt.pt")["step"]
        assert said.strip().splitlines()[-1] == f"preempted at update {step}, its state written: rerun the " \
            "same command to resume" and "Traceback" not in said, said
        assert events() == ["started", "resumed", "resumed", "preempted"]
    finally:
        for run in runs:
            run.kill()
            run.wait()
