"""Speed switches change no result (issue 21): each method's --compile run logs the losses of its eager run
(one update each at log-every 1, on a tiny net), and the foreach EMA is the per-tensor lerp."""
import json
import os

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
