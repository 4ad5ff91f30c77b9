"""nets room: the U-Net and DiT, presets, teacher loading (common) and conversion (tools/convert_teacher.py).

The loading tests build diffusers UNet2DModel models offline (random weights, perturbed so that zero
inits hide nothing), save them the way the hub stores them, and check that load_teacher reproduces
diffusers' outputs. ermongroup and guided-diffusion files are produced with the converter's inverse maps
and go through the converter into project checkpoints."""
import dataclasses
import io
import json
import os
import runpy
import shutil
import sys
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from common import (DiT, PRESETS, UNet, UNetConfig, build_net, net_config, sampler_spec)

import runtime as R
from standins import perturb
from tools.convert_teacher import (KNOWN, config_from_ermongroup, diffusion_of, from_original, infer_format,
                                   infer_preset, main as convert, to_original)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# google/ddpm-cifar10-32 config.json (reference notes §1.1; attention_head_dim null = one head)
DDPM_CIFAR10 = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
             "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
             "variance_type": "fixed_large"}
# small ADM-style diffusers configs: scale-shift, several heads, 6 outputs, cos/sin embedding, eps 1e-5
ADM_SMALL = dict(sample_size=16, out_channels=6, block_out_channels=(32, 64, 64), layers_per_block=2,
                 attention_head_dim=16, resnet_time_scale_shift="scale_shift", downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, attn_norm_num_groups=32)
ADM_VARIANTS = {
    "resnet_updown": dict(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                          downsample_type="resnet", upsample_type="resnet"),
    "conv_sym": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}
# a small Ho et al.-style config, ours and diffusers'
HO_SMALL = UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
HO_SMALL_DIFFUSERS = dict(DDPM_CIFAR10, sample_size=16, block_out_channels=[32, 64], layers_per_block=1,
                          down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                          up_block_types=["AttnUpBlock2D", "UpBlock2D"])

def max_diff(a, b):
    return (a - b).abs().max().item()

def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) > 20
    return msg

def convert_file(sd, tmp_path, name, *flags):
    """Save sd as an original checkpoint, convert it through the converter's main(), load it as a teacher."""
    src, dst = str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}_converted.pt")
    torch.save(sd, src)
    found = convert([src, dst, *flags])
    return R.load_teacher(dst), found

@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """diffusers ddpm-cifar10-32 architecture with perturbed random weights, saved as safetensors + configs"""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**DDPM_CIFAR10).eval(), 1)
    folder = tmp_path_factory.mktemp("ddpm")
    ref.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 999])
    with torch.no_grad():
        y = ref(x, t).sample
    return dict(ref=ref, folder=folder, x=x, t=t, y=y, den=R.load_teacher(str(folder)))

def test_ddpm_cifar10_from_diffusers_exact(ddpm):
    assert sum(p.numel() for p in ddpm["ref"].parameters()) == 35_746_307
    assert ddpm["ref"].down_blocks[1].attentions[0].heads == 1
    assert os.path.exists(ddpm["folder"] / "diffusion_pytorch_model.safetensors")
    den = ddpm["den"]
    net = den.net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert (den.param, den.var, den.steps, den.source) == ("eps", "fixed_large", None, str(ddpm["folder"]))
    assert den.schedule.spec() == dict(kind="linear", T=1000, beta_start=1e-4, beta_end=0.02, t_scale=1.0)
    assert dataclasses.replace(net.config, dropout=0.1) == PRESETS["ddpm_cifar10"]
    with torch.no_grad():
        diff = max_diff(net(ddpm["x"], ddpm["t"].float()), ddpm["y"])
    print(f"ddpm_cifar10 diffusers vs ours max|diff| = {diff:.2e}")
    assert diff <= 1e-5

