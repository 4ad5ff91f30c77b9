"""tools/sample.py: a student's PNG folder and .npz hold its method's own evaluation samples of those seeds
(another batch size), a resumed folder skips the seeds written, a teacher samples with --steps and --sampler
(a class-conditional one with its labels in arr_1), bad input is one line before any work, and the command
line of the issue's done-when."""
import glob
import os
import sys

import numpy as np
import pytest
import torch

import common as C
import runtime as R
import progressive
from test_distributed import _teacher_file
from test_inputs import _tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import sample  # noqa: E402

def _pngs(folder):
    files = sorted(glob.glob(f"{folder}/*.png"))
    return sample.read_folder(folder, [int(os.path.basename(p)[:-4]) for p in files])

def test_a_students_folder_and_npz_are_its_methods_own_samples_and_resume(tmp_path, monkeypatch):
    teacher, out = _teacher_file(tmp_path / "t.pt"), tmp_path / "run"
    monkeypatch.setattr(R, "prepare_fid", lambda *args: None)  # offline: the folder is what is compared
    monkeypatch.setattr(R, "fid_is", lambda *args, **kwargs: {"fid": 1.0, "is": 1.0})
    progressive.main(["--quick", "--device", "cpu", "--out", str(out), *_tiny("progressive", teacher),
                      "--fid-samples", "6"])
    own = _pngs(glob.glob(str(out / "samples" / "student_1steps_*_ddim"))[0])  # seeds 0-5, batch 4
    assert own.shape == (6, 3, 16, 16)
    student, folder, npz = str(out / "student_1steps.pt"), str(tmp_path / "s"), str(tmp_path / "s.npz")
    sample.main(["--model", student, "--seeds", "0-5", "--outdir", folder, "--npz", npz, "--batch", "5",
                 "--device", "cpu"])
    assert torch.equal(_pngs(folder), own)
    with np.load(npz) as f:
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_0"], own.permute(0, 2, 3, 1).numpy())  # NHWC, seed order

    # resumable: a written seed is skipped (its file left as it is), a missing one made again
    os.remove(os.path.join(folder, "000002.png"))
    R.save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), os.path.join(folder, "000003.png"))
    sample.main(["--model", student, "--seeds", "0-3,8", "--outdir", folder, "--npz", npz, "--batch", "2",
                 "--device", "cpu"])
    again = sample.read_folder(folder, [2, 3])
    assert torch.equal(again[0], own[2]) and not again[1].any() and os.path.exists(f"{folder}/000008.png")
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 16, 16, 3)  # 0-3 and 8

    # the done-when command line, `python tools/sample.py --model STUDENT --seeds 0-63 --grid g.png`
    sample.main(["--model", student, "--seeds", "0-63", "--grid", str(tmp_path / "g.png"), "--device", "cpu"])
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (8 * 17 + 1, 8 * 17 + 1)  # 8 x 8 samples, 1-pixel gaps

def test_a_teacher_samples_with_its_steps_and_sampler_and_labels(tmp_path):
    teacher = _teacher_file(tmp_path / "t.pt", num_classes=3)
    den = R.load_teacher(teacher)
    seeds = [0, 5, 10, 11]
    for name, solver in sample.SOLVERS.items():
        npz = str(tmp_path / f"{name}.npz")
        sample.main(["--model", teacher, "--steps", "3", "--sampler", name, "--seeds", "0,5,10-11", "--npz",
                     npz, "--batch", "3", "--device", "cpu"])
        times, z = C.sampler_times(den.schedule, 3), C.seeded_noise(seeds, (3, 16, 16))
        y = C.seeded_labels(seeds, 3)
        args = (den, z, times, seeds, None, True, y) if name == "ancestral" else (den, z, times, True, y)
        with np.load(npz) as f:  # one batch here, batches of 3 there; eps model: clipped, as the methods
            assert np.array_equal(f["arr_0"], C.to_uint8(den.image(solver(*args))).permute(0, 2, 3, 1).numpy())
            assert np.array_equal(f["arr_1"], y.numpy())
    sample.main(["--model", teacher, "--steps", "2", "--classes", "2", "--seeds", "0-1", "--npz", npz,
                 "--device", "cpu"])
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == [2, 2]

@pytest.mark.parametrize("flags, message", [
    (["--seeds", "5-2", "--grid", "g.png"], "--seeds '5-2': expected seeds >= 0 as 0-49999 or 0,5,10-19"),
    (["--seeds", "0-3"], "nothing to write: pass --outdir, --npz and/or --grid"),
    (["--grid", "g.png", "--fid", "true"], "--fid true scores a folder of PNGs: pass --outdir"),
    (["--grid", "g.png"], "records no sampler (a teacher): pass --steps N and --sampler"),
    (["--grid", "g.png", "--steps", "2", "--classes", "1"], "--classes: "),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(R, "generate", None)  # any sampling would fail otherwise
    monkeypatch.setattr(R, "sample_to_folder", None)
    with pytest.raises(ValueError, match=None) as e:
        sample.main(["--model", _teacher_file(tmp_path / "t.pt"), "--device", "cpu", *flags])
    assert message in str(e.value) and "\n" not in str(e.value)

def test_fid_refuses_a_folder_holding_other_seeds(tmp_path, monkeypatch):
    """FID scores the whole --outdir: a folder with images of other seeds (an earlier call's) would be scored
    with them, so it is refused in one line before any work; the seeds it holds pass."""
    monkeypatch.setattr(R, "sample_to_folder", None)  # any sampling would fail otherwise
    folder = tmp_path / "s"
    os.makedirs(folder)
    for s in (0, 1, 7):
        R.save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(folder / f"{s:06d}.png"))
    argv = ["--model", _teacher_file(tmp_path / "t.pt"), "--steps", "2", "--outdir", str(folder), "--fid",
            "true", "--device", "cpu"]
    with pytest.raises(ValueError) as e:
        sample.main([*argv, "--seeds", "0-1"])
    assert "holds 1 besides --seeds 0-1 (e.g. 000007.png)" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(R, "prepare_fid", lambda *args: None)
    monkeypatch.setattr(R, "reference_pngs", lambda *args, **kwargs: None)
    monkeypatch.setattr(R, "fid_is", lambda folder, *args: {"fid": 2.0, "is": 3.0, "folder": folder})
    monkeypatch.setattr(R, "sample_to_folder", lambda *args, **kwargs: None)  # every seed is written
    assert sample.main([*argv, "--seeds", "0,1,7"])["folder"] == str(folder)
