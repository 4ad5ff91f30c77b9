"""Convert an original diffusion checkpoint into a checkpoint of this project (format distill-ref/1): then
an ordinary teacher (--teacher OUT, common.load_teacher) that records its schedule, parameterisation and
variance type. Like DiT's download.py and EDM's dataset_tool.py, it prepares an input once:

    python tools/convert_teacher.py model-790000.ckpt teachers/ddpm_cifar10.pt   # pesser: Ho et al. CIFAR-10
    python tools/convert_teacher.py ckpt.pth teachers/ddim_celeba64.pt           # ermongroup/ddim CelebA 64
    python tools/convert_teacher.py ADM_cifar10_baseline.pt teachers/adm.pt      # DDPM-IP (DKDM's teacher)
    python tools/convert_teacher.py 64x64_diffusion.pt teachers/adm_in64.pt      # guided-diffusion, conditional
    python tools/convert_teacher.py models/ldm/celeba256/model.ckpt teachers/ldm_celeba256.pt  # CompVis LDM
    python tools/convert_teacher.py model.pt out.pt --preset unet.json --schedule linear --var fixed_small

Formats, told apart by their key names (teacher_checkpoints.md secs. 2-4):
  ermongroup  Ho et al.'s models in PyTorch (ermongroup/ddim, pesser/pytorch_diffusion): a state dict, or
              ermongroup's training list [model, optimizer, epoch, step, ema], of which the EMA is taken
  guided      improved-diffusion / guided-diffusion / DDPM-IP state dicts; the attention qkv is fused, in
              per-head [q, k, v] order ('legacy', improved-diffusion) or q, k, v first ('new', DDPM-IP)
  ldm         CompVis latent-diffusion model.ckpt (Lightning: its 'state_dict'; latent_and_conditional.md A.5):
              model.diffusion_model.* in guided names (openaimodel.py; legacy qkv order) with cin256-v2's
              SpatialTransformers under LDM's own names, cond_stage_model.embedding (the class context),
              first_stage_model.* (the VQ autoencoder) and, when trained with use_ema, model_ema.* (LitEma: each
              name with its dots removed), which is then the copy converted. The output holds the denoiser (in
              latent space: LDM's 'linear' = scaled_linear 0.0015 -> 0.0195, eps, the posterior variance) and
              the autoencoder, {'net_config', 'model'} under 'autoencoder'; 'ema_used' says which weights.
The architecture is the one U-Net preset of common.PRESETS whose tensor names and shapes the file has
(or --preset); an ermongroup file that fits none gets the architecture read from its keys. The schedule,
parameterisation and variance are KNOWN for the released models' presets, or given by the flags.
Files are read with torch.load(weights_only=True): a checkpoint cannot run code.
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (AUTOENCODERS, Denoiser, PRESETS, Schedule, UNet, UNetConfig, VQModel,  # noqa: E402
                    build_net)
import runtime as R  # noqa: E402

_HO = dict(kind="linear", T=1000)  # beta 1e-4 -> 0.02 (Ho et al. 2020)
_ADM = dict(kind="cosine", T=1000)  # Nichol & Dhariwal eq. 17
# The diffusion of the released models, by preset (teacher_checkpoints.md; ermongroup/ddim configs/*.yml)
KNOWN = {
    "ddpm_cifar10": dict(schedule=_HO, param="eps", var="fixed_large"),       # Ho et al. CIFAR-10
    "ddim_celeba64": dict(schedule=_HO, param="eps", var="fixed_large"),      # ermongroup celeba.yml
    "ddpm_256": dict(schedule=_HO, param="eps", var="fixed_small"),           # Ho et al. LSUN 256
    "adm_cifar10_57m": dict(schedule=_ADM, param="eps", var="learned_range"),  # DDPM-IP, DKDM's teacher
    "adm_celeba64_295m": dict(schedule=_ADM, param="eps", var="learned_range"),
    "iddpm_cifar10": dict(schedule=dict(_ADM, T=4000, t_scale=0.25), param="eps", var="learned_range"),
    # class-conditional ImageNet 64 (latent_and_conditional.md F): guided-diffusion 64x64_diffusion.pt and
    # improved-diffusion imagenet64_cond_270M_250K.pt (its defaults: 4000 steps, rescale_timesteps)
    "adm_imagenet64": dict(schedule=_ADM, param="eps", var="learned_range"),
    "iddpm_imagenet64": dict(schedule=dict(_ADM, T=4000, t_scale=0.25), param="eps", var="learned_range"),
}
# Every CompVis LDM (latent_and_conditional.md A.2; ddpm.py defaults): LDM's "linear" betas (= scaled_linear),
# eps, v_posterior 0 (the posterior variance beta~), in latent space
LDM_DIFFUSION = dict(schedule=dict(kind="scaled_linear", T=1000, beta_start=0.0015, beta_end=0.0195),
                     param="eps", var="fixed_small")
KNOWN.update(ldm_vq4_unet=LDM_DIFFUSION, ldm_cin256_v2=LDM_DIFFUSION)
FORMATS = {"ermongroup": "temb.dense.0.weight", "guided": "time_embed.0.weight",  # a key only it has
           "ldm": "model.diffusion_model.time_embed.0.weight"}

# ---- key maps: our modules, each at a format-neutral place that each format names ---------------------

def _modules(cfg):
    """(our module, kind, place) for every parametrised module of UNet(cfg), in forward order. A place names
    the module independently of the format, e.g. ('down', level, block) or ('upsample', level)."""
    L, R = len(cfg.ch_mult), cfg.num_res_blocks
    has_attn = [cfg.image_size >> i in cfg.attn_resolutions for i in range(L)]
    yield "time_mlp.0", "plain", ("time", 0)
    yield "time_mlp.2", "plain", ("time", 1)
    if cfg.num_classes and cfg.context_dim:
        yield "class_context.embedding", "plain", ("context",)  # LDM's ClassEmbedder (cond_stage_model)
    elif cfg.num_classes:
        yield "label_emb", "plain", ("label",)  # ADM's nn.Embedding(num_classes, 4 ch), added to time's
    attn = "transformer" if cfg.context_dim else "attn"
    yield "conv_in", "plain", ("conv_in",)
    for i in range(L):
        for j in range(R):
            yield f"down.{i}.res.{j}", "res", ("down", i, j)
            if has_attn[i]:
                yield f"down.{i}.attn.{j}", attn, ("down_attn", i, j)
        if i < L - 1:
            yield f"down.{i}.resample", "res" if cfg.resblock_updown else "downconv", ("downsample", i)
    yield "mid_res1", "res", ("mid", 0)
    yield "mid_attn", attn, ("mid", 1)
    yield "mid_res2", "res", ("mid", 2)
    for u in range(L):
        i = L - 1 - u  # resolution level of up block u
        for j in range(R + 1):
            yield f"up.{u}.res.{j}", "res", ("up", i, j)
            if has_attn[i]:
                yield f"up.{u}.attn.{j}", attn, ("up_attn", i, j)
        if i > 0:
            yield f"up.{u}.resample", "res" if cfg.resblock_updown else "upconv", ("upsample", i)
    yield "norm_out", "plain", ("norm_out",)
    yield "conv_out", "plain", ("conv_out",)

def _ermongroup_path(place, cfg):
    match place:
        case ("time", n): return f"temb.dense.{n}"
        case ("conv_in",) | ("norm_out",) | ("conv_out",): return place[0]
        case ("down", i, j): return f"down.{i}.block.{j}"
        case ("down_attn", i, j): return f"down.{i}.attn.{j}"
        case ("up", i, j): return f"up.{i}.block.{j}"  # Ho's `up` is indexed by resolution level
        case ("up_attn", i, j): return f"up.{i}.attn.{j}"
        case ("downsample", i): return f"down.{i}.downsample"
        case ("upsample", i): return f"up.{i}.upsample"
        case ("mid", n): return ["mid.block_1", "mid.attn_1", "mid.block_2"][n]

def _guided_path(place, cfg):
    L, R = len(cfg.ch_mult), cfg.num_res_blocks
    has_attn = [cfg.image_size >> i in cfg.attn_resolutions for i in range(L)]
    match place:
        case ("time", n): return f"time_embed.{2 * n}"
        case ("label",): return "label_emb"
        case ("conv_in",): return "input_blocks.0.0"
        case ("norm_out",): return "out.0"
        case ("conv_out",): return "out.2"
        case ("down", i, j): return f"input_blocks.{1 + i * (R + 1) + j}.0"
        case ("down_attn", i, j): return f"input_blocks.{1 + i * (R + 1) + j}.1"
        case ("downsample", i): return f"input_blocks.{(i + 1) * (R + 1)}.0"
        case ("mid", n): return f"middle_block.{n}"
        case ("up", i, j): return f"output_blocks.{(L - 1 - i) * (R + 1) + j}.0"
        case ("up_attn", i, j): return f"output_blocks.{(L - 1 - i) * (R + 1) + j}.1"
        case ("upsample", i): return f"output_blocks.{(L - 1 - i) * (R + 1) + R}.{2 if has_attn[i] else 1}"

def _ldm_path(place, cfg):  # ddpm.py LatentDiffusion: DiffusionWrapper.diffusion_model, cond_stage_model
    return "cond_stage_model.embedding" if place == ("context",) else \
        "model.diffusion_model." + _guided_path(place, cfg)

_PATHS = {"ermongroup": _ermongroup_path, "guided": _guided_path, "ldm": _ldm_path}
_RES = {  # our res block leaves -> theirs
    "ermongroup": dict(norm1="norm1", conv1="conv1", emb_proj="temb_proj", norm2="norm2", conv2="conv2",
                       skip="nin_shortcut"),
    "guided": dict(norm1="in_layers.0", conv1="in_layers.2", emb_proj="emb_layers.1", norm2="out_layers.0",
                   conv2="out_layers.3", skip="skip_connection"),
}
_DOWNCONV = {"ermongroup": "conv", "guided": "op"}
_QKV = {"ermongroup": ("q", "k", "v"), "guided": ("qkv",)}
_PAD = {"ermongroup": 2, "guided": 1}  # trailing 1-dims of their attention projections: conv2d 1x1 / conv1d

@dataclasses.dataclass
class _Entry:
    """Our tensor `ours` <-> their tensors `theirs` (concatenated along dim 0 when several). pad: trailing
    singleton dims theirs carry; legacy_heads > 0: their fused qkv rows are in per-head [q, k, v] order
    (improved-diffusion) rather than our [q | k | v]."""
    ours: str
    theirs: tuple
    pad: int = 0
    legacy_heads: int = 0

    def to_ours(self, tensors):
        x = torch.cat([t.reshape(t.shape[:t.dim() - self.pad]) for t in tensors])
        if self.legacy_heads:  # rows (heads, 3, d) -> (3, heads, d)
            x = x.reshape(self.legacy_heads, 3, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        return x

    def to_theirs(self, x):
        if self.legacy_heads:  # rows (3, heads, d) -> (heads, 3, d)
            x = x.reshape(3, self.legacy_heads, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        return [t.reshape(*t.shape, *[1] * self.pad).clone() for t in x.chunk(len(self.theirs))]

def _label(cfg):
    name = next((n for n, c in PRESETS.items() if c == cfg), None)
    return f"'{name}'" if name else "(custom)"

def _entries(cfg, fmt):
    """The _Entry list mapping UNet(cfg)'s tensors to format fmt, and our state dict on the meta device. The
    'ldm' format is 'guided' under LDM's prefixes, plus the SpatialTransformers and the class embedder."""
    if fmt != "ermongroup" and cfg.qkv_layout not in ("legacy", "new"):
        raise ValueError(f"guided-diffusion and LDM files fuse the attention qkv, but config {_label(cfg)} "
                         f"has qkv_layout={cfg.qkv_layout!r}; pass --qkv-layout legacy (improved-diffusion, "
                         "LDM) or new (DDPM-IP)")
    if cfg.context_dim and fmt != "ldm":
        raise ValueError(f"config {_label(cfg)} has cross-attention (context_dim {cfg.context_dim}), which "
                         "only LDM model.ckpt files hold")
    ho = dict(scale_shift=False, resblock_updown=False, down_pad="asym", time_emb="sin_cos", num_heads=1,
              num_head_channels=-1, num_classes=0)
    wrong = {k: getattr(cfg, k) for k, v in ho.items() if getattr(cfg, k) != v}
    if fmt == "ermongroup" and wrong:
        raise ValueError(f"ermongroup/pesser files hold Ho et al.'s architecture; config {_label(cfg)} has "
                         f"{wrong}")
    with torch.device("meta"):
        net = UNet(cfg)
    ours, out, base = net.state_dict(), [], "guided" if fmt == "ldm" else fmt  # base: the blocks' names
    for mine, kind, place in _modules(cfg):
        theirs = _PATHS[fmt](place, cfg)
        if kind == "transformer":  # common.SpatialTransformer has LDM's attention.py names: passed through
            out += [_Entry(k, (theirs + k[len(mine):],)) for k in ours if k.startswith(mine + ".")]
            continue
        leaves = {"res": _RES[base], "downconv": {"conv": _DOWNCONV[base]}, "upconv": {"conv": "conv"},
                  "attn": {"norm": "norm"}}.get(kind, {"": ""})
        for p in ("weight", "bias"):
            if kind == "attn":
                pad = _PAD[base] if p == "weight" else 0
                heads = net.get_submodule(mine).heads if base == "guided" and cfg.qkv_layout == "legacy" else 0
                qkv = tuple(f"{theirs}.{q}.{p}" for q in _QKV[base])
                out.append(_Entry(f"{mine}.qkv.{p}", qkv, pad, heads))
                out.append(_Entry(f"{mine}.proj.{p}", (f"{theirs}.proj_out.{p}",), pad))
            for a, b in leaves.items():
                name = ".".join(filter(None, (mine, a, p)))
                if name in ours:  # a res block has a skip conv only where the channel count changes
                    out.append(_Entry(name, (".".join(filter(None, (theirs, b, p))),)))
    assert sorted(e.ours for e in out) == sorted(ours), "key table out of sync with common.UNet"
    return out, ours

