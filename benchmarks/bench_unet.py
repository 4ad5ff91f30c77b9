"""Speed of our U-Net against diffusers' UNet2DModel with the same weights, in one run (ratios are what
to compare: these machines are noisy). Forward images/s (inference) and seconds per training update
(forward + backward + Adam), fp32 vs bf16 autocast, optionally channels_last and torch.compile.

  python benchmarks/bench_unet.py                          # ddpm_cifar10 (35.7M), CPU-sized batches
  python benchmarks/bench_unet.py --device cuda --batch 128 --compile --channels-last
diffusers is only needed for the comparison column (pip install diffusers).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import runtime as R  # noqa: E402

DDPM_CIFAR10 = dict(act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
                    center_input_sample=False, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
                    mid_block_scale_factor=1, norm_eps=1e-06, norm_num_groups=32, out_channels=3, sample_size=32,
                    time_embedding_type="positional", up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])

def sample(out):
    """diffusers returns an output object, ours a tensor."""
    return getattr(out, "sample", out)

def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-train", action="store_true", help="forward only")
    args = p.parse_args()
    dev = args.device
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    nets = {}
    cfg = R.unet_config_from_diffusers(DDPM_CIFAR10)
    ours = C.UNet(cfg)
    try:
        from diffusers import UNet2DModel
        ref = UNet2DModel(**DDPM_CIFAR10)
        ours.load_state_dict(R.from_diffusers(ref.state_dict(), cfg))
        nets["diffusers UNet2DModel"] = ref
    except ImportError:
        print("diffusers not installed: timing our U-Net only")
    nets["ours"] = ours
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    rows = []
    for dtype in args.dtypes.split(","):
        for name, net in nets.items():
            variants = [(name, net)]
            if args.channels_last:
                variants.append((name + " +channels_last", net))
            if args.compile:
                variants.append((name + " +compile", net))
            for label, base in variants:
                net = base.to(dev)
                if dev.startswith("cuda"):  # each row its own peak
                    torch.cuda.reset_peak_memory_stats()
                mf = torch.channels_last if "channels_last" in label else torch.contiguous_format
                net = net.to(memory_format=mf)
                xi = x.to(memory_format=mf)
                call = torch.compile(net) if "compile" in label else net

                def fwd():
                    with torch.no_grad(), C.autocast(dev, dtype):
                        sample(call(xi, t))
                sec_fwd = timed(fwd, dev, args.warmup, args.iters)
                sec_step = float("nan")
                if not args.no_train:
                    opt = torch.optim.Adam(net.parameters(), lr=1e-5)

                    def step():
                        with C.autocast(dev, dtype):
                            loss = sample(call(xi, t)).float().pow(2).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    sec_step = timed(step, dev, args.warmup, args.iters)
                mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.startswith("cuda") else float("nan")
                rows.append((label, dtype, args.batch / sec_fwd, sec_step, mem))
                print(f"{label:40s} {dtype:5s} fwd {args.batch / sec_fwd:9.1f} img/s   train step {sec_step:8.4f} s   peak {mem:.2f} GiB",
                      flush=True)
    print(f"\n| network | dtype | forward img/s | train s/update (batch {args.batch}) |\n|---|---|---|---|")
    for label, dtype, ips, sps, _ in rows:
        print(f"| {label} | {dtype} | {ips:.1f} | {sps:.4f} |")

if __name__ == "__main__":
    main()
