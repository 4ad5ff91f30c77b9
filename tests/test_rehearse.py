"""The README's paper commands under torchrun (2 gloo ranks), as a user launches them: no --inception or
--fid-stats, the files a first online run leaves in the default cache (standins.user_cache: an Inception
TorchScript stand-in, clean-fid's statistics, CIFAR-10 as the official tarball, google/ddpm-cifar10-32 in the
hub cache's layout), rehearsed (--rehearse: every count cut, each phase timed) with tiny nets. And the races
and hangs reproduced on those paths before they were fixed: FID under torchrun, the base model loaded while
rank 0 still wrote it, two ranks removing one file, the cached teacher's batch on 3 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common as C
import runtime as R
import standins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # a hang fails the test, never the suite

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A user's DISTILL_CACHE after a first online run (the test cache's shapes teachers linked in)."""
    return standins.user_cache(str(tmp_path_factory.mktemp("user") / "cache"))

def _run(cache, script, argv, ranks=2, timeout=TIMEOUT):
    """`torchrun --standalone --nproc_per_node=ranks script argv` (ranks 0: plain python), one thread a rank,
    DISTILL_CACHE = cache; the completed process (its return code checked)."""
    script = script if os.path.isabs(script) else os.path.join(ROOT, script)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_CACHE": cache}
    done = subprocess.run([*launch, script, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

def _rehearsal(out, phases):
    """OUT/rehearsal/rehearsal.json holds a row per phase named, each with a rate and a full-run estimate
    at least as large as what the rehearsal itself took."""
    report = json.load(open(os.path.join(out, "rehearsal", "rehearsal.json")))
    names = [row["phase"] for row in report["rows"]]
    for phase in phases:
        assert any(name.startswith(phase) for name in names), (phase, names)
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["full"] >= row["done"] and row["full_s"] >= row["seconds"] * 0.99
    assert report["world_size"] == 2 and report["full_run_s"] >= sum(r["seconds"] for r in report["rows"])
    return report

def _metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))

# ---- hangs and races reproduced on the launched paths ------------------------------------------------------

FID = """
import json, sys
sys.path.insert(0, {root!r})
import runtime as R
R.setup_device("cpu")
json.dump(R.fid_is(sys.argv[1], "cifar10"), open(f"{{sys.argv[2]}}.{{R.rank()}}.json", "w"))  # a file a rank
"""