def _check(sd, expected, fmt, cfg):
    """One-line ValueError unless sd has exactly the expected keys and shapes."""
    missing, extra = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    reshaped = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or extra or reshaped:
        detail = "; ".join(f"{len(ks)} {kind}, e.g. '{ks[0]}'" for kind, ks in (
            ("missing", missing), ("unexpected", extra), ("of another shape", reshaped)) if ks)
        raise ValueError(f"the file has {len(sd)} tensors in {fmt} format but config {_label(cfg)} expects "
                         f"{len(expected)} ({detail}); pass --preset with the model's architecture")

def from_original(sd, cfg: UNetConfig, fmt):
    """An ermongroup, guided or ldm state dict as UNet(cfg)'s (cfg.qkv_layout: a guided file's qkv order); ldm:
    the denoiser's tensors of a model.ckpt (split_ldm)."""
    entries, ours = _entries(cfg, fmt)
    _check(sd, {k: t for e in entries for k, t in zip(e.theirs, e.to_theirs(ours[e.ours]))}, fmt, cfg)
    return {e.ours: e.to_ours([sd[k] for k in e.theirs]) for e in entries}

def to_original(sd, cfg: UNetConfig, fmt):
    """UNet(cfg)'s state dict in ermongroup, guided or ldm names and layouts (the inverse of from_original)."""
    entries, ours = _entries(cfg, fmt)
    _check(sd, ours, "our", cfg)
    return {k: t for e in entries for k, t in zip(e.theirs, e.to_theirs(sd[e.ours]))}

