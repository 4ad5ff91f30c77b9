"""Each method's update against the bare network passes it needs, in one process (issue 21).

For each method: one update of its own loss and step functions (the loss, backward, clipping, the optimiser,
the EMA, DKDM's write-back) timed against the same networks' bare passes at the same batch and dtype (e.g.
two teacher forwards + one student forward/backward + Adam for progressive distillation), alternating,
median of --runs runs. efficiency = bare / method: 1.0 means the method's code costs nothing beyond its
networks. Then DDIM sampling, common.ddim_sample against diffusers' UNet2DModel + DDIMScheduler on the same
weights and noise (efficiency = ours / diffusers images per second).
    python benchmarks/bench_methods.py                                   # CPU, tiny nets, a few minutes
    python benchmarks/bench_methods.py --device cuda --net ddpm_cifar10 --batch 128 --dtype bf16
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import dkdm as D  # noqa: E402
import luhman_kd as L  # noqa: E402
import progressive as P  # noqa: E402
import self_distill as S  # noqa: E402

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()

def race(method, bare, device, runs, iters):
    """Median seconds per call of method() and bare(), run alternately (one warm-up call each)."""
    times = {"method": [], "bare": []}
    method(), bare()
    for _ in range(runs):
        for name, fn in (("method", method), ("bare", bare)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return statistics.median(times["method"]), statistics.median(times["bare"])

def denoiser(net_name, image_size, param="eps", var="fixed_small", seed=0):
    torch.manual_seed(seed)
    out = 3 * (2 if var == "learned_range" else 1)
    net = C.build_net(net_name, image_size=image_size, out_channels=out, zero_init=False, dropout=0.0)
    return C.Denoiser(net, C.Schedule("linear"), param, var)

def bare_step(student, passes, z, t, opt):
    """The networks alone: `passes` no-grad forwards (teachers, targets) and one forward/backward + step."""
    with torch.no_grad():
        for net in passes:
            net(z, t)
    student.net(z, t).float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

def setups(args, device):
    """{method: (method_step, bare_step)} on nets of the --net preset at --image-size, batch --batch."""
    B, size, amp, fast = args.batch, args.image_size, C.autocast(device, args.dtype), \
        lambda den: C.compiled(den, args.compile)  # a view; the optimisers hold the raw parameters
    shape, gen = (B, 3, size, size), torch.Generator(device).manual_seed(0)
    z, t = torch.randn(shape, device=device), torch.full((B,), 500.0, device=device)
    x = torch.rand(shape, generator=gen, device=device) * 2 - 1
    out = {}

    teacher = denoiser(args.net, size, "x").to(device).eval()
    student = P.make_student(teacher, 8, clip=False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4, fused=device != "cpu")
    teacher_v, student_v = fast(teacher), fast(student)

    def progressive_step():
        with amp:
            loss = P.distill_loss(student_v, teacher_v, x, 8, "trunc_snr", gen)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["progressive"] = (progressive_step, lambda: bare_step(student_v, [teacher_v.net] * 2, z, t, opt))

    kd = L.make_student(denoiser(args.net, size).to(device).eval(), "official")
    kd_ema, kd_v = kd.copy().eval(), fast(kd)
    kd_opt = torch.optim.Adam(kd.parameters(), lr=1e-4, fused=device != "cpu")

    def luhman_step():
        with amp:
            loss = L.student_loss(L.student_x0(kd_v, z), x, "l2").sum() / B
        loss.backward()
        kd_opt.step()
        kd_opt.zero_grad(set_to_none=True)
        C.ema_update(kd_ema.net, kd.net, 0.995)
    out["luhman_kd"] = (luhman_step, lambda: bare_step(kd_v, [], z, t, kd_opt))

    model = denoiser(args.net, size).to(device).train()
    model_ema, model_v = model.copy().eval(), fast(model)
    model_opt = torch.optim.Adam(model.parameters(), lr=1e-6, fused=device != "cpu")
    times, alpha, sigma = S.grid(model.schedule, 8, "unit")

    def dsd_step():
        with amp:
            loss, _ = S.dsd_loss(model_v, z, float(times[0]), float(times[1]), alpha[:3], sigma[:3],
                                 clip=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        model_opt.step()
        model_opt.zero_grad(set_to_none=True)
        C.ema_update(model_ema.net, model.net, 0.995)
    out["self_distill"] = (dsd_step, lambda: bare_step(model_v, [model_v.net], z, t, model_opt))

    big = denoiser(args.net, size, var="learned_range").to(device).eval()
    small = D.make_student(D.parse_config(D.Config, ["--student", args.student, "--dropout", "0"]), big)
    small = small.to(device)
    small_ema, big_v, small_v = small.copy().eval(), fast(big), fast(small)
    small_opt = torch.optim.AdamW(small.parameters(), lr=1e-4, fused=device != "cpu")
    grid = torch.tensor(D.chain(D.parse_config(D.Config, ["--chain-steps", "50"]), big, ""), device=device)
    kset = D.new_set(10 * B, len(grid), shape[1:], "dynamic", gen)

    def dkdm_step():
        idx = D.draw(len(kset["k"]), B, "dynamic", gen)
        z_t, k = kset["z"][idx], kset["k"][idx]
        with amp:
            target = D.teacher_step(big_v, grid, z_t, k, torch.randn(z_t.shape, generator=gen, device=device))
            simple, vlb = D.dkdm_loss(small_v, grid, z_t, k, target)
            loss = (simple + vlb).mean()
        loss.backward()
        small_opt.step()
        small_opt.zero_grad(set_to_none=True)
        C.ema_update(small_ema.net, small.net, 0.9999)
        D.write_back(kset, idx, k, target["z_prev"], len(grid), gen)
    out["dkdm"] = (dkdm_step, lambda: bare_step(small_v, [big_v.net], z, t, small_opt))
    return out

def ddim_race(args, device):
    """Images per second of common.ddim_sample and of diffusers' loop, same weights, same noise, --steps."""
    from diffusers import DDIMScheduler, UNet2DModel
    torch.manual_seed(0)
    theirs = UNet2DModel(sample_size=args.image_size, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"), attention_head_dim=None,
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1,
                         downsample_padding=0, norm_eps=1e-6).to(device).eval()
    cfg = C.unet_config_from_diffusers(dict(theirs.config))
    net = C.UNet(cfg).to(device)
    net.load_state_dict(C.from_diffusers(theirs.state_dict(), cfg))
    ours = C.Denoiser(net, C.Schedule("linear"), "eps").eval()
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(args.steps)
    times = C.sampler_times(ours.schedule, args.steps, "uniform")
    z = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    amp = C.autocast(device, args.dtype)

    @torch.no_grad()
    def diffusers_loop():
        x = z
        with amp:
            for t in sched.timesteps:
                x = sched.step(theirs(x, t).sample, t, x).prev_sample
        return x

    def ours_loop():
        with amp:
            return C.ddim_sample(ours, z, times)
    return race(ours_loop, diffusers_loop, device, args.runs, 1)

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--net", default="tiny", help="teacher/student preset (common.PRESETS)")
    p.add_argument("--student", default="cnn_tiny", help="DKDM's student (dkdm.STUDENTS or a preset)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--runs", type=int, default=5, help="alternating runs; the median is reported")
    p.add_argument("--iters", type=int, default=5, help="updates per run")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling row")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks of both sides")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args()
    device = C.setup_device(args.device)
    rows = []
    for method, (step, bare) in setups(args, device).items():
        sec, bare_sec = race(step, bare, device, args.runs, args.iters)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
        rows.append(dict(method=method, net=args.net, batch=args.batch, dtype=args.dtype,
                         compile=args.compile,
                         sec_per_update=sec, images_per_s=args.batch / sec, bare_sec_per_update=bare_sec,
                         efficiency=bare_sec / sec, peak_gib=peak, device=device))
    ours, theirs = ddim_race(args, device)
    rows.append(dict(method="ddim", net="diffusers-style U-Net", batch=args.batch, dtype=args.dtype,
                     compile=False, sec_per_update=None, images_per_s=args.batch / ours,
                     bare_sec_per_update=None, efficiency=theirs / ours, peak_gib=None, device=device,
                     diffusers_images_per_s=args.batch / theirs, steps=args.steps))
    print(f"{'method':13s} {'net':22s} {'batch':>5s} {'dtype':5s} {'s/update':>9s} {'images/s':>9s} "
          f"{'bare s':>9s} {'efficiency':>10s}")
    for r in rows:
        sec = "" if r["sec_per_update"] is None else f"{r['sec_per_update']:.4f}"
        bare = "" if r["bare_sec_per_update"] is None else f"{r['bare_sec_per_update']:.4f}"
        print(f"{r['method']:13s} {r['net']:22s} {r['batch']:5d} {r['dtype']:5s} {sec:>9s} "
              f"{r['images_per_s']:9.1f} {bare:>9s} {r['efficiency']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)

if __name__ == "__main__":
    main()