def test_fid_under_torchrun_without_inception_flag_equals_one_process(cache, tmp_path):
    """Rank 0 used to fetch the Inception (a barrier inside download) while the others waited in a
    broadcast: a hang. Now every rank scores its share and the sums are reduced: one process's numbers."""
    folder = tmp_path / "images"
    os.makedirs(folder)
    for i, image in enumerate(R.make_shapes(21, 32, seed=3)):
        R.save_png(image, str(folder / f"{i:06d}.png"))
    (tmp_path / "fid.py").write_text(FID.format(root=ROOT))
    for ranks in (0, 2):  # each rank's numbers in its own file (their printed lines could interleave)
        _run(cache, str(tmp_path / "fid.py"), [str(folder), str(tmp_path / f"ranks{ranks}")], ranks)
    one, *two = (json.load(open(tmp_path / name)) for name in ("ranks0.0.json", "ranks2.0.json", "ranks2.1.json"))
    assert set(one) == {"fid", "fid_clean", "is", "is_std"} and two[0] == two[1]  # every rank: rank 0's
    for key in one:  # float32 features at another batch size: ~1e-9 relative here
        assert two[0][key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key

BASE = """
import hashlib, sys, time
sys.path.insert(0, {root!r})
import common as C, progressive as P, runtime as R
save = R.save_checkpoint
def slow_save(path, **state):  # rank 0 writes the last one slowly (at the paper's size a save takes seconds)
    time.sleep(8 if R.rank() == 0 and state.get("step") == 4 else 0)
    save(path, **state)
R.save_checkpoint = slow_save
cfg = R.parse_config(P.Config, ["--data", "shapes", "--net", "tiny16", "--image-size", "16", "--base-updates",
                                "4", "--base-batch", "4", "--ckpt-every", "2", "--log-every", "2",
                                "--device", "cpu", "--out", sys.argv[1]])
R.setup_device("cpu")
spec, teacher = P.get_teacher(cfg, "cpu")
digest = hashlib.sha1(b"".join(v.numpy().tobytes() for v in teacher.net.state_dict().values())).hexdigest()
digests = [None] * R.world_size()
R.dist.all_gather_object(digests, digest)
print("DIGESTS", digests)
R.barrier()
"""

def test_ranks_load_the_same_base_model(cache, tmp_path):
    """progressive.py without --teacher: every rank leaves train_teacher once the final checkpoint is on
    disk, so all load the same base model (it used to load the one of 2 updates earlier on rank 1)."""
    (tmp_path / "base.py").write_text(BASE.format(root=ROOT))
    out = _run(cache, str(tmp_path / "base.py"), [str(tmp_path / "run")]).stdout
    digests = eval(out.split("DIGESTS ")[-1].splitlines()[0])
    assert len(digests) == 2 and digests[0] == digests[1]
    assert R.load_checkpoint(str(tmp_path / "run" / "base" / "ckpt.pt"))["step"] == 4

SLOW_REMOVE = """
import os, runpy, sys, time
remove = os.remove
def slow_remove(path):  # widens the window in which two ranks see a file and both remove it
    time.sleep(0.5)
    remove(path)
os.remove = slow_remove
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

def test_luhman_kd_all_stages_with_fid_rehearsed_then_extended(cache, tmp_path):
    """Table 1's command rehearsed on 2 ranks (pairs, training, test loss, evaluation, FID of student and
    teacher against clean-fid's statistics); then a finished, evaluated run extended with more --updates,
    whose stale metrics.json two ranks used to remove at once (FileNotFoundError on the loser)."""
    out = str(tmp_path / "run")
    tiny = ["--gen-batch", "16", "--batch", "16", "--teacher-steps", "4", "--time-batch", "4",
            "--device", "cpu"]
    _run(cache, "luhman_kd.py", ["--data", "cifar10", "--fid", "50000", "--fid-teacher", "true", "--out", out,
                                 "--rehearse", *tiny])
    report = _rehearsal(out, ["teacher pairs", "student training", "held-out test loss", "evaluation student",
                              "FID samples fid_student", "FID samples fid_teacher", "FID/IS scoring",
                              "checkpoint read back"])
    pairs = next(r for r in report["rows"] if r["phase"] == "teacher pairs")
    assert pairs["full"] == 1_024_000 + 51_200  # the full run's pairs (sec. 3.1, the official held-out set)
    rows = _metrics(os.path.join(out, "rehearsal"))["results"]
    assert all(r["fid"] is not None for r in rows if r["steps"] in (1, 4) and r["model"] in ("student",
                                                                                           "teacher")
               and "image_size" not in r and (r["model"] == "student" or r["steps"] == 4))
    (tmp_path / "slow_remove.py").write_text(SLOW_REMOVE)
    real = ["--data", "cifar10", "--num-pairs", "32", "--num-test-pairs", "16", "--updates", "2", "--eval-n",
            "8", "--fid", "8", "--log-every", "1", "--out", str(tmp_path / "real"), *tiny]
    _run(cache, "luhman_kd.py", real)
    assert _metrics(tmp_path / "real")["finished"]
    _run(cache, str(tmp_path / "slow_remove.py"),
         [os.path.join(ROOT, "luhman_kd.py"), *real, "--updates", "3"])
    metrics = _metrics(tmp_path / "real")
    assert metrics["finished"] and metrics["results"][2]["updates"] == 3

def test_the_cached_teachers_batch_error_says_what_to_do(tmp_path):
    """3 processes, a cache without the shapes teacher: its batch of 16 does not split; the error names
    what the user can do, not a flag they never passed."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=3", os.path.join(ROOT, "dkdm.py"), "--quick", "--device", "cpu",
                           "--batch", "15", "--prep-batch", "513", "--out", str(tmp_path / "run")],
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "DISTILL_CACHE": str(tmp_path / "empty")},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0 and "error: the cached shapes teacher" in done.stderr, done.stderr[-2000:]
    assert "trains once at batch 16, which does not split over 3 processes: run this command once as one " \
        "process" in done.stderr and "--batch 16" not in done.stderr

# ---- the README's paper commands, rehearsed on 2 ranks -----------------------------------------------------