def test_diffusers_old_attention_names_and_bin_fallback(tmp_path):
    from diffusers import UNet2DModel
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**HO_SMALL_DIFFUSERS).eval(), 6)
    ref.save_pretrained(tmp_path / "new")
    with pytest.raises(ValueError) as e:  # no scheduler_config.json: the schedule is unknown
        R.load_teacher(str(tmp_path / "new"))
    assert "scheduler_config.json" in one_line_error(e)
    (tmp_path / "new" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    net = R.load_teacher(str(tmp_path / "new")).net
    assert net.config == HO_SMALL
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 637])
    with torch.no_grad():
        assert max_diff(net(x, t), ref(x, t).sample) <= 1e-5

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in R.read_safetensors(str(tmp_path / "new" / "diffusion_pytorch_model.safetensors")).items():
        for new, o in old.items():
            k = k.replace(f".{new}.", f".{o}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed) and not any(".to_q." in k for k in renamed)
    assert_same_state(R.from_diffusers(renamed, HO_SMALL), net.state_dict())
    with pytest.raises(ValueError) as e:
        R.from_diffusers({k: v for k, v in renamed.items() if "conv_out" not in k}, HO_SMALL)
    assert "2 missing, e.g. 'conv_out.weight'" in one_line_error(e)
    (tmp_path / "old").mkdir()
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(tmp_path / "new" / name, tmp_path / "old")
    save_file(renamed, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    assert_same_state(R.load_teacher(str(tmp_path / "old")).net.state_dict(), net.state_dict())

    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not os.path.exists(tmp_path / "bin" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "bin" / "scheduler").mkdir()  # the pipeline layout: scheduler/scheduler_config.json
    (tmp_path / "bin" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(SCHEDULER, variance_type="fixed_small")))
    den = R.load_teacher(str(tmp_path / "bin"))
    assert den.var == "fixed_small"
    assert_same_state(den.net.state_dict(), net.state_dict())

def test_ermongroup_naming_and_conversion(ddpm, tmp_path):
    net = ddpm["den"].net
    cfg, ours = net.config, net.state_dict()
    ho = to_original(ours, cfg, "ermongroup")
    assert len(ho) == 328 and infer_format(ho) == "ermongroup"
    shapes = {"temb.dense.0.weight": (512, 128), "conv_in.weight": (128, 3, 3, 3),
              "down.1.attn.1.q.weight": (256, 256, 1, 1),
              "down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
              "down.0.downsample.conv.weight": (128, 128, 3, 3),
              "mid.attn_1.proj_out.weight": (256, 256, 1, 1), "up.1.attn.2.v.weight": (256, 256, 1, 1),
              "up.0.block.2.conv1.weight": (128, 256, 3, 3), "up.3.upsample.conv.weight": (256, 256, 3, 3),
              "norm_out.weight": (128,), "conv_out.weight": (3, 128, 3, 3)}
    for k, s in shapes.items():
        assert tuple(ho[k].shape) == s, k
    assert "up.0.upsample.conv.weight" not in ho and "down.3.downsample.conv.weight" not in ho
    assert config_from_ermongroup(ho) == cfg  # the architecture read from the keys
    assert_same_state(from_original(ho, cfg, "ermongroup"), ours)
    assert infer_preset(ho, "ermongroup") == "ddpm_cifar10"

    den, found = convert_file(ho, tmp_path, "ho")  # preset, schedule and variance known: no flags
    assert (found["format"], found["preset"], found["params"]) == ("ermongroup", "ddpm_cifar10", 35_746_307)
    assert den.net.config == PRESETS["ddpm_cifar10"] and (den.param, den.var) == ("eps", "fixed_large")
    assert den.schedule.spec() == ddpm["den"].schedule.spec()
    with torch.no_grad():
        diff = max_diff(den.net(ddpm["x"], ddpm["t"].float()), ddpm["y"])
    print(f"converted ermongroup file vs diffusers max|diff| = {diff:.2e}")
    assert diff <= 1e-5

def test_ermongroup_ddim_list_checkpoint_and_inferred_config(tmp_path):
    torch.manual_seed(0)
    net = perturb(UNet(HO_SMALL).eval(), 2)
    ho = to_original(net.state_dict(), HO_SMALL, "ermongroup")
    ema = {f"module.{k}": v for k, v in ho.items()}  # DataParallel names
    ckpt = [{f"module.{k}": 0 * v for k, v in ho.items()}, {"state": {}, "param_groups": []}, 3, 100, ema]
    # ermongroup/ddim's ckpt.pth: [model, optimizer, epoch, step, ema]
    with pytest.raises(ValueError) as e:  # no preset fits: the schedule must be given
        convert_file(ckpt, tmp_path, "ddim")
    assert "--schedule" in one_line_error(e)
    den, found = convert_file(ckpt, tmp_path, "ddim", "--schedule", "linear", "--var", "fixed_large")
    assert found["preset"] is None and den.net.config.attn_resolutions == (16,)  # image size inferred as 32
    assert den.schedule.spec() == dict(kind="linear", T=1000, beta_start=1e-4, beta_end=0.02, t_scale=1.0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(den.net(x, torch.tensor([5.0, 700.0])), net(x, torch.tensor([5.0, 700.0])))

@pytest.mark.parametrize("variant", list(ADM_VARIANTS))
def test_adm_style_diffusers_and_guided(variant, tmp_path):
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**ADM_SMALL, **ADM_VARIANTS[variant]).eval(), 3)
    assert ref.down_blocks[1].attentions[0].heads == 4
    ref.save_pretrained(tmp_path / "diffusers")
    (tmp_path / "diffusers" / "scheduler_config.json").write_text(
        json.dumps(dict(SCHEDULER, beta_schedule="squaredcos_cap_v2", variance_type="learned_range")))
    den = R.load_teacher(str(tmp_path / "diffusers"))
    net, cfg = den.net, den.net.config
    assert (den.schedule.kind, den.var) == ("cosine", "learned_range")
    assert cfg.resblock_updown == (variant == "resnet_updown") and cfg.down_pad == "sym"
    assert (cfg.scale_shift, cfg.time_emb, cfg.norm_eps, cfg.num_head_channels, cfg.attn_resolutions) == \
        (True, "cos_sin", 1e-5, 16, (8, 4))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.7, 501.25])  # fractional t
    with torch.no_grad():
        y = ref(x, t).sample
        diff = max_diff(net(x, t), y)
    print(f"ADM-style ({variant}) diffusers vs ours max|diff| = {diff:.2e}")
    assert y.shape == (2, 6, 16, 16) and diff <= 1e-5

    # guided-diffusion naming, both fused-qkv layouts: keys, shapes, a lossless round trip, the converter
    for layout in ("legacy", "new"):
        gcfg = dataclasses.replace(cfg, qkv_layout=layout)
        g = to_original(net.state_dict(), gcfg, "guided")
        assert infer_format(g) == "guided"
        assert tuple(g["input_blocks.4.1.qkv.weight"].shape) == (192, 64, 1)
        assert tuple(g["middle_block.1.proj_out.weight"].shape) == (64, 64, 1)
        assert tuple(g["input_blocks.1.0.emb_layers.1.weight"].shape) == (64, 128)  # 2C: scale, shift
        assert tuple(g["out.2.weight"].shape) == (6, 32, 3, 3) and "time_embed.2.bias" in g
        if variant == "resnet_updown":
            assert "input_blocks.3.0.in_layers.2.weight" in g and "output_blocks.5.2.out_layers.3.weight" in g
        else:
            assert "input_blocks.3.0.op.weight" in g and "output_blocks.5.2.conv.weight" in g
        assert_same_state(from_original(g, gcfg, "guided"), net.state_dict())
        (tmp_path / "unet.json").write_text(json.dumps(net_config(net)))  # the layout comes from --qkv-layout
        loaded, found = convert_file(g, tmp_path, layout, "--preset", str(tmp_path / "unet.json"),
                                     "--qkv-layout", layout, "--schedule", "cosine")
        assert (found["format"], loaded.var, loaded.schedule.kind) == ("guided", "learned_range", "cosine")
        assert_same_state(loaded.net.state_dict(), net.state_dict())

