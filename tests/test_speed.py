"""Speed switches change no result (issue 21): each method's --compile run logs the losses of its eager run
(one update each at log-every 1, on a tiny net), and the foreach EMA is the per-tensor lerp. The methods
benchmark compares like with like: its bare passes are the update's FLOPs, its two DDIM loops the same
samples (its timings are never asserted)."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common as C
from test_inputs import METHODS, _teacher_file, _tiny

def _losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]

@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "dkdm" else pytest.mark.slow)
                                    for m in METHODS])
def test_compiled_updates_take_the_eager_loss(tmp_path, method):
    """Compiling costs 40-100 s a method on 2 CPU cores: DKDM's runs in the default suite, the rest with
    -m slow."""
    teacher = _teacher_file(tmp_path / "t.pt", var="learned_range")
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        out = str(tmp_path / name)
        METHODS[method].main(["--quick", "--device", "cpu", "--out", out, *_tiny(method, teacher),
                              "--compile", flag])
        runs[name] = _losses(out)
    assert len(runs["eager"]) >= 2 and runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)

def test_foreach_ema_is_the_per_tensor_update():
    torch.manual_seed(0)
    net, ema = C.build_net("tiny16", zero_init=False), C.build_net("tiny16", zero_init=False)
    expected = [e.detach().lerp(p.detach(), 0.01) for e, p in zip(ema.parameters(), net.parameters())]
    C.ema_update(ema, net, 0.99)
    assert all(torch.equal(e, x) for e, x in zip(ema.parameters(), expected))

def test_the_benchmark_races_each_update_against_its_own_network_passes(tmp_path):
    out, root = tmp_path / "bench.json", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_methods.py"), "--pairs", "1",
                    "--steps", "2", "--json", str(out)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"progressive", "luhman_kd", "self_distill", "dkdm", "ddim"}
    for method, r in rows.items():
        assert r["device"] == "cpu" and math.isfinite(r["efficiency"]) and r["efficiency"] > 0
        if method != "ddim":
            assert r["tflop_per_update"] > 0 and r["tflop_per_update"] == r["bare_tflop_per_update"]
    assert rows["ddim"]["max_abs_diff"] < 1e-4

def test_the_benchmark_races_like_against_like_in_bf16():
    """--device cpu --dtype bf16: each method's update and its bare passes run every convolution in bf16 (the
    bare side under the method's autocast, issue 28)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_methods as B
    spec = dict(net="tiny", student="cnn_tiny", batch=2, image_size=16, schedule="linear", dropout=0.0)
    seen = []
    record = lambda module, inputs, out: seen.append(out.dtype) if isinstance(module, torch.nn.Conv2d) else None
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for method in B.PAPER:
            for side in B.setup(method, spec, argparse.Namespace(dtype="bf16"), "cpu", lambda den: den):
                seen.clear()
                side()
                assert seen and set(seen) == {torch.bfloat16}, (method, set(seen))
    finally:
        handle.remove()

def test_latent_cost_prints_the_readme_table(capsys):
    """`python benchmarks/latent_cost.py` (the README's latent cost table): FLOPs counted on the meta device
    give the table's per-forward figures and rows, so the README's numbers are the script's."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import latent_cost
    latent_cost.main([])
    out = capsys.readouterr().out
    readme = open(os.path.join(os.path.dirname(latent_cost.__file__), os.pardir, "README.md")).read()
    for figure in ("LDM-VQ-4 U-Net 202.4", "cin256-v2 208.5", "student 68.7", "(256x256) 670.8"):
        assert figure in out, figure
    for row, total in (("DSD CelebA-HQ / LSUN Bedroom", "757 | 0.5"), ("DSD ImageNet 256 (guided)", "1,436 | 1.0"),
                       ("DKDM CelebA-HQ (b 48)", "24,051 | 16.9"), ("DKDM FFHQ (b 42)", "21,135 | 14.8")):
        assert f"| {row} | **all** | {total} |" in out, row
    assert "| 757 PFLOP | 0.5 |" in readme and "| 24 EFLOP | 17 |" in readme and "| 21 EFLOP | 15 |" in readme
