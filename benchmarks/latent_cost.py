"""What the README's latent commands (DSD table 2, DKDM table 3) cost on one GPU, estimated: each phase's
network evaluations times the FLOPs of one evaluation (torch.utils.flop_counter on the meta device, so nothing
is allocated or run), divided by an assumed sustained rate (--mfu x --peak-tflops). An estimate, not a
measurement: the rate is assumed; backward = 2 forwards; guided passes count twice (cond | null in one batch).

  python benchmarks/latent_cost.py                            # H100 SXM bf16 dense peak, 40 % of it sustained
  python benchmarks/latent_cost.py --peak-tflops 312 --mfu 0.5  # an A100
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import dkdm  # noqa: E402

def forward_flops(make, *inputs):
    """FLOPs of make()(*inputs()), one sample, built and run on the meta device."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        make()(*inputs)
    return counter.get_total_flops()

def unet_flops(cfg):
    """One forward of a latent U-Net on one 3x64x64 latent (a label for a conditional one)."""
    with torch.device("meta"):
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
        return forward_flops(lambda: C.build_net(cfg), torch.zeros(1, 3, 64, 64), torch.zeros(1), y)

def dsd_phases(unet, decode, guided, updates, batch=16, start_steps=64, eval_steps=(2, 4, 8), fid=30_000,
               rmse=256):
    """Fine-tuning DSDI (alg. 2): per trajectory and update the model's forward and backward at z_t and one
    forward at t' (the two-step target); evaluation: the original model's 64-step reference and both models
    at each step count, on the FID samples and the RMSE seeds, each image decoded."""
    g = 2 if guided else 1
    runs = 1 + 2 * len(eval_steps)
    per_sample = start_steps + 2 * sum(eval_steps)
    return [("fine-tuning", updates * batch * 4 * g * unet),
            ("evaluation: U-Net", (fid + rmse) * per_sample * g * unet),
            ("evaluation: decoding", (fid + rmse) * runs * decode)]

def dkdm_phases(teacher, student, decode, batch, rho=4.0, T=1000, updates=200_000, fid=50_000, steps=200):
    """Alg. 1: the shuffle denoise of the rho T b set (each entry from T down to a uniform stop: (T - 1) / 2
    teacher steps on average), then per update one teacher step and the student's forward and backward per
    entry; evaluation: 200-step DDIM of the student, decoded."""
    entries = round(rho * T * batch)
    return [("shuffle denoise", entries * (T - 1) / 2 * teacher),
            ("training", updates * batch * (teacher + 3 * student)),
            ("evaluation", fid * (steps * student + decode))]

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100 SXM: 989.4)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of the peak sustained")
    args = p.parse_args(argv)
    rate = args.peak_tflops * 1e12 * args.mfu
    with torch.device("meta"):
        decode = forward_flops(lambda: C.VQModel(C.AUTOENCODERS["vq_f4"]).decode, torch.zeros(1, 3, 64, 64))
    uncond, cond = unet_flops(C.PRESETS["ldm_vq4_unet"]), unet_flops(C.PRESETS["ldm_cin256_v2"])
    student = unet_flops(dkdm.STUDENTS["ldm_128"])
    print(f"GFLOP per forward: LDM-VQ-4 U-Net {uncond / 1e9:.1f}, cin256-v2 {cond / 1e9:.1f}, DKDM's ldm_128 "
          f"student {student / 1e9:.1f}, VQ-f4 decoder (256x256) {decode / 1e9:.1f}")
    print(f"hours at {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s\n")
    print("| run | phase | PFLOP | hours |\n|---|---|---|---|")
    runs = {"DSD CelebA-HQ / LSUN Bedroom": dsd_phases(uncond, decode, False, 4000),
            "DSD ImageNet 256 (guided)": dsd_phases(cond, decode, True, 5000),
            "DKDM CelebA-HQ (b 48)": dkdm_phases(uncond, student, decode, 48),
            "DKDM FFHQ (b 42)": dkdm_phases(uncond, student, decode, 42)}
    for name, phases in runs.items():
        for phase, flops in phases:
            print(f"| {name} | {phase} | {flops / 1e15:,.0f} | {flops / rate / 3600:.2f} |")
        total = sum(f for _, f in phases)
        print(f"| {name} | **all** | {total / 1e15:,.0f} | {total / rate / 3600:.1f} |")

if __name__ == "__main__":
    main()