def reference_fused_attention(x, g, prefix, heads, layout, groups=32):
    """ADM attention block written from the layout descriptions: qkv is a conv1d with 3C outputs;
    'legacy' reshapes to (B*heads, 3*d, T) (each head's [q,k,v] contiguous), 'new' chunks q,k,v first
    and then splits heads; q and k are each scaled by d^-1/4."""
    B, C, H, W = x.shape
    T, d = H * W, C // heads
    h = F.group_norm(x, groups, g[f"{prefix}.norm.weight"], g[f"{prefix}.norm.bias"], eps=1e-5)
    h = h.reshape(B, C, T)
    qkv = F.conv1d(h, g[f"{prefix}.qkv.weight"], g[f"{prefix}.qkv.bias"])
    if layout == "legacy":
        q, k, v = qkv.reshape(B * heads, 3 * d, T).split(d, dim=1)
    else:
        q, k, v = (z.reshape(B * heads, d, T) for z in qkv.chunk(3, dim=1))
    s = d ** -0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, T)
    return x + F.conv1d(a, g[f"{prefix}.proj_out.weight"], g[f"{prefix}.proj_out.bias"]).reshape(B, C, H, W)

@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_fused_qkv_layouts_numerically(layout):
    cfg = dataclasses.replace(PRESETS["tiny"], qkv_layout=layout)
    torch.manual_seed(0)
    net = perturb(UNet(cfg).eval(), 4, scale=0.1)
    g = to_original(net.state_dict(), cfg, "guided")
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        ours = net.mid_attn(x)
        right = reference_fused_attention(x, g, "middle_block.1", 2, layout, cfg.norm_groups)
        other = {"legacy": "new", "new": "legacy"}[layout]
        wrong = reference_fused_attention(x, g, "middle_block.1", 2, other, cfg.norm_groups)
    assert max_diff(ours, right) <= 1e-5
    assert max_diff(ours, wrong) > 1e-3  # the two orders really differ