def test_progressive_from_scratch_rehearsed(cache, tmp_path):
    """The paper's run (base model of Alg. 1 into OUT/base, no --base-cache; rounds; FID against clean-fid's
    CIFAR-10 statistics), with the 16-channel U-Net and 4 start steps."""
    out = str(tmp_path / "run")
    _run(cache, "progressive.py", ["--data", "cifar10", "--out", out, "--fid-samples", "50000", "--rehearse",
                                   "--net", "tiny16", "--start-steps", "4", "--batch", "8",
                                   "--base-batch", "8", "--device", "cpu"])
    report = _rehearsal(out, ["base model (Alg. 1)", "round 1: 4 -> 2 steps", "round 2: 2 -> 1 steps",
                              "evaluation teacher_4steps", "FID samples student_1steps", "FID/IS scoring",
                              "checkpoint read back"])
    base = next(r for r in report["rows"] if r["phase"] == "base model (Alg. 1)")
    assert base["full"] == 800_000 and base["done"] == 1  # the rate of the second update, after warm-up
    metrics = _metrics(os.path.join(out, "rehearsal"))
    assert metrics["finished"] and [r["steps"] for r in metrics["results"]
                                    if r["model"] == "student"] == [2, 1]
    assert all(r["fid"] is not None for r in metrics["results"] if r["model"] == "student")

def test_progressive_from_a_hub_eps_teacher_rehearsed(cache, tmp_path):
    """From google/ddpm-cifar10-32 (the hub cache's copy): eps students, the re-parameterisation round."""
    out = str(tmp_path / "run")
    _run(cache, "progressive.py", ["--data", "cifar10", "--teacher", "google/ddpm-cifar10-32",
                                   "--start-steps", "8", "--batch", "8", "--out", out, "--rehearse",
                                   "--device", "cpu"])
    _rehearsal(out, ["evaluation teacher_8steps_eps", "round 1: 8 -> 4 steps", "round 3: 2 -> 2 steps",
                     "round 4: 2 -> 1 steps"])
    params = [r["param"] for r in _metrics(os.path.join(out, "rehearsal"))["results"]
              if r["model"] == "student"]
    assert params == ["eps", "eps", "both", "both"]

def _image_tree(root, classes, n, size, seed=0):
    """An ILSVRC2012-style train tree (or, classes None, a flat folder) of n random-noise JPEGs per class of
    size (w, h): not square, so the central crop matters."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c in classes or [""]:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            pixels = torch.randint(256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(os.path.join(root, c, f"{c or 'img'}_{i}.JPEG"))
    return root

@pytest.mark.parametrize("panel", ["imagenet64", "lsun128"])
def test_progressive_fig4_panels_rehearsed(cache, tmp_path, panel):
    """Fig. 4's ImageNet 64 (class-conditional, ADM's reference batch as --fid-stats) and LSUN 128 commands as
    the README gives them, on a small class tree / image folder, with the 16-channel U-Net and 4 start steps."""
    if panel == "imagenet64":
        data = "imagenet64:" + _image_tree(str(tmp_path / "train"), ["n01440764", "n01443537", "n01484850"],
                                          4, (80, 70))
        stats = str(tmp_path / "VIRTUAL_imagenet64_labeled.npz")  # mu, sigma of the stand-in's 64-d features
        import numpy as np
        np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
        flags = ["--class-cond", "true", "--net", "pd_imagenet64", "--base-updates", "550000", "--fid-stats", stats]
    else:
        data = "lsun:" + _image_tree(str(tmp_path / "bedroom"), None, 8, (150, 130))
        flags = ["--net", "pd_lsun128", "--base-updates", "400000"]
    out = str(tmp_path / "run")
    _run(cache, "progressive.py", ["--data", data, *flags, "--param", "both", "--dropout", "0.1", "--base-batch",
                                   "2048", "--base-lr", "3e-4", "--start-steps", "1024", "--batch", "2048",
                                   "--fid-samples", "50000", "--out", out, "--rehearse",
                                   # shrunk for a CPU: the 16-channel U-Net, 4 steps, batches of 8
                                   "--net", "tiny16", "--image-size", "64",  # LSUN at 64: the CPU's cost
                                   "--start-steps", "4", "--batch", "4", "--base-batch", "4", "--device", "cpu"])
    _rehearsal(out, ["base model (Alg. 1)", "round 1: 4 -> 2 steps", "FID samples student_1steps"])
    base = R.load_teacher(os.path.join(out, "rehearsal", "base", "ckpt.pt"))
    assert base.num_classes == (3 if panel == "imagenet64" else 0) and base.param == "both"
    assert base.net.config.image_size == 64
    metrics = _metrics(os.path.join(out, "rehearsal"))
    assert metrics["finished"] and all(r["fid"] is not None for r in metrics["results"] if r["model"] == "student")

def test_self_distill_with_fid_rehearsed(cache, tmp_path):
    """Table 2's DSDI command on google/ddpm-cifar10-32 with FID: every depth once, every model scored."""
    out = str(tmp_path / "run")
    _run(cache, "self_distill.py", ["--data", "cifar10", "--variant", "dsdi", "--steps", "8", "--eval-steps",
                                    "2,4", "--reference-steps", "8", "--fid-samples", "30000", "--out", out,
                                    "--rehearse", "--device", "cpu"])
    _rehearsal(out, ["dsdi N = 8", "dsdi N = 4", "dsdi N = 2", "evaluation student 2 steps",
                     "FID samples student_4", "FID/IS scoring"])
    assert all(r["fid"] is not None for r in _metrics(os.path.join(out, "rehearsal"))["results"])

