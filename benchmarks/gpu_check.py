"""One command for a lent GPU (issue 28): does every method run on CUDA, and how fast. On one CUDA GPU, within
--budget seconds (8 minutes), with no internet, from a fresh clone after `pip install -r requirements.txt`:
  1. each method's --quick on CUDA, eager (the first trains the shapes teachers into a fresh cache);
  2. torchrun --nproc_per_node=1 of self_distill.py --quick (NCCL, DistributedDataParallel);
  3. bench_methods.py --device cuda --paper --dtype bf16: efficiency, TFLOP/s, MFU, peak memory per method;
  4. the Denoising Student's pair rate: its CIFAR-10 teacher's DDIM (the DDPM U-Net, table 3's 100 steps on
     the quad grid) at its pair-generation batch 1024, fp32 (TF32) and bf16;
  5. each method's --quick with --compile true --dtype bf16, then step 3 with --compile.
Each step is a child process with its own timeout, cut to the time left; a step that times out (its process
group killed) or fails is recorded as such and the rest still run; a step with no time left is recorded as
skipped. Every step sees a proxy that refuses connections, so one that tries to download fails instead. ONE
JSON (--json, rewritten after each step) holds every figure with the versions (torch, CUDA, cuDNN, GPU).
    python benchmarks/gpu_check.py                                 # one CUDA GPU, <= 8 minutes
    python benchmarks/gpu_check.py --device cpu --dry true         # the same steps at tiny counts, on the CPU
--dry cuts every count: the method runs are rehearsals of --quick (--rehearse: each phase once, into
OUT/rehearsal), the benchmark on its tiny nets for two pairs, DDIM at batch 8 for 2 steps; its figures only
prove the plumbing (compiling on a CPU takes minutes: those steps time out there).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import runtime as R  # noqa: E402
from bench_methods import sync  # noqa: E402
from bench_unet import DDPM_CIFAR10  # noqa: E402

METHODS = ("progressive", "luhman_kd", "self_distill", "dkdm")
OFFLINE = {"HF_HUB_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}

def plan(args, work):
    """The steps in the order they run, most important first: (name, argv, timeout s, result file or None)."""
    py, dev, quick = sys.executable, args.device, ["--quick", "--resume", "none"] + ["--rehearse"] * args.dry
    bench = [py, os.path.join(ROOT, "benchmarks", "bench_methods.py"), "--device", dev, "--dtype", "bf16",
             "--methods", ",".join(METHODS), *(["--pairs", "2"] if args.dry else ["--paper", "--pairs", "10"])]
    steps = [(f"{m} --quick eager", [py, os.path.join(ROOT, f"{m}.py"), *quick, "--device", dev,
                                     "--out", os.path.join(work, f"{m}_eager")], 150, None) for m in METHODS]
    bench_name = "bench_methods bf16" if args.dry else "bench_methods --paper bf16"
    steps += [("torchrun --nproc_per_node=1 self_distill --quick",
               [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                os.path.join(ROOT, "self_distill.py"), *quick, "--device", dev,
                "--out", os.path.join(work, "self_distill_torchrun")], 90, None),
              (f"{bench_name} eager", [*bench, "--json", os.path.join(work, "bench_eager.json")],
               150, os.path.join(work, "bench_eager.json")),
              ("ddim pair rate", [py, os.path.abspath(__file__), "--ddim-rate", os.path.join(work, "ddim.json"),
                                  "--device", dev, "--dry", str(args.dry).lower()], 90,
               os.path.join(work, "ddim.json"))]
    steps += [(f"{m} --quick --compile true --dtype bf16",
               [py, os.path.join(ROOT, f"{m}.py"), *quick, "--device", dev, "--compile", "true", "--dtype", "bf16",
                "--out", os.path.join(work, f"{m}_compiled")], 150, None) for m in METHODS]
    steps += [(f"{bench_name} --compile",
               [*bench, "--compile", "--json", os.path.join(work, "bench_compiled.json")], 300,
               os.path.join(work, "bench_compiled.json"))]
    return steps

def run_out(argv):
    """The run folder a method step writes (its --out; under --rehearse, OUT/rehearsal)."""
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    return out and (os.path.join(out, "rehearsal") if "--rehearse" in argv else out)

def figures(argv, result):
    """What a finished step measured: its result file, or a method run's metrics, rehearsal table and the
    device its first log row recorded."""
    if result:
        return R.read_file(result) if os.path.exists(result) else None
    out, found = run_out(argv), {}
    for name in ("metrics.json", "rehearsal.json"):
        if out and os.path.exists(os.path.join(out, name)):
            found[name[:-5]] = R.read_file(os.path.join(out, name))
    if out and os.path.exists(os.path.join(out, "log.jsonl")):
        first = json.loads(open(os.path.join(out, "log.jsonl")).readline())
        found["ran_on"] = {k: first.get(k) for k in ("device_used", "device_name", "world_size")}
    return found or None

def run_step(name, argv, timeout, result, env, log):
    """Run one step as a child process (its own process group, killed whole at the timeout); its record."""
    t0 = time.time()
    with open(log, "w") as f:
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True)
        try:
            status = "ok" if child.wait(timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the step and its workers (torchrun's, compile's)
            child.wait()
            status = "timed out"
    tail = open(log, errors="replace").read()[-2000:]
    return dict(name=name, status=status, returncode=child.returncode, seconds=round(time.time() - t0, 1),
                timeout_s=round(timeout, 1), command=" ".join(argv), figures=figures(argv, result),
                output_tail=tail, log=log)

def run_all(steps, budget, path, env, work, header):
    """Run `steps` in order within `budget` seconds, rewriting the JSON at `path` after each."""
    deadline, report = time.time() + budget, {**header, "budget_s": budget, "steps": []}
    for i, (name, argv, timeout, result) in enumerate(steps):
        left = deadline - time.time()
        record = dict(name=name, status="skipped: no time left", command=" ".join(argv)) if left < 1 else \
            run_step(name, argv, min(timeout, left), result, env, os.path.join(work, f"step{i:02d}.log"))
        report["steps"].append(record)
        report["seconds"] = round(time.time() - deadline + budget, 1)
        R.write_json(path, report)
        print(f"{record['status']:>24}  {record.get('seconds', 0):7.1f} s  {name}", flush=True)
    return report

def versions(device):
    """The machine a check ran on: the device and its model, torch, CUDA, cuDNN, Python, the commit."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {**R.device_info(device), "cudnn_version": cudnn, "python": sys.version.split()[0],
            "commit": commit.strip() or None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}