def test_published_parameter_counts_preset_inference_and_known_schedules():
    counts = {"ddpm_cifar10": 35_746_307, "ddim_celeba64": 78_700_803, "ddpm_256": 113_673_219,
              "adm_cifar10_57m": 57_094_662, "iddpm_cifar10": 52_546_438}
    for name, n in counts.items():
        with torch.device("meta"):
            net = UNet(PRESETS[name])
        assert sum(p.numel() for p in net.parameters()) == n, name
        if name in ("ddpm_cifar10", "ddim_celeba64", "ddpm_256"):  # Ho et al. / ermongroup (Luhman & Luhman)
            ho = to_original(net.state_dict(), net.config, "ermongroup")
            assert infer_preset(ho, "ermongroup") == name
            assert config_from_ermongroup(ho).ch_mult == net.config.ch_mult
        else:
            g = to_original(net.state_dict(), net.config, "guided")
            assert len(g) == {"adm_cifar10_57m": 494, "iddpm_cifar10": 446}[name]
            assert infer_preset(g, "guided") == name
        assert name in KNOWN
    # the released models' diffusion (teacher_checkpoints.md; ermongroup/ddim configs/celeba.yml)
    ho_linear = dict(kind="linear", T=1000, beta_start=1e-4, beta_end=0.02, t_scale=1.0)
    assert diffusion_of("ddim_celeba64", 3) == (ho_linear, "eps", "fixed_large")
    assert diffusion_of("ddpm_256", 3) == (ho_linear, "eps", "fixed_small")
    iddpm_cosine = dict(kind="cosine", T=4000, cosine_s=0.008, t_scale=0.25)
    assert diffusion_of("iddpm_cifar10", 6) == (iddpm_cosine, "eps", "learned_range")
    flags = dict(schedule="linear", T=500, var="fixed_large")
    assert diffusion_of("ddpm_256", 3, **flags) == (dict(ho_linear, T=500), "eps", "fixed_large")  # flags win

def test_build_net_and_net_config_round_trip():
    for name in ("tiny", "dit_tiny"):
        net = build_net(name)
        cfg = json.loads(json.dumps(net_config(net)))
        assert build_net(cfg).config == PRESETS[name]
        build_net(cfg).load_state_dict(net.state_dict())
    zero = build_net("tiny", zero_init=True)
    assert torch.equal(zero(torch.randn(1, 3, 16, 16), 10.0), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError) as e:
        build_net({"arch": "unet", "channels": 3})
    one_line_error(e)

def test_dit_shapes_and_adaln_zero():
    cfg = dataclasses.replace(PRESETS["dit_tiny"], out_channels=6)
    net = DiT(cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.0, 999.5])
    with torch.no_grad():
        assert torch.equal(net(x, t), torch.zeros(2, 6, 16, 16))  # adaLN-Zero: exactly zero at init
        perturb(net, 5, scale=0.05)
        y = net(x, t)
        assert y.shape == (2, 6, 16, 16) and y.abs().min() > 0 and torch.isfinite(y).all()
        assert torch.allclose(net(x, 500.0), net(x, torch.tensor([500.0, 500.0])))

