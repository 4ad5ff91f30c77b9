"""GPU-ready hot paths, checked on the CPU: one update of every method (loss, backward, clipping, fused Adam,
EMA, the loop's own bookkeeping) and the samplers' steps dispatch no op that on CUDA would block the host or
copy from it. A dispatch mode sees every ATen op whatever the device, so what it counts on this CPU is what a
GPU would pay:
- host syncs: `_local_scalar_dense` (item, tolist, float(t), bool(t), `if t:`) and the ops whose output size
  depends on values (nonzero, masked_select, boolean indexing, unique): the host waits for the GPU's queue;
- tensors made from host data (`lift_fresh`: torch.tensor, as_tensor of Python numbers or lists, from_numpy):
  on CUDA a host->device copy, as the data is on the host by construction (a number as a kernel argument,
  x * 0.5 or torch.full, is none);
- copies between devices (`_to_copy`, `copy_`), which a CPU run cannot show: run this file on a GPU machine
  and the cuda cases count them too. What a CPU run can show instead: no op reads a schedule's host table
  (Schedule.logsnr_table), only the copy each device keeps.
Sampling noise on the device, one generator per sample (NVlabs/edm's StackedRandomGenerator): the same per
seed whatever the batch."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common as C
import dkdm as D
import luhman_kd as L
import progressive as P
import runtime as R
import self_distill as S

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
         "unique_consecutive", "repeat_interleave"}  # the last: without output_size it reads the counts
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}

HOST_TABLES = []  # every test schedule's host table: no op may read it (the devices' copies serve)

class HostTraffic(TorchDispatchMode):
    """Lists, by op name, what would stall a CUDA stream's host: syncs, tensors from host data, device copies,
    reads of a host table."""

    def __init__(self):
        super().__init__()
        self.ops, self.host = [], {t.untyped_storage().data_ptr() for t in HOST_TABLES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        indices = args[1] if name in ("index", "index_put", "index_put_") else ()
        out = func(*args, **kwargs)
        if name in SYNCS or name in HOST_DATA:
            self.ops.append(name)
        elif any(t.untyped_storage().data_ptr() in self.host for t in tensors):
            self.ops.append(f"{name} of a host table")
        elif any(i is not None and i.dtype == torch.bool for i in indices):
            self.ops.append(f"{name} (boolean mask)")
        elif name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and \
                any(t.device != out.device for t in tensors):
            self.ops.append(f"{name} {tensors[0].device} -> {out.device}")
        return out

def traffic(fn, *args):
    """The host traffic of fn(*args) (and its result)."""
    with HostTraffic() as mode:
        result = fn(*args)
    return mode.ops, result

def _net(name="tiny16", out_channels=3, num_classes=0, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    net = C.build_net(name, zero_init=False, image_size=8, out_channels=out_channels, num_classes=num_classes,
                      **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(device)

def _den(schedule="linear", param="eps", var="fixed_small", device="cpu", **kw):
    out = 3 * (2 if param == "both" else 1) + (3 if var == "learned_range" else 0)
    schedule = C.Schedule(schedule)
    if schedule.discrete:
        HOST_TABLES.append(schedule.logsnr_table)
    return C.Denoiser(_net(out_channels=out, device=device, **kw), schedule, param, var)

def _updater(den, ema=None, clip=1.0):
    """One update after the loss, as every loop does it: backward, gradient clipping, fused Adam (the loops'
    choice on CUDA; on the CPU the default Adam reads its step counter with .item()), the EMA."""
    opt = torch.optim.Adam(den.parameters(), lr=1e-4, fused=True)
    ema = ema or den.copy().freeze()
    sums = torch.zeros(1, device=next(den.parameters()).device)  # runtime.Meter.add's running sums

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(den.parameters(), clip)
        opt.step()
        C.ema_update(ema.net, den.net, 0.99)
        sums.add_(torch.stack([loss.detach().float()]))
    return update

def _updates(device):
    """{name: one update} of every training loop, each from its method's own functions."""
    g = torch.Generator(device).manual_seed(0)
    data = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 3, (32,), device=device)
    cases = {}

    base = _den("linear", "eps", "learned_range", device)  # runtime.train_teacher (Alg. 1), hybrid loss
    up = _updater(base)
    cases["train_teacher"] = lambda: up(R.diffusion_loss(base, "snr", R.sample_batch(data, 4, g)[0], g))

    for name, schedule, param, clip in (("progressive", "cosine_logsnr", "x", False),
                                        ("progressive_eps", "linear", "eps", True)):
        teacher = _den(schedule, param, device=device).freeze()
        student = P.make_student(teacher, 4)
        up_p = _updater(student)
        cases[name] = lambda t=teacher, s=student, u=up_p, c=clip: u(P.distill_loss(
            s, t, R.sample_batch(data, 4, g)[0], None, 4, "trunc_snr", g, clip=c))

    kd = L.make_student(_den(device=device).freeze(), "official")  # luhman_kd: one evaluation at T - 1
    up_l = _updater(kd)
    x_T, x_0 = torch.randn(4, 3, 8, 8, device=device), R.sample_batch(data, 4, g)[0]
    cases["luhman_kd"] = lambda: up_l(L.student_loss(L.student_x0(kd, x_T), x_0, "l1").sum() / 4)

    model = _den(device=device, num_classes=3).eval()  # fine-tuning DSD with guidance, on the device grid
    up_s = _updater(model)
    times, alpha, sigma = S.ddim_grid(model.schedule, 4, "unit", device=device)
    z = torch.randn(4, 3, 8, 8, device=device)
    y = labels[:4]

    def dsd():
        w = 1 + 2 * torch.rand((), generator=g, device=device)
        loss, _ = S.dsd_loss(model.guided(w), z, times[0], times[1], alpha[:3], sigma[:3], clip=True, y=y)
        up_s(loss)
        lr = S.learning_rate(1, 1e-6, 2, 10, 0.1)
        return lr
    cases["self_distill"] = dsd

    trained = _den("cosine_logsnr", "v", device=device)  # training DSD, eq. 1
    up_t = _updater(trained)
    cases["training_dsd"] = lambda: up_t(S.training_dsd_loss(trained, R.sample_batch(data, 4, g)[0], g, 8))

    big = _den("linear", "eps", "learned_range", device).freeze()  # DKDM: alg. 1, lines 4-8
    small = _den("linear", "eps", "learned_range", device, seed=1)
    up_d = _updater(small)
    chain_t = torch.tensor(C.sampler_times(big.schedule, 10, "linspace")[::-1], device=device)
    kset = D.new_set(16, 10, (3, 8, 8), "dynamic", g)

    def dkdm():
        idx = D.draw(16, 4, "dynamic", g)
        noise = torch.randn((4, 3, 8, 8), generator=g, device=device)
        z_t, k = kset["z"][idx], kset["k"][idx]
        target = D.teacher_step(big, chain_t, z_t, k, noise)
        simple, vlb = D.dkdm_loss(small, chain_t, z_t, k, target)
        up_d((simple + vlb).mean())
        D.write_back(kset, idx, k, target["z_prev"], 10, g)
    cases["dkdm"] = dkdm
    return cases