def test_self_distill_quick_fid_on_two_ranks_equals_one_process(cache, tmp_path):
    """The issue's check: --quick --fid-samples 16 on 2 ranks ends with one process's FID (an Inception
    stand-in at the default path, no --inception); a quarter of the updates, one step count scored."""
    argv = ["--quick", "--fid-samples", "16", "--eval-samples", "16", "--updates", "24", "--eval-steps", "2",
            "--device", "cpu"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(cache, "self_distill.py", [*argv, "--out", one], ranks=0)
    _run(cache, "self_distill.py", [*argv, "--out", two])
    rows_one, rows_two = _metrics(one)["results"], _metrics(two)["results"]
    assert [r["fid"] for r in rows_one] == pytest.approx([r["fid"] for r in rows_two], rel=1e-3)
    assert all(r["fid"] is not None for r in rows_one)

def test_dkdm_dynamic_with_fid_and_snapshots_rehearsed(cache, tmp_path):
    """Table 2's DKDM command (dynamic collection, FID) rehearsed, then its early stop (--eval-snapshots all)
    rehearsed on the snapshots the first rehearsal kept."""
    teacher = str(tmp_path / "adm.pt")
    torch.manual_seed(0)
    net = C.build_net("tiny16", image_size=16, out_channels=6, zero_init=False)
    R.save_checkpoint(teacher, **C.Denoiser(net, C.Schedule("linear"), "eps", "learned_range").state(),
                      method="t")
    out = str(tmp_path / "run")
    flags = ["--data", "cifar10", "--teacher", teacher, "--student", "cnn_tiny", "--chain-steps", "20",
             "--batch", "8", "--prep-batch", "16", "--eval-steps", "5", "--fid-samples", "50000",
             "--rehearse", "--device", "cpu"]
    _run(cache, "dkdm.py", [*flags, "--out", out])
    report = _rehearsal(out, ["shuffle denoise (the knowledge set)", "student training",
                              "teacher trajectory states", "evaluation student ancestral",
                              "FID samples student_ancestral", "FID/IS scoring"])
    prep = next(r for r in report["rows"] if r["phase"].startswith("shuffle denoise"))
    assert (prep["done"], prep["full"]) == (8, round(0.4 * 20) * 8)  # 1 entry a slot; the full rho T b
    assert sorted(os.listdir(os.path.join(out, "rehearsal", "snapshots"))) == ["ema_0000001.pt",
                                                                              "ema_0000002.pt"]
    _run(cache, "dkdm.py", [*flags, "--out", os.path.join(out, "rehearsal"), "--eval-snapshots", "all"])
    rows = json.load(open(os.path.join(out, "rehearsal", "rehearsal", "snapshots.json")))
    assert sorted({r["update"] for r in rows}) == [1, 2] and all(r["fid"] is not None for r in rows
                                                                if r["sampler"] == "ancestral")

def test_compare_rehearsed(cache, tmp_path):
    """tools/compare.py's CIFAR-10 command: each method rehearsed into one table, then the one evaluation."""
    out = str(tmp_path / "run")
    _run(cache, "tools/compare.py", [
        "--data", "cifar10", "--teacher", "google/ddpm-cifar10-32", "--fid-samples", "50000", "--nfe", "1,2",
        "--reference-steps", "8", "--out", out, "--rehearse", "--device", "cpu", "--batch", "8",
        "--progressive", "--start-steps 4 --batch 8", "--luhman-kd",
        "--teacher-steps 4 --gen-batch 16 --batch 16 --time-batch 4", "--self-distill",
        "--steps 4 --eval-steps 2 --reference-steps 4", "--dkdm",
        "--student cnn_tiny --chain-steps 20 --batch 8 --prep-batch 16 --eval-steps 4"])
    _rehearsal(out, ["round 1: 4 -> 2 steps", "teacher pairs", "dsdi N = 4", "shuffle denoise",
                     "reference", "luhman_kd best", "FID/IS scoring"])
    rows = json.load(open(os.path.join(out, "rehearsal", "compare.json")))
    assert {r["method"] for r in rows} == {"teacher", "progressive", "luhman_kd", "self_distill", "dkdm"}

# ---- the README's latent commands (DSD table 2, DKDM table 3) on a fake CompVis model.ckpt ------------------

@pytest.fixture(scope="module")
def ldm_teacher(tmp_path_factory):
    """A CompVis-layout model.ckpt of random weights (the ldm_tiny U-Net, the vq_tiny autoencoder), converted
    as the README says: a latent teacher of 3x16x16 latents and 32x32 images."""
    from test_ldm import first_stage, perturb
    from tools.convert_teacher import main as convert, to_original
    torch.manual_seed(0)
    unet = perturb(C.UNet(C.PRESETS["ldm_tiny"]).eval(), 1)
    folder = tmp_path_factory.mktemp("ldm")
    state = {**to_original(unet.state_dict(), C.PRESETS["ldm_tiny"], "ldm"), **first_stage(2)}
    torch.save({"state_dict": state, "global_step": 0}, folder / "model.ckpt")
    convert([str(folder / "model.ckpt"), str(folder / "ldm_celeba256.pt")])
    return str(folder / "ldm_celeba256.pt")

def test_latent_commands_rehearsed(cache, tmp_path, ldm_teacher):
    """DSD's CelebA-HQ command and DKDM's (shrunk: a half-width student, a 20-step chain) rehearsed on 2 ranks
    with a latent teacher: FID on decoded images against a folder of real ones."""
    real = _image_tree(str(tmp_path / "celeba"), None, 8, (40, 36))
    dsd = str(tmp_path / "dsd")
    _run(cache, "self_distill.py", ["--teacher", ldm_teacher, "--data", f"folder:{real}", "--skip", "ldm_exact",
                                    "--eval-steps", "2,4,8", "--fid-samples", "30000", "--out", dsd, "--rehearse",
                                    "--steps", "8", "--batch", "4", "--device", "cpu"])
    _rehearsal(dsd, ["dsdi N = 8", "evaluation student 2 steps", "FID samples student_2", "FID/IS scoring"])
    assert all(r["fid"] is not None for r in _metrics(os.path.join(dsd, "rehearsal"))["results"])
    student = R.load_teacher(os.path.join(dsd, "rehearsal", "ckpt.pt"))
    assert student.autoencoder is not None and student.image_shape == (3, 32, 32)
    dk = str(tmp_path / "dkdm")
    _run(cache, "dkdm.py", ["--teacher", ldm_teacher, "--student", "ldm_128", "--dropout", "0", "--rho", "4",
                            "--batch", "48", "--lr", "9.6e-5", "--data", f"folder:{real}", "--eval-steps", "200",
                            "--fid-sampler", "ddim", "--fid-samples", "50000", "--out", dk, "--rehearse",
                            "--student", "ldm_tiny_half", "--chain-steps", "20", "--batch", "8",
                            "--prep-batch", "16", "--eval-steps", "5", "--device", "cpu"])
    _rehearsal(dk, ["shuffle denoise (the knowledge set)", "student training", "FID samples student_ddim"])
    rows = _metrics(os.path.join(dk, "rehearsal"))["results"]
    assert [r["sampler"] for r in rows if r["model"] == "student" and r["fid"] is not None] == ["ddim"]