def test_mismatched_checkpoints_raise_one_line(tmp_path):
    torch.manual_seed(0)
    ho = to_original(UNet(HO_SMALL).state_dict(), HO_SMALL, "ermongroup")
    with pytest.raises(ValueError) as e:
        from_original(ho, PRESETS["ddpm_cifar10"], "ermongroup")
    assert "ermongroup" in one_line_error(e) and "'ddpm_cifar10' expects 328" in str(e.value)
    bad = dict(ho, **{"conv_in.weight": torch.zeros(32, 3, 5, 5)})
    with pytest.raises(ValueError) as e:
        from_original(bad, HO_SMALL, "ermongroup")
    assert "shape" in one_line_error(e) and "--preset" in str(e.value)
    with pytest.raises(ValueError) as e:
        from_original(ho, PRESETS["iddpm_cifar10"], "guided")
    one_line_error(e)
    with pytest.raises(ValueError) as e:
        infer_format({"foo.weight": torch.zeros(1)})
    one_line_error(e)
    with pytest.raises(ValueError) as e:
        infer_preset(to_original(UNet(PRESETS["tiny"]).state_dict(),
                                 dataclasses.replace(PRESETS["tiny"], qkv_layout="new"), "guided"), "guided")
    assert "--preset" in one_line_error(e)  # no guided preset has the tiny architecture
    torch.save(ho, tmp_path / "ho.pt")  # the converter refuses a preset that does not fit, in one line
    with pytest.raises(ValueError) as e:
        convert([str(tmp_path / "ho.pt"), str(tmp_path / "out.pt"), "--preset", "ddpm_cifar10"])
    one_line_error(e)
    with pytest.raises(ValueError) as e:
        R.unet_config_from_diffusers(dict(DDPM_CIFAR10, down_block_types=["CrossAttnDownBlock2D"] * 4))
    assert "CrossAttnDownBlock2D" in one_line_error(e)
    with pytest.raises(ValueError) as e:
        R.unet_config_from_diffusers(dict(ADM_SMALL, **ADM_VARIANTS["conv_sym"], attn_norm_num_groups=None))
    one_line_error(e)

