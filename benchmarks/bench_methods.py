"""Each method's update against the bare network passes it needs, in one process (issue 21).

For each method: one update of its own loss and step functions (the loss, backward, clipping, the optimiser,
the EMA, DKDM's write-back) timed against the same networks' bare passes at the same batch and dtype (e.g.
two teacher forwards + one student forward/backward + Adam for progressive distillation). The two alternate
update by update (ABBA order, --pairs pairs after a warm-up); efficiency = the median over pairs of bare /
method: 1.0 means the method's code costs nothing beyond its networks. Pairing cancels the drift of a shared
machine, which scatters the ratio of two separate medians by +-7 % here. The last row is DDIM sampling,
common.ddim_sample against diffusers' UNet2DModel + DDIMScheduler on the same weights and noise (efficiency =
ours / diffusers images per second). FLOPs of an update are counted once (torch.utils.flop_counter, eager);
TFLOP/s follows, and MFU against the GPU's dense peak for the dtype (bf16, or TF32 for fp32 rows: CUDA runs
fp32 matmuls and convolutions in TF32 here), known by exact model name (PEAK_TFLOPS), else --peak-tflops.
    python benchmarks/bench_methods.py                                   # CPU, tiny nets, about a minute
    python benchmarks/bench_methods.py --device cuda --paper --dtype bf16 [--compile]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import runtime as R  # noqa: E402
import dkdm as D  # noqa: E402
import luhman_kd as L  # noqa: E402
import progressive as P  # noqa: E402
import self_distill as S  # noqa: E402
from bench_unet import DDPM_CIFAR10  # noqa: E402

# --paper: each method's CIFAR-10 networks, batch and settings (its file's defaults): progressive's pd_cifar10 on
# the cosine log-SNR schedule (app. E), the Denoising Student's DDPM U-Net at batch 512 (app. B, table 3), DSD's
# 16 trajectories on the DDPM U-Net, DKDM's 57M ADM teacher and 14M CNN student with its dropout 0.3 (sec. 5.1).
# Without --paper: the linear schedule and no dropout, on the tiny nets.
PAPER = {"progressive": dict(net="pd_cifar10", batch=128, schedule="cosine_logsnr"),
         "luhman_kd": dict(net="ddpm_cifar10", batch=512), "self_distill": dict(net="ddpm_cifar10", batch=16),
         "dkdm": dict(net="adm_cifar10_57m", student="cnn_14m", batch=128, dropout=D.Config.dropout)}
# Dense peaks (bf16, TF32) in TFLOP/s from NVIDIA's datasheets (their sparse figures halved), by the exact name
# torch.cuda.get_device_name reports: an SXM H100 names itself by its memory, the PCIe and NVL parts by form.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": (989.4, 494.7), "NVIDIA H100 PCIe": (756.5, 378.0),
               "NVIDIA H100 NVL": (835.5, 417.5), "NVIDIA H200": (989.4, 494.7), "NVIDIA H200 NVL": (835.5, 417.5),
               "NVIDIA A100-SXM4-80GB": (312.0, 156.0), "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
               "NVIDIA A100 80GB PCIe": (312.0, 156.0), "NVIDIA A100-PCIE-40GB": (312.0, 156.0)}

def peak_tflops(device_name, dtype):
    """The dense peak of this GPU for the dtype's math (bf16, else TF32), or None for a model not listed."""
    peaks = PEAK_TFLOPS.get(device_name)
    return peaks and peaks[0 if dtype == "bf16" else 1]

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()

def race(method, bare, device, pairs):
    """Median seconds of method() and of bare(), and the median of their paired ratio bare / method: one call
    of each per pair, in ABBA order, after one warm-up call each."""
    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    method(), bare()
    t_method, t_bare = [], []
    for i in range(pairs):
        order = ((t_method, method), (t_bare, bare))
        for times, fn in (order if i % 2 == 0 else order[::-1]):
            times.append(timed(fn))
    ratio = statistics.median(b / m for b, m in zip(t_bare, t_method))
    return statistics.median(t_method), statistics.median(t_bare), ratio

def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

def denoiser(net_name, image_size, param="eps", var="fixed_small", seed=0, schedule="linear"):
    torch.manual_seed(seed)
    out = 3 * (2 if var == "learned_range" else 1)
    net = C.build_net(net_name, image_size=image_size, out_channels=out, zero_init=False, dropout=0.0)
    return C.Denoiser(net, C.Schedule(schedule), param, var)

def bare_step(student, passes, z, t, opt, amp):
    """The networks alone, under the method's autocast `amp` (the same dtype on both sides): `passes` no-grad
    forwards (teachers, targets) and one forward/backward + step."""
    with torch.no_grad(), amp:
        for net in passes:
            net(z, t)
    with amp:
        loss = student.net(z, t).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

