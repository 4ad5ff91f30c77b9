"""Many GPUs, tested on CPU: torchrun with two gloo ranks against one process with the same global batch, for
Alg. 1 and the four methods (weights, metrics rows and logged losses), a run killed on two ranks resumed on
one (and one on one resumed on two), workers that stop when torchrun alone is killed, and sharded sampling:
FID folders and Denoising Student pairs written by two ranks byte for byte those of one. Dropout is 0
throughout: each rank draws its own masks."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common as C
import runtime as R
import dkdm
import luhman_kd
import progressive
import self_distill
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {"runtime": None, "progressive": progressive, "luhman_kd": luhman_kd, "self_distill": self_distill,
           "dkdm": dkdm}

def _torchrun(method, argv, ranks=2, wait=True):
    """`torchrun --standalone --nproc_per_node=ranks METHOD.py argv` on CPU, one thread a rank (method: a
    method file's name or a script's path)."""
    script = method if method.endswith(".py") else os.path.join(ROOT, f"{method}.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script,
           *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

def _main(method, argv):
    return R.train_teacher(R.parse_config(R.TeacherConfig, argv)) if method == "runtime" else \
        METHODS[method].main(argv)

def _teacher_file(path, num_classes=0):
    torch.manual_seed(0)
    net = C.build_net("tiny16", image_size=16, out_channels=6, zero_init=False, num_classes=num_classes)
    R.save_checkpoint(str(path), **C.Denoiser(net, C.Schedule("linear"), "eps", "learned_range").state(),
                      method="t")
    return str(path)

def _argv(method, teacher):
    """Seconds of each method on CPU. Adam turns the float noise of gradients that are zero in exact
    arithmetic (the attention key biases') into steps of +-lr, so the runs that compare weights use small
    lrs."""
    return {
        "runtime": ["--net", "tiny16", "--updates", "4", "--batch", "4", "--sample-steps", "2", "--lr",
                   "1e-4"],
        "progressive": ["--quick", "--start-steps", "4", "--updates-per-round", "3", "--batch", "4",
                        "--eval-samples", "6", "--grid", "2"],
        "luhman_kd": ["--quick", "--teacher", teacher, "--num-pairs", "32", "--num-test-pairs", "8",
                      "--teacher-steps", "3", "--batch", "8", "--accum", "2", "--updates", "6",
                      "--test-every", "3", "--eval-n", "8", "--time-batch", "0", "--other-size", "16x24",
                      "--gen-batch", "6", "--lr", "1e-4"],
        "self_distill": ["--quick", "--teacher", teacher, "--steps", "4", "--updates", "6", "--batch", "4",
                         "--eval-samples", "6", "--eval-steps", "2", "--reference-steps", "4"],
        "dkdm": ["--quick", "--teacher", teacher, "--chain-steps", "10", "--rho", "0.5", "--batch", "4",
                 "--updates", "6", "--eval-samples", "6", "--eps-samples", "8", "--eval-steps", "5",
                 "--prep-batch", "6", "--lr", "1e-4"]}[method] + ["--device", "cpu", "--log-every", "1"]

def _close_weights(a, b, tol=1e-4):
    """Largest parameter difference relative to the network's largest parameter."""
    scale = max(float(v.abs().max()) for v in a.values())
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol * scale, (worst, scale)

def _losses(out):
    return [row["loss"] for row in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in row]

def _rows(out):
    rows = json.load(open(os.path.join(out, "metrics.json")))["results"]
    return [{k: v for k, v in r.items() if k in ("model", "steps", "sampler", "round")} for r in rows], \
        [r["rmse_to_reference"] for r in rows]

@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_take_the_update_of_one_process(tmp_path, method):
    teacher = _teacher_file(tmp_path / "teacher.pt")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _main(method, _argv(method, teacher) + ["--out", one])
    _torchrun(method, _argv(method, teacher) + ["--out", two])
    a, b = (R.load_checkpoint(os.path.join(out, "ckpt.pt")) for out in (one, two))
    _close_weights(a["model"], b["model"])
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    started = [json.loads(line) for line in open(os.path.join(two, "log.jsonl"))][0]
    assert started["event"] == "started" and started["world_size"] == 2
    assert json.load(open(os.path.join(two, "config.json")))["world_size"] == 2
    if method == "runtime":
        return
    (keys_a, rmse_a), (keys_b, rmse_b) = _rows(one), _rows(two)
    assert keys_a == keys_b and rmse_b == pytest.approx(rmse_a, rel=1e-4, abs=1e-6)
    if method == "dkdm":  # every rank holds the whole set, the same as one process's
        assert torch.equal(a["knowledge"]["k"], b["knowledge"]["k"])
        assert torch.allclose(a["knowledge"]["z"], b["knowledge"]["z"], atol=1e-4)
    if method == "luhman_kd":  # each rank filled its own chunks of the memory maps
        for split in ("train", "test"):
            assert open(os.path.join(one, "pairs", f"{split}.npy"), "rb").read() == \
                open(os.path.join(two, "pairs", f"{split}.npy"), "rb").read()

@pytest.mark.parametrize("method", ["progressive", "dkdm"])
def test_two_ranks_take_the_update_of_one_process_with_labels(tmp_path, method):
    """A class-conditional teacher: labels drawn with the data (progressive, each rank its slice) or with the
    knowledge set (dkdm, every rank the whole set) give one process's updates on 2 ranks."""
    teacher = _teacher_file(tmp_path / "teacher.pt", num_classes=3)
    argv = _argv(method, teacher)
    if method == "progressive":
        argv += ["--teacher", teacher, "--reparam-updates", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _main(method, argv + ["--out", one])
    _torchrun(method, argv + ["--out", two])
    a, b = (R.load_checkpoint(os.path.join(out, "ckpt.pt")) for out in (one, two))
    assert a["net_config"]["num_classes"] == 3
    _close_weights(a["model"], b["model"])
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    (keys_a, rmse_a), (keys_b, rmse_b) = _rows(one), _rows(two)
    assert keys_a == keys_b and rmse_b == pytest.approx(rmse_a, rel=1e-4, abs=1e-6)
    if method == "dkdm":
        assert torch.equal(a["knowledge"]["y"], b["knowledge"]["y"])

def _holders(marker):
    """The pids of the processes whose command line holds `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids

def _alive(pid):
    """Whether any thread of a process still runs: its files (its run folder's lock) are closed only once the
    last thread exits, which can be after the main thread shows as a zombie."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            if open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX":
                return True
        except OSError:
            pass
    return False

def _kill_all(marker):
    """SIGKILL every process whose command line holds `marker`, and wait until they are gone."""
    pids = _holders(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while any(map(_alive, pids)) and time.time() < deadline:
        time.sleep(0.05)

def _started(run, out):
    """Wait until the run writing `out` has its first checkpoint."""
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, "ckpt.pt")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)

@pytest.mark.parametrize("kill", ["everything", "launcher", "preempted"])
def test_a_run_killed_on_two_ranks_resumes_on_one(tmp_path, kill):
    """A run on two ranks stopped, resumed on one process: equal to an uninterrupted run, one log row per
    update. 'everything': SIGKILL to torchrun and its workers, as a power cut would; 'launcher': kill -9 of
    torchrun alone (a job script's kill of its process group: each worker has a session of its own), and the
    workers stop too (PR_SET_PDEATHSIG), as preempted; 'preempted': a scheduler's SIGTERM to torchrun, which
    forwards it: both ranks stop at the same update, the checkpoint of that update written, no update lost."""
    teacher = _teacher_file(tmp_path / "teacher.pt")
    argv = _argv("self_distill", teacher) + ["--updates", "40", "--ckpt-every", "2"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    self_distill.main(argv + ["--out", straight])
    if kill == "preempted":
        argv[argv.index("--ckpt-every") + 1] = "1000"  # no checkpoint but the preempted update's
    run = _torchrun("self_distill", argv + ["--out", killed], wait=False)
    _started(run, killed) if kill != "preempted" else _logged(run, killed, 3)
    if kill == "everything":
        _kill_all(killed)
        run.wait()
    else:
        workers = [pid for pid in _holders(killed) if pid != run.pid]
        os.kill(run.pid, signal.SIGKILL if kill == "launcher" else signal.SIGTERM)
        run.wait(timeout=60)
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "the workers outlived their launcher"
        said = run.stderr.read().decode()
        assert "preempted at update " in said and "Traceback" not in said.split("preempted at")[0], said
        stop = [row for row in map(json.loads, open(os.path.join(killed, "log.jsonl")))
                if row.get("event") == "preempted"]
        assert len(stop) == 1 and R.load_checkpoint(os.path.join(killed, "ckpt.pt"))["step"] == stop[0]["step"]
    assert not os.path.exists(os.path.join(killed, "metrics.json")), "finished before it could be killed"
    resumed = self_distill.main(argv + ["--out", killed])
    log = [json.loads(line) for line in open(os.path.join(killed, "log.jsonl"))]
    starts = [row for row in log if row.get("event") in ("started", "resumed")]
    assert [row["world_size"] for row in starts] == [2, 1]  # started on 2, resumed on 1
    assert [row["update"] for row in log if "loss" in row] == list(range(1, 41))   # one row per update
    if kill != "everything":  # resumed at the update it stopped at
        assert starts[1]["step"] == next(row["step"] for row in log if row.get("event") == "preempted")
    _close_weights(R.load_checkpoint(os.path.join(straight, "ckpt.pt"))["model"],
                   R.load_checkpoint(os.path.join(killed, "ckpt.pt"))["model"])
    assert _rows(killed)[1] == pytest.approx(_rows(straight)[1], rel=1e-4)
    assert resumed["finished"]

def _logged(run, out, n):
    """Wait until the run writing `out` has logged n updates."""
    deadline, log = time.time() + 300, os.path.join(out, "log.jsonl")
    while run.poll() is None and time.time() < deadline and \
            (not os.path.exists(log) or sum('"loss"' in line for line in open(log)) < n):
        time.sleep(0.02)

def test_a_run_on_one_process_resumes_on_two_ranks(tmp_path):
    """DKDM's dynamic set and generator state carry over: 3 updates on one process, 3 more on two ranks."""
    teacher = _teacher_file(tmp_path / "teacher.pt")
    argv = _argv("dkdm", teacher)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    dkdm.main(argv + ["--out", straight])
    dkdm.main(argv + ["--out", resumed, "--updates", "3"])
    _torchrun("dkdm", argv + ["--out", resumed])
    a, b = (R.load_checkpoint(os.path.join(out, "ckpt.pt")) for out in (straight, resumed))
    _close_weights(a["model"], b["model"])
    assert torch.allclose(a["knowledge"]["z"], b["knowledge"]["z"], atol=1e-4)
    assert _losses(resumed)[-3:] == pytest.approx(_losses(straight)[-3:], rel=1e-4)

SAMPLE = """
import sys
sys.path[:0] = [{root!r}, {tools!r}]
import sample
out = sys.argv[1]
teacher = ["--model", {teacher!r}, "--steps", "3", "--skip", "linspace", "--device", "cpu"]
# the README's torchrun command, shrunk: one PNG per seed, the ranks sharing the batches
sample.main(teacher + ["--sampler", "ancestral", "--seeds", "0-9", "--outdir", out, "--batch", "3"])
# R.generate: every seed's image, in order, on rank 0's npz
sample.main(teacher + ["--sampler", "ddim", "--seeds", "0-6", "--npz", out + "_ddim.npz", "--batch", "2"])
sample.main(teacher + ["--sampler", "ancestral", "--seeds", "0-6", "--npz", out + "_ancestral.npz",
                       "--batch", "8"])  # one process: one batch of 7; two ranks: 4 and 3
"""

def test_sample_folders_written_by_two_ranks_are_those_of_one(tmp_path):
    """tools/sample.py, EDM's sharded sampling: one PNG per seed, so the FID folder is the same whatever the
    number of ranks; the npz holds every seed's image in order; an ancestral sampler's per-step noise follows
    the seeds (their device generators) whatever batches the ranks take."""
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE.format(root=ROOT, tools=os.path.join(ROOT, "tools"),
                                    teacher=_teacher_file(tmp_path / "teacher.pt")))
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(str(script), [str(tmp_path / "two")])
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 10
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    (one, two), (one_anc, two_anc) = ([np.load(tmp_path / f"{run}_{sampler}.npz")["arr_0"].astype(int)
                                       for run in ("one", "two")] for sampler in ("ddim", "ancestral"))
    assert one.shape == (7, 16, 16, 3) and np.array_equal(one, two)
    # one 8-bit level: float32 sums blocked by batch size (6e-5 seen), grown by the eps teacher's 1/alpha at
    # t = T - 1; a seed's noise, not another's: far apart
    assert np.abs(one_anc - two_anc).max() <= 1
    assert np.abs(one_anc[1:] - two_anc[:-1]).mean() > 10

def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "dkdm.py"), "--quick", "--device", "cpu",
                           "--batch", "5", "--out", str(tmp_path / "run")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "error: --batch 5: the global batch must split evenly over the 2 " \
        "processes; pass a multiple of 2" in done.stderr
    assert not os.path.exists(tmp_path / "run")
