"""The README's "Use a method in your own code": its python blocks run as they are, the first (a diffusers
UNet2DModel wrapped as a Denoiser) then each method's loop, with a tiny UNet2DModel on CPU for a few updates on
one fixed batch, each update the same draws: the loss falls and every parameter of the trained foreign network
gets a gradient."""
import itertools
import os
import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Use a method in your own code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)

def test_the_readme_has_a_setup_and_one_example_per_method():
    blocks = _blocks()
    assert len(blocks) == 5 and "Denoiser(Net(unet)" in blocks[0]
    for block, loss in zip(blocks[1:], ("distill_loss", "student_loss", "dsd_loss", "dkdm_loss")):
        assert f"{loss}(" in block and "opt.step()" in block

@pytest.mark.parametrize("method", range(4), ids=["progressive", "luhman_kd", "self_distill", "dkdm"])
def test_a_readme_example_trains_a_foreign_network(method):
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    setup, example = _blocks()[0], _blocks()[1 + method]
    scope = {"unet": unet, "batches": itertools.repeat(x)}   # the user's network and data: one fixed batch
    torch.manual_seed(0)
    exec(setup, scope)
    scope.update(updates=24, lr=1e-3)                         # a few updates; the example's lr, 10x
    losses = []

    def same_draws(opt, args, kwargs):  # as the optimiser steps: the update's loss, then the next update
        losses.append(scope["loss"].item())  # draws what this one drew (torch's and the loop's generator
        torch.manual_seed(0)                 # reseeded), so that the losses compare: no noise of t or eps
        if "gen" in scope:
            scope["gen"].manual_seed(0)
    hook = register_optimizer_step_pre_hook(same_draws)
    try:
        exec(example, scope)
    finally:
        hook.remove()
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f"loss over the first / last 8 updates: {first:.4g} / {last:.4g}")
    assert last < first                                       # it learns
    trained = scope["student"].net.unet
    assert trained is not unet or method < 3                  # DKDM: a fresh network of the teacher's config
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