def infer_format(sd):
    fmt = next((f for f, key in FORMATS.items() if key in sd), None)
    if fmt is None:
        raise ValueError(f"the file's {len(sd)} tensors (first '{next(iter(sd), None)}') have no ermongroup/"
                         "pesser, guided-diffusion or LDM names (diffusers folders load as --teacher)")
    return fmt

def config_from_ermongroup(sd) -> UNetConfig:
    """The architecture of a Ho et al. port from its keys. The file does not store the image size: Ho et
    al.'s attention at 16x16 (true of all released models) gives it. Dropout is unknown (0)."""
    try:
        ch, in_ch = sd["conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
        R = sum(1 for k in sd if k.startswith("down.0.block.") and k.endswith(".conv1.weight"))
        mult = tuple(sd[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        attn_levels = [i for i in range(levels) if f"down.{i}.attn.0.q.weight" in sd]
        out_ch = sd["conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a complete ermongroup/pesser state dict (no {e})") from None
    if not attn_levels:
        raise ValueError("the ermongroup/pesser file has no attention, so its image size is unknown; "
                         "pass --preset")
    size = 16 << attn_levels[0]
    return UNetConfig(image_size=size, in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=mult,
                      num_res_blocks=R, attn_resolutions=tuple(size >> i for i in attn_levels))

def infer_preset(sd, fmt):
    """The one U-Net preset whose tensor names and shapes in format fmt are sd's; ValueError otherwise."""
    def fits(cfg):
        try:
            entries, ours = _entries(cfg, fmt)
        except ValueError:  # the format cannot hold this architecture
            return False
        want = {k: t.shape for e in entries for k, t in zip(e.theirs, e.to_theirs(ours[e.ours]))}
        return want.keys() == sd.keys() and all(sd[k].shape == s for k, s in want.items())

    names = [n for n, cfg in PRESETS.items() if isinstance(cfg, UNetConfig) and fits(cfg)]
    if len(names) != 1:
        fit = f"the presets {names}" if names else "no preset"
        raise ValueError(f"the file's {len(sd)} tensors in {fmt} format fit {fit}; pass --preset NAME or a "
                         "JSON file of UNetConfig fields")
    return names[0]

def read_original(path):
    """The state dict in an original file: of ermongroup/ddim's training list [model, optimizer, epoch, step,
    ema], the last tensor dict (the EMA); of a Lightning checkpoint (LDM's model.ckpt), its 'state_dict';
    DataParallel's 'module.' prefix is dropped."""
    obj = R.read_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, (list, tuple)):
        dicts = [o for o in obj if isinstance(o, dict) and o and all(torch.is_tensor(v) for v in o.values())]
        obj = dicts[-1] if dicts else None
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (a dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj

def split_ldm(sd):
    """An LDM model.ckpt's state dict (ddpm.py LatentDiffusion) -> (its denoiser's tensors, the model_ema.*
    copy in place of model.diffusion_model.* when the file has one; its first_stage_model.*; whether the EMA
    was used). LitEma (ldm/modules/ema.py) holds model.<name> as model_ema.<name without dots>, decay and
    num_updates beside: the diffusion model's parameters only, not the class embedder's."""
    first = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    if not first:
        raise ValueError(f"the file's {len(sd)} tensors have no first_stage_model.*: an LDM model.ckpt holds "
                         "its autoencoder under first_stage_model.*")
    den = {k: v for k, v in sd.items() if k.startswith(("model.diffusion_model.", "cond_stage_model."))}
    ema = {k: v for k, v in sd.items() if k.startswith("model_ema.") and
           k not in ("model_ema.decay", "model_ema.num_updates")}
    if ema:
        shadow = {"model_ema." + k[len("model."):].replace(".", ""): k for k in den if k.startswith("model.")}
        if shadow.keys() != ema.keys():
            odd = next(iter(ema.keys() ^ shadow.keys()))
            raise ValueError(f"the file's model_ema.* ({len(ema)} tensors) is no copy of its "
                             f"model.diffusion_model.* ({len(shadow)}), e.g. '{odd}'")
        den.update({name: ema[key] for key, name in shadow.items()})
    return den, first, bool(ema)

def infer_autoencoder(first):
    """The one common.AUTOENCODERS config whose names and shapes are those of first_stage_model.* `first`."""
    shapes = {k[len("first_stage_model."):]: v.shape for k, v in first.items()}
    for name, cfg in AUTOENCODERS.items():
        with torch.device("meta"):
            want = VQModel(cfg).state_dict()
        if want.keys() == shapes.keys() and all(want[k].shape == shapes[k] for k in want):
            return name
    raise ValueError(f"the file's first_stage_model.* ({len(first)} tensors) fits no autoencoder of "
                     f"common.AUTOENCODERS ({', '.join(AUTOENCODERS)})")

def diffusion_of(name, out_channels, schedule=None, T=None, beta_start=None, beta_end=None, t_scale=None,
                 param=None, var=None, known=None):
    """(schedule spec, param, var) of a model of preset `name` (None: no preset): the flags where given,
    else `known` (the diffusion the file's format implies: LDM_DIFFUSION) or KNOWN[name]; 6 output channels
    mean learned-range variance (Nichol & Dhariwal eq. 15)."""
    known = known or KNOWN.get(name, {})
    if schedule is None and any(v is not None for v in (T, beta_start, beta_end, t_scale)):
        raise ValueError("--T, --beta-start, --beta-end and --t-scale go with --schedule linear|cosine")
    if schedule is None and not known:
        raise ValueError(f"no schedule is known for architecture {name or '(fitting no preset)'}; give it: "
                         "--schedule linear|cosine [--T 1000 --beta-start 1e-4 --beta-end 0.02 --t-scale 1], "
                         "--var")
    spec = known["schedule"] if schedule is None else dict(
        kind=schedule, T=T or 1000, t_scale=t_scale or 1.0,
        **(dict(beta_start=beta_start or 1e-4, beta_end=beta_end or 0.02) if schedule == "linear" else {}))
    var = var or known.get("var") or ("learned_range" if out_channels == 6 else None)
    if var is None:
        raise ValueError("the variance type is unknown: pass --var fixed_small or --var fixed_large")
    return Schedule(**spec).spec(), param or known.get("param", "eps"), var

def convert(src, dst, preset=None, qkv_layout=None, **diffusion):
    """Write the original checkpoint src as a project checkpoint dst; returns what it found.
    diffusion: the schedule flags of diffusion_of."""
    sd = read_original(src)
    fmt = infer_format(sd)
    if fmt == "ldm":
        ldm = sd
        sd, first, ema_used = split_ldm(ldm)
    if preset is not None and preset.endswith(".json"):
        with open(preset) as f:
            cfg = {"arch": "unet", **json.load(f)}
    elif preset is not None:
        cfg = preset
    else:
        try:
            cfg = infer_preset(sd, fmt)
        except ValueError:
            if fmt != "ermongroup":
                raise
            cfg = config_from_ermongroup(sd)
    with torch.device("meta"):
        net = build_net(cfg, qkv_layout=qkv_layout)
    if not isinstance(net, UNet):
        raise ValueError(f"--preset {preset} is not a U-Net")
    name = cfg if isinstance(cfg, str) else None
    spec, param, var = diffusion_of(name, net.config.out_channels, **diffusion,
                                    known=LDM_DIFFUSION if fmt == "ldm" else None)
    net.load_state_dict({k: v.float() for k, v in from_original(sd, net.config, fmt).items()}, assign=True)
    den = Denoiser(net, Schedule(**spec), param, var)
    found = dict(format=fmt, preset=name, params=sum(p.numel() for p in net.parameters()), schedule=spec,
                 param=param, var=var)
    extra = {}  # an LDM file's autoencoder, and which of its weights were converted
    if fmt == "ldm":
        # the file's own schedule buffer (ddpm.py register_schedule; float32: 1e-6 relative)
        if "alphas_cumprod" in ldm and not torch.allclose(
                ldm["alphas_cumprod"].double(), den.schedule.alphas_cumprod, rtol=1e-6, atol=0):
            raise ValueError(f"the file's alphas_cumprod is not that of the schedule {spec}")
        found.update(autoencoder=infer_autoencoder(first), ema_used=ema_used)
        den.autoencoder = R.autoencoder_from_ldm(first, AUTOENCODERS[found["autoencoder"]])  # a latent model
        extra = dict(ema_used=ema_used)
    R.save_checkpoint(dst, **den.state(), **extra, converted_from=os.path.abspath(src))
    print(f"{src} -> {dst}: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return found

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the original checkpoint (.pt, .pth, .ckpt, .bin or .safetensors)")
    p.add_argument("dst", help="the project checkpoint to write (then pass it as --teacher)")
    p.add_argument("--preset", help="the architecture: a U-Net preset of common.PRESETS or a JSON file of "
                                    "UNetConfig fields (default: the one preset the file's tensors fit)")
    p.add_argument("--qkv-layout", choices=("legacy", "new"),
                   help="a guided file's fused qkv order (default: the preset's; improved-diffusion: legacy)")
    p.add_argument("--schedule", choices=("linear", "cosine"),
                   help="the noise schedule (default: KNOWN's; an LDM file's: LDM_DIFFUSION)")
    p.add_argument("--T", type=int, help="with --schedule: training timesteps (1000)")
    p.add_argument("--beta-start", type=float, help="with --schedule linear: the first beta (1e-4)")
    p.add_argument("--beta-end", type=float, help="with --schedule linear: the last beta (0.02)")
    p.add_argument("--t-scale", type=float,
                   help="with --schedule: network time per timestep (1; improved-diffusion: 1000/T)")
    p.add_argument("--param", choices=("eps", "x", "v"), help="what the network predicts (default: eps)")
    p.add_argument("--var", choices=("fixed_small", "fixed_large", "learned_range"),
                   help="the variance of ancestral steps (default: KNOWN's; learned_range for 6 outputs)")
    return convert(**vars(p.parse_args(argv)))

if __name__ == "__main__":
    R.cli(main)