@pytest.mark.parametrize("device", DEVICES)
def test_one_update_of_every_method_makes_no_host_traffic(device):
    """Each training loop's update, its second (the first fills the per-device caches), counted op by op: no
    host sync, no tensor from host data, no copy between devices."""
    for name, update in _updates(device).items():
        update()
        ops, _ = traffic(update)
        assert ops == [], f"{name}: {ops}"

@pytest.mark.parametrize("device", DEVICES)
def test_every_sampler_makes_no_host_traffic(device):
    """Whole samplers over a Python list of times (so every step, and the setup too): DDIM, ancestral with its
    per-sample device generators, DPM-Solver++(2M), a guided model's DDIM, and DKDM's teacher step."""
    den = _den("linear", "eps", "learned_range", device).freeze()
    guided = _den(device=device, num_classes=3).freeze().guided(2.0)
    z, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 2], device=device)
    times = C.sampler_times(den.schedule, 3, "linspace")
    chain_t = torch.tensor(sorted(C.sampler_times(den.schedule, 10, "linspace")), device=device)
    k = torch.tensor([0, 9], device=device)
    for name, sample in {
            "ddim_sample": lambda: C.ddim_sample(den, z, times, clip=True),
            "ancestral_sample": lambda: C.ancestral_sample(den, z, times, [3, 4], clip=True),
            "dpm_solver_2m": lambda: C.dpm_solver_2m(den, z, times),
            "guided ddim_sample": lambda: C.ddim_sample(guided, z, times, y=y),
            "dkdm teacher_step": lambda: D.teacher_step(den, chain_t, z, k, torch.randn_like(z))}.items():
        sample()
        ops, _ = traffic(sample)
        assert ops == [], f"{name}: {ops}"