def ddim_rate(path, device, dry):
    """The Denoising Student's pair generation: its CIFAR-10 teacher's DDIM (DDPM U-Net, 100 quad steps) at
    batch 1024 from noise, pairs/s in fp32 (TF32 on CUDA) and bf16, after a warm-up at the timed batch."""
    import luhman_kd as L
    device = R.setup_device(device)
    k = L.RECIPES.index("cifar10")
    batch, steps = (8, 2) if dry else (1024, L.TABLE3["teacher_steps"][k])
    torch.manual_seed(0)
    net = C.UNet(R.unet_config_from_diffusers(DDPM_CIFAR10)).to(device)
    den = C.Denoiser(net, C.Schedule("linear"), "eps").freeze()
    times, z = C.sampler_times(den.schedule, steps, L.TABLE3["skip"][k]), torch.randn(batch, 3, 32, 32,
                                                                                       device=device)
    rows = []
    for dtype in ("fp32", "bf16"):
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        with C.autocast(device, dtype):
            C.ddim_sample(den, z, times[-3:])  # warm-up: cuDNN's search at this batch
            sync(device)
            t0 = time.perf_counter()
            C.ddim_sample(den, z, times)
            sync(device)
        seconds = time.perf_counter() - t0
        rows.append(dict(dtype=dtype, batch=batch, steps=steps, seconds=seconds, pairs_per_s=batch / seconds,
                         peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device != "cpu" else None))
    R.write_json(path, {"device": device, "rows": rows})

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --dry true)")
    p.add_argument("--dry", default="false", choices=("true", "false"), help="tiny counts (see above)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    p.add_argument("--json", default="gpu_check.json", help="the one report")
    p.add_argument("--work", default="runs/gpu_check", help="the steps' run folders and logs")
    p.add_argument("--cache", default="", help="DISTILL_CACHE of the steps ('' = a fresh WORK/cache)")
    p.add_argument("--ddim-rate", default="", help=argparse.SUPPRESS)  # step 4, run as a child
    args = p.parse_args(argv)
    args.dry = args.dry == "true"
    if args.ddim_rate:
        return ddim_rate(args.ddim_rate, args.device, args.dry)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no usable CUDA GPU here; for the plumbing alone: --device cpu --dry true")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, **OFFLINE, "DISTILL_CACHE": os.path.abspath(args.cache or os.path.join(work, "cache"))}
    header = {"check": "benchmarks/gpu_check.py", "dry": args.dry, **versions(R.pick_device(args.device))}
    report = run_all(plan(args, work), args.budget, os.path.abspath(args.json), env, work, header)
    print(f"{sum(s['status'] == 'ok' for s in report['steps'])}/{len(report['steps'])} steps ok in "
          f"{report['seconds']:.0f} s: {args.json}")

if __name__ == "__main__":
    main()