def test_load_teacher_specs_and_bad_files(tmp_path, monkeypatch):
    """Project checkpoints load (EMA first); foreign, corrupt, truncated and malicious files, missing paths
    and unreachable hub ids each give one line, and no file is unpickled beyond plain data."""
    torch.manual_seed(0)
    net = build_net("tiny")
    ema = perturb(build_net("tiny"), 7)
    schedule = dict(kind="cosine", T=1000, cosine_s=0.008, t_scale=1.0)
    R.save_checkpoint(str(tmp_path / "ours.pt"), net_config=net_config(net), model=net.state_dict(),
                      ema=ema.state_dict(), schedule=schedule, param="x", var="fixed_small",
                      sampler=sampler_spec([999, 749.25, 499.5, 249.75], clip=True))
    den = R.load_teacher(str(tmp_path / "ours.pt"))
    assert (den.param, den.var, den.steps, den.schedule.spec()) == ("x", "fixed_small", 4, schedule)
    assert den.sampler == {"times": [999, 749.25, 499.5, 249.75], "ancestral": False, "clip": True,
                           "frac": None, "last": None}
    assert_same_state(den.net.state_dict(), ema.state_dict()) and not den.net.training

    guided = dataclasses.replace(PRESETS["tiny"], qkv_layout="new")
    torch.save(to_original(net.state_dict(), guided, "guided"), tmp_path / "foreign.pt")
    with pytest.raises(ValueError) as e:
        R.load_teacher(str(tmp_path / "foreign.pt"))
    assert f"python tools/convert_teacher.py {tmp_path / 'foreign.pt'}" in one_line_error(e)

    class Evil:
        def __reduce__(self):
            return (os.remove, (str(tmp_path / "ours.pt"),))
    torch.save({"format": R.CKPT_FORMAT, "model": Evil()}, tmp_path / "evil.pt")
    good = (tmp_path / "ours.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(100))
    for name in ("evil.pt", "truncated.pt", "empty.pt", "junk.safetensors"):
        for read in (R.load_teacher, R.read_file):
            with pytest.raises(ValueError) as e:
                read(str(tmp_path / name))
            assert str(tmp_path / name) in one_line_error(e)
    assert os.path.exists(tmp_path / "ours.pt")  # the malicious file ran nothing

    monkeypatch.chdir(tmp_path)
    for spec in ("runs/x.pt", "./foo", "../x", "/no/such/dir"):  # relative or absolute paths, not hub ids
        with pytest.raises(ValueError) as e:
            R.load_teacher(spec)
        assert "no such file" in one_line_error(e) and "--teacher-" not in str(e.value)

    def offline(url, timeout=None):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr("runtime.CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError) as e:
        R.load_teacher("google/ddpm-cifar10-32")
    assert "https://huggingface.co/google/ddpm-cifar10-32/resolve/main/config.json" in one_line_error(e)

def test_converter_command_line(tmp_path, monkeypatch):
    """`python tools/convert_teacher.py IN OUT ...` run as a script; a bad call ends in one line 'error:'."""
    torch.manual_seed(0)
    net = perturb(UNet(HO_SMALL).eval(), 8)
    torch.save(to_original(net.state_dict(), HO_SMALL, "ermongroup"), tmp_path / "ho.pt")
    script = os.path.join(ROOT, "tools", "convert_teacher.py")
    args = [script, str(tmp_path / "ho.pt"), str(tmp_path / "out.pt")]
    monkeypatch.setattr(sys, "argv", args)  # no preset fits and no schedule is given
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert str(e.value.code).startswith("error: ") and "--schedule" in one_line_error(e)
    monkeypatch.setattr(sys, "argv", args + ["--schedule", "linear", "--var", "fixed_small"])
    runpy.run_path(script, run_name="__main__")
    assert_same_state(R.load_teacher(str(tmp_path / "out.pt")).net.state_dict(), net.state_dict())

def test_diffusers_attention_head_dim_default():
    assert R.unet_config_from_diffusers(DDPM_CIFAR10).num_head_channels == -1  # null: one head
    missing = {k: v for k, v in DDPM_CIFAR10.items() if k != "attention_head_dim"}
    assert R.unet_config_from_diffusers(missing).num_head_channels == 8  # diffusers' default

def test_read_safetensors_matches_package(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 3, 1, 1, generator=g).bfloat16(), "i64": torch.arange(-3, 4),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    path = str(tmp_path / "t.safetensors")
    ours, theirs = R.read_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k

class FakeResponse(io.BytesIO):
    def __init__(self, data, fail_after=None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset")
        return super().read(min(n, 1000) if n > 0 else n)

def test_hub_download(tmp_path, monkeypatch):
    data = os.urandom(5000)
    requests = []

    def fake_urlopen(url, timeout=None):
        requests.append(url)
        if "broken" in url:
            return FakeResponse(data, fail_after=2000)
        if "missing" in url:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return FakeResponse(data)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    path = R.hub_download("google/ddpm-cifar10-32", "config.json", str(tmp_path), revision="abc123")
    assert requests == ["https://mirror.example/google/ddpm-cifar10-32/resolve/abc123/config.json"]
    assert open(path, "rb").read() == data
    assert R.hub_download("google/ddpm-cifar10-32", "config.json", str(tmp_path), revision="abc123") == path
    assert len(requests) == 1  # cache hit: no second request

    for repo in ("org/broken", "org/missing"):
        with pytest.raises(ValueError) as e:
            R.hub_download(repo, "diffusion_pytorch_model.safetensors", str(tmp_path))
        msg = one_line_error(e)
        assert f"https://mirror.example/{repo}/resolve/main/diffusion_pytorch_model.safetensors" in msg
        assert str(tmp_path) in msg
        folder = tmp_path / repo.replace("/", "--") / "main"
        assert os.listdir(folder) == []  # atomic: no partial or temp file left behind

def test_hub_id_loads_through_plain_https(tmp_path, monkeypatch):
    """load_teacher('owner/name') fetches config.json, the weights (.bin when the hub has no .safetensors)
    and scheduler_config.json once into CACHE_DIR/hub and reproduces the diffusers model."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**HO_SMALL_DIFFUSERS).eval(), 9)
    ref.save_pretrained(tmp_path / "served", safe_serialization=False)
    (tmp_path / "served" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    requests = []

    def serve(url, timeout=None):
        requests.append(url)
        prefix = "https://huggingface.co/google/ddpm-small/resolve/main/"
        path = tmp_path / "served" / url[len(prefix):]
        if not url.startswith(prefix) or not path.exists():
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return FakeResponse(path.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    monkeypatch.setattr("runtime.CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    den = R.load_teacher("google/ddpm-small")
    assert (den.source, den.var, den.net.config) == ("google/ddpm-small", "fixed_large", HO_SMALL)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        assert max_diff(den.net(x, t), ref(x, t).sample) <= 1e-5
    assert [u.rsplit("/", 1)[1] for u in requests] == ["config.json", "diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.bin", "scheduler_config.json"]
    cached = tmp_path / "cache" / "hub" / "google--ddpm-small" / "main"
    assert os.path.exists(cached / "diffusion_pytorch_model.bin")