def setup(method, spec, args, device, fast):
    """(method_step, bare_step) of one method on spec's nets at its batch; fast: R.compiled or identity (a
    view: the optimisers hold the raw parameters)."""
    B, size, amp = spec["batch"], spec["image_size"], C.autocast(device, args.dtype)
    shape, gen = (B, 3, size, size), torch.Generator(device).manual_seed(0)
    z, t = torch.randn(shape, device=device), torch.full((B,), 500.0, device=device)
    x = torch.rand(shape, generator=gen, device=device) * 2 - 1
    adam = dict(lr=1e-4, fused=device != "cpu")

    if method == "progressive":
        teacher = denoiser(spec["net"], size, "x", schedule=spec["schedule"]).to(device).freeze()
        student = P.make_student(teacher, 8, clip=False)
        opt = torch.optim.Adam(student.parameters(), **adam)
        teacher_v, student_v = fast(teacher), fast(student)

        def step():
            with amp:
                loss = P.distill_loss(student_v, teacher_v, x, None, 8, "trunc_snr", gen)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, lambda: bare_step(student_v, [teacher_v.net] * 2, z, t, opt, amp)

    if method == "luhman_kd":
        kd = L.make_student(denoiser(spec["net"], size).to(device).freeze(), "official")
        kd_ema, kd_v = kd.copy().freeze(), fast(kd)
        opt = torch.optim.Adam(kd.parameters(), **adam)

        def step():
            with amp:
                loss = L.student_loss(L.student_x0(kd_v, z), x, "l2").sum() / B
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            C.ema_update(kd_ema.net, kd.net, 0.995)
        return step, lambda: bare_step(kd_v, [], z, t, opt, amp)

    if method == "self_distill":
        model = denoiser(spec["net"], size).to(device).train()
        model_ema, model_v = model.copy().freeze(), fast(model)
        opt = torch.optim.Adam(model.parameters(), **adam)
        times, alpha, sigma = S.ddim_grid(model.schedule, 8, "unit", device=device)

        def step():
            with amp:
                loss, _ = S.dsd_loss(model_v, z, times[0], times[1], alpha[:3], sigma[:3], clip=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            C.ema_update(model_ema.net, model.net, 0.995)
        return step, lambda: bare_step(model_v, [model_v.net], z, t, opt, amp)

    big = denoiser(spec["net"], size, var="learned_range").to(device).freeze()
    small = D.make_student(R.parse_config(D.Config, ["--student", spec["student"],
                                                     "--dropout", str(spec["dropout"])]), big)
    small = small.to(device)
    small_ema, big_v, small_v = small.copy().freeze(), fast(big), fast(small)
    opt = torch.optim.AdamW(small.parameters(), **adam)
    grid = torch.tensor(D.chain(R.parse_config(D.Config, ["--chain-steps", "50"]), big.schedule, ""), device=device)
    kset = D.new_set(10 * B, len(grid), shape[1:], "dynamic", gen)

    def step():
        idx = D.draw(len(kset["k"]), B, "dynamic", gen)
        z_t, k = kset["z"][idx], kset["k"][idx]
        with amp:
            target = D.teacher_step(big_v, grid, z_t, k, torch.randn(z_t.shape, generator=gen, device=device))
            simple, vlb = D.dkdm_loss(small_v, grid, z_t, k, target)
            loss = (simple + vlb).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        C.ema_update(small_ema.net, small.net, 0.9999)
        D.write_back(kset, idx, k, target["z_prev"], len(grid), gen)
    return step, lambda: bare_step(small_v, [big_v.net], z, t, opt, amp)

def ddim_race(args, device):
    """(batch, the largest gap between the two loops' samples, our loop's FLOPs, race(ours, diffusers)) of DDIM
    sampling in --steps, same weights, same noise; --paper: google/ddpm-cifar10-32's architecture at 32 px and
    the Denoising Student's pair-generation batch 1024, else a small U-Net of the same kind."""
    from diffusers import DDIMScheduler, UNet2DModel
    torch.manual_seed(0)
    arch = DDPM_CIFAR10 if args.paper else dict(
        sample_size=args.image_size, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=None,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
    size, batch = (32, 1024) if args.paper else (args.image_size, args.batch)  # paper: luhman_kd's --gen-batch
    theirs = UNet2DModel(**arch).to(device).eval()
    cfg = R.unet_config_from_diffusers(dict(theirs.config))
    net = C.UNet(cfg).to(device)
    net.load_state_dict(R.from_diffusers(theirs.state_dict(), cfg))
    eager = C.Denoiser(net, C.Schedule("linear"), "eps").freeze()
    ours = R.compiled(eager, args.compile)
    theirs_fn = torch.compile(theirs) if args.compile else theirs
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(args.steps)
    times = C.sampler_times(ours.schedule, args.steps, "uniform")
    z = torch.randn(batch, 3, size, size, device=device)
    amp = C.autocast(device, args.dtype)

    @torch.no_grad()
    def diffusers_loop():
        x = z
        with amp:
            for t in sched.timesteps:
                x = sched.step(theirs_fn(x, t).sample, t, x).prev_sample
        return x

    def ours_loop():
        with amp:
            return C.ddim_sample(ours, z, times)
    gap = (ours_loop().float() - diffusers_loop().float()).abs().max().item()  # the same samples, or no race
    with amp:
        count = flops(lambda: C.ddim_sample(eager, z, times))
    return batch, gap, count, race(ours_loop, diffusers_loop, device, max(3, args.pairs // 2))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--net", default="tiny", help="teacher/student preset (common.PRESETS)")
    p.add_argument("--student", default="cnn_tiny", help="DKDM's student (dkdm.STUDENTS or a preset)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--paper", action="store_true", help="each method's CIFAR-10 nets and batch (PAPER), 32 px")
    p.add_argument("--methods", default="progressive,luhman_kd,self_distill,dkdm,ddim")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--pairs", type=int, default=30, help="alternating method/bare pairs (DDIM: half)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling row")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks of both sides")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense peak for --dtype (bf16, or TF32 for fp32) for MFU; 0 = by exact "
                        "GPU name (PEAK_TFLOPS), else no MFU")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = R.setup_device(args.device)
    name = R.device_info(device)["device_name"]
    peak = args.peak_tflops or (peak_tflops(name, args.dtype) if device.startswith("cuda") else None)
    if device.startswith("cuda") and not peak:
        print(f"no MFU: {name} is not in PEAK_TFLOPS; pass --peak-tflops (its dense {args.dtype} peak)")
    methods = args.methods.split(",")
    rows = []
    for method in (m for m in PAPER if m in methods):
        spec = {"net": args.net, "student": args.student, "batch": args.batch, "image_size": args.image_size,
                "schedule": "linear", "dropout": 0.0}
        if args.paper:
            spec.update({**PAPER[method], "image_size": 32})
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step, bare = setup(method, spec, args, device, lambda den: R.compiled(den, args.compile))
        sec, bare_sec, efficiency = race(step, bare, device, args.pairs)
        peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
        eager = setup(method, spec, args, device, lambda den: den) if args.compile else (step, bare)
        count, bare_count = flops(eager[0]), flops(eager[1])  # equal: the bare passes are the update's
        rows.append(dict(method=method, net=spec["net"] + ("/" + spec["student"] if method == "dkdm" else ""),
                         batch=spec["batch"], dtype=args.dtype, compile=args.compile, sec_per_update=sec,
                         images_per_s=spec["batch"] / sec, bare_sec_per_update=bare_sec, efficiency=efficiency,
                         tflop_per_update=count / 1e12, bare_tflop_per_update=bare_count / 1e12,
                         tflops=count / sec / 1e12,
                         mfu=count / sec / 1e12 / peak if peak else None, peak_tflops=peak,
                         peak_gib=peak_gib, device_name=name,
                         device=device, threads=torch.get_num_threads()))
        del step, bare, eager
    if "ddim" in methods:
        batch, gap, count, (ours, theirs, efficiency) = ddim_race(args, device)
        rows.append(dict(method="ddim", net="ddpm_cifar10" if args.paper else "diffusers-style U-Net",
                         batch=batch, dtype=args.dtype, compile=args.compile, sec_per_update=None,
                         images_per_s=batch / ours, bare_sec_per_update=None, efficiency=efficiency,
                         diffusers_images_per_s=batch / theirs, max_abs_diff=gap, steps=args.steps, device=device,
                         tflops=count / ours / 1e12, mfu=count / ours / 1e12 / peak if peak else None,
                         peak_tflops=peak, device_name=name,
                         threads=torch.get_num_threads()))
    print(f"{'method':13s} {'net':24s} {'batch':>5s} {'dtype':5s} {'s/update':>9s} {'images/s':>9s} "
          f"{'bare s':>9s} {'efficiency':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s}")
    for r in rows:
        num = lambda key, f: "" if r.get(key) is None else format(r[key], f)  # noqa: E731
        print(f"{r['method']:13s} {r['net']:24s} {r['batch']:5d} {r['dtype']:5s} {num('sec_per_update', '.4f'):>9s} "
              f"{r['images_per_s']:9.1f} {num('bare_sec_per_update', '.4f'):>9s} {r['efficiency']:10.3f} "
              f"{num('tflops', '.3f'):>8s} {num('mfu', '.1%'):>6s} {num('peak_gib', '.2f'):>8s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)

if __name__ == "__main__":
    main()