def test_shuffle_denoise_reads_the_host_once_per_round_of_full_calls():
    """DKDM's shuffle denoise as on a GPU (pad): every teacher call at the full batch (the last ones padded
    with finished entries, which stay put), the set's progress read by the host a few times in all, not once
    per call; unpadded (a CPU's way) the same entries move."""
    den = _den("linear", "eps", "learned_range").freeze()
    chain_t = torch.tensor(sorted(C.sampler_times(den.schedule, 10, "linspace")))
    den.schedule.logsnr(chain_t)  # fills the device's table
    g = torch.Generator().manual_seed(0)
    kset = D.new_set(12, 10, (3, 8, 8), "shuffled", g)
    want, fresh = kset["stop"].clone(), lambda: {key: v.clone() for key, v in kset.items()}
    sizes, real = [], D.teacher_step
    D.teacher_step = lambda teacher, chain_t, z, *a: sizes.append(len(z)) or real(teacher, chain_t, z, *a)
    try:
        ops, out = traffic(lambda: D.shuffle_denoise(den, chain_t, fresh(), 5, True, g, pad=True))
        calls = len(sizes)
        unpadded = D.shuffle_denoise(den, chain_t, fresh(), 5, True, g)
    finally:
        D.teacher_step = real
    assert torch.equal(out["k"], want) and torch.equal(unpadded["k"], want) and "stop" not in out
    assert set(sizes[:calls]) == {5} and calls == len(sizes) - calls >= int((9 - want).sum()) / 5
    assert min(sizes[calls:]) < 5  # the unpadded calls shrink
    assert ops.count("_local_scalar_dense") <= 6 and set(ops) == {"_local_scalar_dense"}, ops

def test_seeded_noise_is_per_seed_on_the_device_whatever_the_batch():
    """x_T and an ancestral sampler's per-step noise (SeededGenerators, EDM's StackedRandomGenerator): sample
    i's from seeds[i] alone, draw after draw, so a seed's sample is the same in any batch (ancestral_sample:
    tests/test_math.py); x_T is stream 0's first draw, on the CPU the same as before, the steps' stream 1's."""
    shape = (3, 4, 4)
    assert torch.equal(C.seeded_noise([7, 5, 9], shape)[1], C.seeded_noise([5], shape)[0])
    assert torch.equal(C.seeded_noise([5], shape)[0], torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    together, alone = C.SeededGenerators([1, 5, 2], stream=1), C.SeededGenerators([5], stream=1)
    draws = [(together.randn(shape)[1], alone.randn(shape)[0]) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in draws) and not torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][0], C.seeded_noise([5], shape)[0])  # streams 0 and 1 differ

@pytest.mark.parametrize("device", ["cuda" if torch.cuda.is_available() else "meta"])
def test_the_last_sampling_batch_is_padded_off_the_cpu(device, monkeypatch, tmp_path):
    """generate and sample_to_folder call the sampler at one batch size off the CPU (the short last batch
    padded with copies of its last seed, their images dropped): one cuDNN search, one compiled graph. Each
    seed's image is the one it gets unpadded. Without CUDA, 'meta' stands for a device (noise and sampler on
    the CPU); on the CPU itself nothing is padded."""
    if device == "meta":
        seeded_noise = R.seeded_noise
        monkeypatch.setattr(R, "seeded_noise", lambda seeds, shape, device: seeded_noise(seeds, shape))
    sizes, den = [], C.Denoiser(Scaled(), C.Schedule("linear"), "eps")
    times = C.sampler_times(den.schedule, 3, "unit")

    def sample(z, seeds):  # the per-seed ancestral noise too
        sizes.append(len(seeds))
        return C.ancestral_sample(den, z, times, seeds)
    seeds, shape = list(range(10, 21)), (3, 8, 8)  # 11 seeds at batch 4: 4, 4, 3
    images = R.generate(sample, seeds, shape, 4, device)
    R.sample_to_folder(sample, 11, str(tmp_path), shape, 4, device, seed0=10)
    assert sizes == [4] * 6 and images.shape == (11, *shape)
    last = sample(R.seeded_noise(seeds[8:], shape, device), seeds[8:]).cpu()  # the last batch, unpadded
    assert torch.equal(images[8:], last)  # exact: the network is elementwise, no sum depends on the batch
    assert torch.equal(R.load_dataset(f"folder:{tmp_path}", 8)[8:], C.to_uint8(last))
    R.generate(sample, seeds, shape, 4, "cpu")
    assert sizes[7:] == [4, 4, 3]

class Scaled(nn.Module):
    """A network in one op (x times its time), to compile in a moment."""

    def forward(self, x, t):
        return x * t[:, None, None, None]

def test_compiled_networks_stay_static_across_batch_sizes(monkeypatch):
    """runtime.compiled: each batch size of a run's few gets its own static graph, none a symbolic one
    (torch.compile's default makes every graph after the first change of size dynamic), more than dynamo's
    default 8 of them (the ninth would run eagerly), each compiled once."""
    graphs = []

    def backend(gm, example_inputs):  # records whether the graph has symbolic sizes, runs it eagerly
        graphs.append(any(isinstance(s, torch.SymInt) for x in example_inputs
                          for s in (x.shape if isinstance(x, torch.Tensor) else [x])))
        return gm.forward
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=backend, **kw))
    torch._dynamo.reset()
    try:
        den = R.compiled(C.Denoiser(Scaled(), C.Schedule("linear"), "eps"))
        for b in (*range(1, 11), 2):
            den(torch.randn(b, 3, 8, 8), 5.0)
    finally:
        torch._dynamo.reset()
    assert graphs == [False] * 10
