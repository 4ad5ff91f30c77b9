"""The machinery of a run, beside the core (common.py): flags, devices and many GPUs (torchrun, DDP, rank-0
writes, seed sharding), the run contract (config.json, log.jsonl, ckpt.pt, metrics.json, resume, one writer,
rehearsal), checkpoints, teacher and hub loading, data, evaluation and FID, Alg. 1 training and the cached
teachers. Method files import it as a module (`import runtime as R`: R.barrier(), R.fid_is(...)), so every
call says where it comes from; it imports the core, the core imports nothing of it."""
import argparse, atexit, copy, dataclasses, datetime, functools, gc, glob, hashlib, json, math, os, pickle
import platform, re, shutil, signal, socket, sys, tarfile, time, warnings, zipfile
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from common import (AUTOENCODERS, Denoiser, PARAMS, PRESETS, Schedule, UNet, UNetConfig, VQConfig, VQModel,
                    WEIGHTINGS, autocast, bcast, build_net, ddim_sample, ema_update, lr_at,
                    sampler_times, seeded_noise, to_float, to_uint8, vlb_terms, weighted_loss)

# Where downloads, datasets and the cached teachers live (DISTILL_CACHE overrides it).
CACHE_DIR = os.environ.get("DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill-ref"))
PARENT = os.getppid()  # at start-up: a torchrun worker's launcher (stop_with_launcher)

# =========================================== teachers ===========================================
# load_teacher(spec) reads what users pass as --teacher: a checkpoint of this project, a diffusers UNet2DModel
# folder or a hub id (google/ddpm-cifar10-32 and the DDPM family). Original ermongroup/pesser and
# guided-diffusion files are converted once, by tools/convert_teacher.py, into checkpoints of this project.

# UNet2DModel.__init__ defaults (diffusers 0.42) for the keys a config.json leaves out ...
_DIFFUSERS_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, downsample_padding=1, downsample_type="conv",
    upsample_type="conv", dropout=0.0, attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default")
# ... and the keys whose default is the only value our U-Net implements
_DIFFUSERS_FIXED = dict(
    _class_name="UNet2DModel", act_fn="silu", center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, add_attention=True,
    class_embed_type=None)

def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Our UNetConfig for a diffusers UNet2DModel config.json (DDPM and ADM block types). A missing key takes
    diffusers' default (attention_head_dim: 8 channels per head); attention_head_dim null is one head."""
    c = {**_DIFFUSERS_DEFAULTS, **config}

    def need(ok, what):
        if not ok:
            raise ValueError(f"unsupported diffusers UNet config: {what}")

    for key, want in _DIFFUSERS_FIXED.items():
        need(c.get(key, want) == want, f"{key}={c.get(key)!r} (need {want!r})")
    chans, size, groups = list(c["block_out_channels"]), c["sample_size"], c["norm_num_groups"]
    shift, pad, L = c["resnet_time_scale_shift"], c["downsample_padding"], len(c["block_out_channels"])
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    need(isinstance(size, int), f"sample_size={size!r} (need one int)")
    need(shift in ("default", "scale_shift") and pad in (0, 1), f"{shift=}, downsample_padding={pad}")
    need(c["attn_norm_num_groups"] == groups or (c["attn_norm_num_groups"] is None and shift == "default"),
         f"attn_norm_num_groups={c['attn_norm_num_groups']} with {shift=} (set it to {groups})")
    emb = {(False, 1): "sin_cos", (True, 0): "cos_sin"}.get((c["flip_sin_to_cos"], c["freq_shift"]))
    need(emb, f"flip_sin_to_cos={c['flip_sin_to_cos']}, freq_shift={c['freq_shift']} (False, 1 or True, 0)")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    kinds = dict(DownBlock2D="conv", ResnetDownsampleBlock2D="resnet", AttnDownBlock2D=c["downsample_type"],
                 UpBlock2D="conv", ResnetUpsampleBlock2D="resnet", AttnUpBlock2D=c["upsample_type"])
    need(len(down) == L == len(up) and all(t in kinds and "Down" in t for t in down)
         and all(t in kinds and "Up" in t for t in up), f"{L} levels, block types {down} / {up}")
    resample = {kinds[t] for t in down[:-1] + up[:-1]}  # the last block of each path does not resample
    need(len(resample) <= 1 and resample <= {"conv", "resnet"}, f"mixed or unknown resampling {resample}")
    return UNetConfig(  # attention where the down block has it (the up path mirrors it or the weights misfit)
        image_size=size, in_channels=c["in_channels"], out_channels=c["out_channels"], ch=chans[0],
        ch_mult=tuple(x // chans[0] for x in chans), num_res_blocks=c["layers_per_block"],
        attn_resolutions=tuple(size >> i for i in range(L) if down[i].startswith("Attn")), num_heads=1,
        num_head_channels=c["attention_head_dim"] or -1, dropout=c["dropout"], scale_shift=shift != "default",
        resblock_updown=resample == {"resnet"}, down_pad="sym" if pad else "asym", time_emb=emb,
        norm_eps=c["norm_eps"], norm_groups=groups, num_classes=c.get("num_class_embeds") or 0)

# Our tensor names -> diffusers UNet2DModel's, replaced in order in "." + name + "." (a resampler is a conv
# or, in ADM, a res block); our fused attention qkv is [to_q; to_k; to_v]
_DIFFUSERS_NAMES = (
    (".time_mlp.0.", ".time_embedding.linear_1."), (".time_mlp.2.", ".time_embedding.linear_2."),
    (".norm_out.", ".conv_norm_out."), (".mid_res1.", ".mid_block.resnets.0."),
    (".mid_res2.", ".mid_block.resnets.1."), (".mid_attn.", ".mid_block.attentions.0."),
    (".down.", ".down_blocks."), (".up.", ".up_blocks."), (".res.", ".resnets."), (".attn.", ".attentions."),
    (".emb_proj.", ".time_emb_proj."), (".skip.", ".conv_shortcut."), (".norm.", ".group_norm."),
    (".proj.", ".to_out.0."), (".label_emb.", ".class_embedding."))
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

def from_diffusers(sd, cfg: UNetConfig):
    """A diffusers UNet2DModel state dict as UNet(cfg)'s: the same tensors, renamed (old files' attention
    names too), q, k and v concatenated into our qkv. One-line ValueError unless names and shapes match."""
    for old, new in _OLD_ATTENTION.items():
        sd = {k.replace(old, new): v for k, v in sd.items()}

    def theirs(key):  # e.g. up.1.resample.conv.weight -> up_blocks.1.upsamplers.0.conv.weight
        name = f".{key}."
        for a, b in _DIFFUSERS_NAMES:
            name = name.replace(a, b)
        name = name[1:-1].replace("resample", f"{key.split('.')[0]}samplers.0")
        return [name.replace(".qkv.", f".to_{c}.") for c in "qkv"] if ".qkv." in name else [name]

    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
    names = {key: theirs(key) for key in ours}
    want = {n: (t.shape[0] // len(names[k]), *t.shape[1:]) for k, t in ours.items() for n in names[k]}
    missing, extra = [n for n in want if n not in sd], [n for n in sd if n not in want]
    reshaped = [n for n in want if n in sd and tuple(sd[n].shape) != want[n]]
    if missing or extra or reshaped:
        detail = "; ".join(f"{len(ks)} {kind}, e.g. '{ks[0]}'" for kind, ks in (
            ("missing", missing), ("unexpected", extra), ("of another shape", reshaped)) if ks)
        raise ValueError(f"the diffusers weights have {len(sd)} tensors, config.json describes {len(want)} "
                         f"({detail})")
    return {key: torch.cat([sd[n] for n in ns]) for key, ns in names.items()}

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

def read_safetensors(path) -> dict:
    """A .safetensors file without the safetensors package: u64 little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...}, then the raw tensor bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, out = json.loads(f.read(n)), {}
        for name, info in header.items():
            if name != "__metadata__":
                dtype, (begin, end) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
                f.seek(8 + n + begin)
                buf = bytearray(f.read(end - begin))  # frombuffer refuses an empty buffer
                out[name] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)) \
                    .view(info["shape"])
    return out

def read_file(path, what="file"):
    """A .json, .safetensors or torch file (weights_only=True: tensors and plain data only, so that a file
    cannot run code); a one-line ValueError if it is missing, truncated or corrupt."""
    path = os.fspath(path)
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return read_safetensors(path) if path.endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except Exception as e:  # truncated, corrupt, or a pickle of more than tensors and plain data
        why = "not tensors and plain data; other objects are not unpickled, they could run code" if \
            isinstance(e, pickle.UnpicklingError) else (str(e) or "empty or truncated").splitlines()[0]
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {why})") from None

def hub_download(repo_id, filename, cache_dir=None, revision="main"):
    """Path of a cached copy of https://huggingface.co/{repo_id}/resolve/{revision}/{filename}
    (HF_ENDPOINT overrides the host), downloaded once (atomically) without huggingface_hub."""
    dest = os.path.join(cache_dir or f"{CACHE_DIR}/hub", repo_id.replace("/", "--"), revision, filename)
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return download(f"{host}/{repo_id}/resolve/{revision}/{filename}", dest, what=f"{repo_id}/{filename}")

def diffusers_file(spec, name, sub, model, required=True, pipeline=False):
    """Path of file `name` of a diffusers folder (at its top or in `sub`/) or hub id (at its top, in `sub`/ if
    `pipeline`, as CompVis/ldm-celebahq-256; downloaded once by hub_download); None if absent and not
    `required`. model: what needs it, for the error."""
    try:
        path = hub_download(spec, f"{sub}/{name}" if pipeline else name) if not os.path.isdir(spec) else \
            next((p for p in (f"{spec}/{name}", f"{spec}/{sub}/{name}") if os.path.isfile(p)), None)
    except ValueError as e:  # a failed download
        if required:
            raise ValueError(f"{spec} is no local file or folder; as a hub id: {e}") from None
        return None
    if path is None and required:
        raise ValueError(f"{spec} has no {name} (nor {sub}/{name}), which a diffusers {model} needs")
    return path

def load_diffusers(spec):
    """A Denoiser of a diffusers UNet2DModel: a folder (model files at the top or in unet/, the scheduler's at
    the top or in scheduler/; .safetensors, else .bin) or a hub id laid out as google/ddpm-cifar10-32."""
    find = functools.partial(diffusers_file, spec, model="UNet2DModel")
    cfg = unet_config_from_diffusers(read_file(find("config.json", "unet")))
    net = UNet(cfg)
    weights = find("diffusion_pytorch_model.safetensors", "unet", required=False) or \
        find("diffusion_pytorch_model.bin", "unet")
    net.load_state_dict(from_diffusers(read_file(weights), cfg))
    s = {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
         "trained_betas": None, "prediction_type": "epsilon", "variance_type": "fixed_small",
         **read_file(find("scheduler_config.json", "scheduler"))}
    kinds = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    kind = kinds.get(s["beta_schedule"])
    param = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}.get(s["prediction_type"])
    learned = cfg.out_channels == 2 * cfg.in_channels
    var = "learned_range" if learned else s["variance_type"].removesuffix("_log")
    if not kind or not param or s["trained_betas"] is not None or \
            var not in (("learned_range",) if learned else ("fixed_small", "fixed_large")):
        raise ValueError(f"unsupported diffusers scheduler: beta_schedule={s['beta_schedule']!r}, "
                         f"prediction_type={s['prediction_type']!r}, variance_type={s['variance_type']!r} "
                         "or trained_betas")
    betas = dict(beta_start=s["beta_start"], beta_end=s["beta_end"]) if "linear" in kind else {}
    return Denoiser(net, Schedule(kind, s["num_train_timesteps"], **betas), param, var, source=spec)

def load_teacher(spec, device="cpu"):
    """Any model as a frozen Denoiser (a teacher, or a student with its recorded sampler): a checkpoint of this
    project (its EMA weights if any), a diffusers folder or a hub id (its clip_sample is dropped: DDIM
    teachers run unclipped)."""
    parts = spec.split("/")  # a hub id: 'owner/name', no relative or absolute path, no file extension
    is_hub_id = len(parts) == 2 and all(p[:1] not in ("", ".", "~") for p in parts) and \
        not os.path.splitext(spec)[1] and not os.path.exists(spec)
    if os.path.isdir(spec) or is_hub_id:
        return load_diffusers(spec).to(device).freeze()
    if not os.path.isfile(spec):
        raise ValueError(f"{spec}: no such file or folder (a teacher is a checkpoint of this project, a "
                         "diffusers folder or a hub id like google/ddpm-cifar10-32)")
    return Denoiser.from_state(load_checkpoint(spec), spec).to(device)

def pixel_teacher(den, method):
    """A method that reads or writes images (data, uint8 targets) refuses a latent teacher in one line."""
    if den.autoencoder is not None:
        raise ValueError(f"{den.source} is a latent model (LDM): {method} runs in pixel space here; latent "
                         "teachers distil with self_distill.py and dkdm.py, as in their papers")
    return den

# ===================================== latent autoencoders ======================================
# The VQ autoencoder of a latent-diffusion teacher (common.VQModel): from an LDM model.ckpt, which holds it as
# first_stage_model.*, or from a diffusers VQModel (the vqvae/ of CompVis/ldm-celebahq-256).

def _load_exactly(net, sd, what):
    """net with state dict sd loaded; a one-line ValueError unless the names and shapes match."""
    want = net.state_dict()
    missing, extra = [k for k in want if k not in sd], [k for k in sd if k not in want]
    reshaped = [k for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or extra or reshaped:
        detail = "; ".join(f"{len(ks)} {kind}, e.g. '{ks[0]}'" for kind, ks in (
            ("missing", missing), ("unexpected", extra), ("of another shape", reshaped)) if ks)
        raise ValueError(f"{what} does not fit {type(net).__name__}({net.config}): {detail}")
    net.load_state_dict(sd)
    return net

def autoencoder_from_ldm(sd, cfg=AUTOENCODERS["vq_f4"]) -> VQModel:
    """The VQModel(cfg) of an LDM checkpoint ({'state_dict': ...}) or state dict: its first_stage_model.*
    tensors with the prefix stripped (LDM LatentDiffusion.first_stage_model; DKDM's extract_ae.py does the
    same). cfg: the ddconfig of the checkpoint's config.yaml, the f4 one by default."""
    sd = sd.get("state_dict", sd)
    prefix = "first_stage_model."
    ours = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not ours:
        raise ValueError(f"the state dict ({len(sd)} tensors, e.g. {next(iter(sd), None)!r}) has no "
                         "first_stage_model.* (an LDM model.ckpt holds its autoencoder there)")
    return _load_exactly(VQModel(cfg), ours, "the LDM first_stage_model")

def vq_config_from_diffusers(config: dict) -> VQConfig:
    """Our VQConfig for a diffusers VQModel config.json. Its scaling_factor is ignored: the latents are used
    unscaled (LDM's scale_factor 1.0). The hub's vqvae/config.json of CompVis/ldm-celebahq-256 lacks the key,
    and diffusers' default 0.18215 makes LDMPipeline decode garbage (diffusers issue #6725)."""
    c = {"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "act_fn": "silu", "latent_channels": 3,
         "sample_size": 32, "num_vq_embeddings": 256, "norm_num_groups": 32, "vq_embed_dim": None,
         "norm_type": "group", "mid_block_add_attention": True, **config}  # VQModel.__init__'s defaults
    down, up, chans = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    attn = [t.startswith("Attn") for t in down]
    kinds_ok = all(t in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D") for t in down) and \
        all(t in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D") for t in up) and \
        [t.startswith("Attn") for t in up[::-1]] == attn and len(down) == len(chans)
    fixed = (c["act_fn"], c["norm_num_groups"], c["norm_type"], c["mid_block_add_attention"])
    if not kinds_ok or fixed != ("silu", 32, "group", True):
        raise ValueError(f"unsupported diffusers VQModel config: block types {down} / {up} (the decoder's "
                         "mirroring the encoder's), act_fn, norm_num_groups, norm_type, "
                         f"mid_block_add_attention {fixed} (need ('silu', 32, 'group', True))")
    size = c["sample_size"][0] if isinstance(c["sample_size"], (list, tuple)) else c["sample_size"]
    return VQConfig(resolution=size, in_channels=c["in_channels"], out_ch=c["out_channels"], ch=chans[0],
                    ch_mult=tuple(x // chans[0] for x in chans), num_res_blocks=c["layers_per_block"],
                    attn_resolutions=tuple(size >> i for i, a in enumerate(attn) if a),
                    z_channels=c["latent_channels"], embed_dim=c["vq_embed_dim"] or c["latent_channels"],
                    n_embed=c["num_vq_embeddings"])

# Our VQModel tensor names -> diffusers', replaced in order in "." + name + "." (after the levels' indices)
_VQ_DIFFUSERS_NAMES = (
    (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.", ".mid_block.attentions.0."), (".block.", ".resnets."), (".attn.", ".attentions."),
    (".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
    (".nin_shortcut.", ".conv_shortcut."), (".norm_out.", ".conv_norm_out."), (".norm.", ".group_norm."),
    (".q.", ".to_q."), (".k.", ".to_k."), (".v.", ".to_v."), (".proj_out.", ".to_out.0."))

def autoencoder_from_diffusers(sd, cfg: VQConfig) -> VQModel:
    """VQModel(cfg) with a diffusers VQModel's state dict: renamed (old files' attention names too), the
    decoder's levels reversed (diffusers' up_blocks run from the lowest resolution, taming's `up` list from
    the highest), the attention Linears as taming's 1x1 convs. One-line ValueError unless they match."""
    for old, new in _OLD_ATTENTION.items():
        sd = {k.replace(old, new): v for k, v in sd.items()}
    L = len(cfg.ch_mult)

    def theirs(key):  # e.g. decoder.up.0.block.2.nin_shortcut.weight -> decoder.up_blocks.{L-1}.resnets.2...
        name = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{L - 1 - int(m[1])}.", key)
        name = "." + name.replace("encoder.down.", "encoder.down_blocks.") + "."
        for a, b in _VQ_DIFFUSERS_NAMES:
            name = name.replace(a, b)
        return name[1:-1]

    ae = VQModel(cfg)
    ours = ae.state_dict()
    names = {theirs(key): key for key in ours}
    renamed = {}
    for name, t in sd.items():
        key = names.get(name, name)  # a name we lack stays: _load_exactly reports it
        renamed[key] = t[..., None, None] if t.dim() == 2 and key in ours and ours[key].dim() == 4 else t
    return _load_exactly(ae, renamed, "the diffusers VQModel weights")

def load_autoencoder(spec, cfg=AUTOENCODERS["vq_f4"]) -> VQModel:
    """A latent teacher's autoencoder, frozen: a checkpoint of this project (save_checkpoint(path,
    net_config=net_config(ae), model=ae.state_dict())), an LDM model.ckpt (its first_stage_model.*, of
    ddconfig cfg), a diffusers VQModel folder (config.json and weights at the top or in vqvae/) or the hub id
    of a pipeline with a vqvae/ (CompVis/ldm-celebahq-256)."""
    if os.path.isfile(spec):
        state = read_file(spec, "checkpoint")
        if state.get("format") != CKPT_FORMAT:
            return autoencoder_from_ldm(state, cfg).eval().requires_grad_(False)
        arch = state.get("net_config", {}).get("arch")
        if arch != "vq":
            raise ValueError(f"{spec} is a checkpoint of this project but no autoencoder's (arch {arch!r})")
        ae = _load_exactly(build_net(state["net_config"]), state["model"], spec)
    else:
        find = functools.partial(diffusers_file, spec, sub="vqvae", model="VQModel", pipeline=True)
        cfg = vq_config_from_diffusers(read_file(find("config.json")))
        weights = find("diffusion_pytorch_model.safetensors", required=False) or \
            find("diffusion_pytorch_model.bin")
        ae = autoencoder_from_diffusers(read_file(weights), cfg)
    return ae.eval().requires_grad_(False)

# ============================================= data =============================================

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DATASETS = "cifar10, shapes, folder:PATH, imagenet64:PATH or lsun:PATH"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()

def download(url, path, md5=None, what="file"):
    """Fetch url to path once (temp file then rename: a file that exists is whole), with progress; one-line
    errors. Every rank calls it: under torchrun each node's first process fetches (a cache folder that nodes
    share is written whole by whichever renames last) while the others wait (wait_for_fetchers)."""
    if local_rank() > 0:
        wait_for_fetchers()
    if not os.path.exists(path):  # a file there is whole (renamed once complete, md5-checked before)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp, t0 = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp", time.time()
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total, done = int(r.headers.get("Content-Length") or 0), 0
                for block in iter(lambda: r.read(1 << 20), b""):
                    done += f.write(block)
                    progress(f"downloading {what}", done >> 20, total >> 20, t0, " MB/s")
            if md5 is not None and _md5(tmp) != md5:
                raise OSError(f"the wrong md5, expected {md5}")
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise ValueError(f"could not download {url} ({e}); fetch it by hand and place it at {path}") \
                from None
        os.replace(tmp, path)
    if local_rank() == 0:
        wait_for_fetchers()
    return path

def load_cifar10(data_dir, split="train"):
    """CIFAR-10 from the official python tarball (md5-checked, cached): uint8 (N, 3, 32, 32), labels (N,)."""
    path = download(CIFAR10_URL, os.path.join(data_dir, "cifar-10-python.tar.gz"), CIFAR10_MD5, "CIFAR-10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers()}
            batches = [pickle.load(tar.extractfile(members[n]), encoding="bytes") for n in names]
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([b[b"labels"] for b in batches]).astype(np.int64)
        return torch.from_numpy(images), torch.from_numpy(labels)
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not the CIFAR-10 python tarball ({type(e).__name__}: {e}); delete it to "
                         "download it again") from None

def image_tree(path):
    """The images below a folder, sorted, and where every image sits in a first-level subfolder their labels:
    the index of that subfolder among those sorted (torchvision's ImageFolder; for an ILSVRC2012 tree the
    sorted wnids, TFDS imagenet2012's label order). Returns (files, labels int64 or None, classes or None)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found below {path!r}")
    top = [os.path.relpath(f, path).split(os.sep) for f in files]
    if any(len(parts) == 1 for parts in top):
        return files, None, None
    classes = {c: i for i, c in enumerate(sorted({parts[0] for parts in top}))}
    return files, np.array([classes[parts[0]] for parts in top], dtype=np.int64), len(classes)

def _bicubic_square(im, size):
    """folder:'s centre square ((side - short side) // 2 off), resized with PIL's bicubic: (S, S, 3)."""
    from PIL import Image
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC))

def tf_resize_weights(n, size, method):
    """(size, n) weights resizing an axis of n pixels to size as TF2's tf.image.resize (half-pixel centres).
    'area' (ResizeArea): each output pixel the mean over its footprint of n / size input pixels, one partly
    covered weighted by the covered fraction. PIL's Image.BOX counts such a pixel wholly or not at all (by its
    centre), so it equals TF's 'area' only where size divides n; hence these weights. 'bilinear' with
    antialias=True (scale_and_translate): the triangle kernel widened by the reduction factor, the kernel of
    PIL's BILINEAR when reducing (there in fixed point)."""
    scale = n / size
    if method == "area":
        start = np.arange(size)[:, None] * scale
        w = np.clip(np.minimum(start + scale, np.arange(1, n + 1)) - np.maximum(start, np.arange(n)), 0, None)
    else:  # "bilinear"
        centre = (np.arange(size)[:, None] + 0.5) * scale
        w = np.clip(1 - np.abs(np.arange(n) + 0.5 - centre) / max(scale, 1.0), 0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)

def tf_central_square(im, size, method):
    """Progressive distillation's preprocessing (GR-PD datasets.py): decode_and_central_square_crop (the
    square of the short side, h // 2 - w // 2 off along the long one), tf.image.resize(.., method), clipped
    to [0, 255]. Rounded to uint8 here (GR-PD keeps the floats: at most half a level apart); PIL's JPEG
    decoder may differ from TF's by a level. (S, S, 3)."""
    w, h = im.size
    s = min(w, h)
    top, left = (h // 2 - w // 2, 0) if h > w else (0, w // 2 - h // 2)
    x = np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.float32)
    a = tf_resize_weights(s, size, method)
    x = a @ (a @ x.reshape(s, s * 3)).reshape(size, s, 3)  # rows, then columns
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)

def read_images(files, size, resize, out):
    """Each file decoded to RGB and resize(image, size) into out[i] (N, 3, S, S), in threads (PIL's decoders
    and numpy release the GIL); a file that is no image: a one-line ValueError. Returns None (no labels)."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def read(f):
        try:
            with Image.open(f) as im:
                return resize(im.convert("RGB"), size).transpose(2, 0, 1)
        except OSError as e:
            raise ValueError(f"{f} is not a readable image ({e}); remove it") from None
    t0, chunk = time.time(), 1024
    with ThreadPoolExecutor() as pool:
        for i in range(0, len(files), chunk):
            out[i:i + chunk] = list(pool.map(read, files[i:i + chunk]))
            progress("decoding images", min(i + chunk, len(files)), len(files), t0, " images/s")

def cached_images(name, key, size, count, fill):
    """uint8 images (count(), 3, size, size) that fill(out) writes (returning their labels or None), made once
    into CACHE_DIR/data/{name}_{key}.npy (and _labels.npy): written to a temporary name and renamed (the
    images last, so a file there is whole; delete it to make it again), then memory-mapped copy-on-write, so
    that the processes of a node share its pages. As download(): each node's first process makes it (count and
    fill run only there), the others wait. Returns (images, labels or None) as tensors."""
    path = os.path.join(CACHE_DIR, "data", f"{name}_{key}.npy")
    labels_path = path[:-4] + "_labels.npy"
    if local_rank() > 0:
        wait_for_fetchers()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (count(), 3, size, size))
        try:
            labels = fill(out)
            out.flush()
            if labels is not None:
                np.save(tmp + ".npy", labels)
                os.replace(tmp + ".npy", labels_path)
        except BaseException:
            os.remove(tmp)
            raise
        os.replace(tmp, path)
    if local_rank() == 0:
        wait_for_fetchers()
    labels = torch.from_numpy(np.load(labels_path)) if os.path.exists(labels_path) else None
    return torch.from_numpy(np.load(path, mmap_mode="c")), labels

def _key(*parts):
    """A short hash of values (paths, sizes, times): a cached file's name."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]

def load_folder(path, image_size):
    """Every image below a folder, centre-cropped to a square and resized (PIL bicubic): uint8 (N, 3, S, S),
    and labels from class subfolders or None (image_tree)."""
    files, labels, _ = image_tree(path)
    images = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    read_images(files, image_size, _bicubic_square, images)
    return torch.from_numpy(images), None if labels is None else torch.from_numpy(labels)

def imagenet64_batches(path):
    """Chrabaszcz et al. 2017's downsampled-ImageNet train files in a folder (train_data_batch_1..10, pickled
    or .npz), in their order; [] where there are none."""
    found = [(int(m.group(1)), f) for f in os.listdir(path)
             if (m := re.fullmatch(r"train_data_batch_(\d+)(\.npz)?", f))]
    return [os.path.join(path, f) for _, f in sorted(found)]

def read_imagenet64_batch(path):
    """One downsampled-ImageNet 64x64 file (a pickled dict, or .npz): its `data` rows uint8 (N, 12288) stored
    planar (the R, G, B planes of 64x64, row-major, as CIFAR-10's) as (N, 3, 64, 64), and its 1-indexed
    `labels` as 0..999."""
    try:
        if path.endswith(".npz"):
            with np.load(path) as f:
                data, labels = f["data"], f["labels"]
        else:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays too
            data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a downsampled-ImageNet file ({type(e).__name__}: {e})") from None
    if data.dtype != np.uint8 or data.shape[1:] != (3 * 64 * 64,) or labels.shape != data.shape[:1]:
        raise ValueError(f"{path}: data {data.dtype} {data.shape} with {labels.size} labels; expected uint8 "
                         "(N, 12288) and N labels (the 64x64 files of Chrabaszcz et al.)")
    if labels.size and not 1 <= labels.min() <= labels.max() <= 1000:
        raise ValueError(f"{path}: labels {labels.min()}..{labels.max()} outside 1..1000 (these files' "
                         "labels are 1-indexed)")
    return data.reshape(-1, 3, 64, 64), labels.astype(np.int64) - 1

def _imagenet64_tree(path):
    """An ILSVRC2012-style tree's files, labels and class count (image_tree): every image in a class."""
    files, labels, classes = image_tree(path)
    if labels is None:
        raise ValueError(f"imagenet64:{path}: expected class subfolders (n01440764/*.JPEG, ...) or "
                         "train_data_batch_1..10 files; found images directly in it")
    return files, labels, classes

def load_imagenet64(path):
    """Class-conditional ImageNet 64x64: uint8 (N, 3, 64, 64) and labels (N,), from a folder holding either
    (a) the ILSVRC2012 train images in class subfolders (n01440764/*.JPEG, ...; labels the index among the
        sorted wnids, TFDS imagenet2012's: 1000 classes) through progressive distillation's official pipeline,
        what the paper trained on (GR-PD datasets.py: TFDS imagenet2012, decode_and_central_square_crop,
        tf.image.resize(.., 64, 'area'); tf_central_square), or
    (b) Chrabaszcz et al. 2017's downsampled ImageNet (train_data_batch_1..10, pickled or .npz, labels
        1..1000): close, not identical (their box resize of the whole image, no crop).
    Made once into CACHE_DIR/data and memory-mapped (cached_images): the 1,281,167 images are 15.7 GB of
    uint8; decoding the JPEG tree takes hours of a node's cores."""
    batches = imagenet64_batches(path)
    if batches:
        def fill(out):
            labels, i = [], 0
            for f in batches:
                images, y = read_imagenet64_batch(f)
                out[i:i + len(images)], i = images, i + len(images)
                labels.append(y)
            return np.concatenate(labels)
        key = _key([(os.path.realpath(f), os.path.getsize(f), os.path.getmtime(f)) for f in batches])
        count = lambda: sum(len(read_imagenet64_batch(f)[1]) for f in batches)  # a first pass, once
        return cached_images("imagenet64_batches", key, 64, count, fill)
    files, labels, _ = _imagenet64_tree(path)
    area = functools.partial(tf_central_square, method="area")
    images, _ = cached_images("imagenet64", _key(os.path.realpath(path), files), 64, lambda: len(files),
                              functools.partial(read_images, files, 64, area))
    return images, torch.from_numpy(labels)

def load_lsun(path, image_size):
    """LSUN (bedroom, church_outdoor) as progressive distillation's official code reads TFDS lsun/...: the
    central square, tf.image.resize(.., antialias=True) (bilinear, widened when reducing; tf_central_square)
    to image_size (the paper's 128); unlabelled. path: a folder of the images, e.g. exported from the LMDB
    with the official LSUN tools (fyu/lsun: python3 data.py export <db> --out_dir <dir> --flat), which is not
    repeated here. Made once into CACHE_DIR/data and memory-mapped (cached_images): bedroom's 3,033,042 images
    are 149 GB at 128x128 (church_outdoor's 126,227: 6.2 GB), more than a GPU holds: keep them on the CPU,
    sample_batch moves each batch. uint8 (N, 3, S, S)."""
    files = image_tree(path)[0]
    bilinear = functools.partial(tf_central_square, method="bilinear")
    return cached_images(f"lsun{image_size}", _key(os.path.realpath(path), files), image_size,
                         lambda: len(files), functools.partial(read_images, files, image_size, bilinear))[0]

def make_shapes(n, image_size=32, seed=0, labels=False):
    """A procedural dataset: one to three filled circles, squares or triangles in saturated colours on a
    two-colour gradient background. Image i depends only on (seed, i). uint8 (n, 3, S, S); with labels=True
    also each image's class (n,): the kind of its last shape, drawn on top of the others (0 circle, 1 square,
    2 triangle)."""
    s = image_size
    yy, xx = np.meshgrid((np.arange(s) + 0.5) / s, (np.arange(s) + 0.5) / s, indexing="ij")
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    kinds = np.empty(n, dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        c0, c1 = rng.uniform(0.0, 0.5, 3), rng.uniform(0.0, 0.5, 3)
        angle = rng.uniform(0, 2 * np.pi)
        g = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.71) / 1.42
        img = c0 + g[..., None] * (c1 - c0)
        for _ in range(rng.integers(1, 4)):
            colour = rng.uniform(0.5, 1.0, 3) * (rng.uniform(size=3) < 0.7) + 0.1
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            dx, dy = xx - cx, yy - cy
            masks = (dx ** 2 + dy ** 2 < r ** 2, (abs(dx) < r * 0.8) & (abs(dy) < r * 0.8),  # circle, square,
                     (dy < r * 0.7) & (dy > -r + 2 * abs(dx)))                              # triangle
            kinds[i] = rng.integers(3)
            img[masks[kinds[i]]] = colour
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return (images, torch.from_numpy(kinds)) if labels else images

_shapes = functools.lru_cache(maxsize=4)(make_shapes)

def _dataset(name):
    """(kind, path) of a --data value; a one-line ValueError for an unknown one or a missing folder."""
    kind, colon, path = name.partition(":")
    if not (kind in ("cifar10", "shapes") and not colon or kind in ("folder", "imagenet64", "lsun") and path):
        raise ValueError(f"unknown dataset {name!r}: expected {DATASETS}")
    if path and not os.path.isdir(path):
        raise ValueError(f"--data {name}: no such folder")
    return kind, path

FIXED_SIZE = {"cifar10": 32, "imagenet64": 64}  # datasets of one image size (the others: any, resized)

def dataset_size(name):
    """The one image size of --data `name` (cifar10: 32, imagenet64: 64), None where any size is made."""
    return FIXED_SIZE.get(_dataset(name)[0])

def dataset_classes(name):
    """The number of classes of --data `name` (its labels are 0 .. n-1), None where it has no labels. Checks
    the name, before any work: reads a folder's listing, no image."""
    kind, path = _dataset(name)
    if kind == "folder":
        return image_tree(path)[2]
    if kind == "imagenet64":
        return 1000 if imagenet64_batches(path) else _imagenet64_tree(path)[2]
    return {"cifar10": 10, "shapes": 3, "lsun": None}[kind]

def load_dataset(name, image_size=None, data_dir=None, n_shapes=20000, seed=0, labels=False):
    """A whole dataset as a uint8 tensor (N, 3, S, S) on the CPU (move it to the device once: CIFAR-10 is
    150 MB; imagenet64 and lsun are memory-mapped), with labels=True (images, labels): int64 (N,) class
    indices (dataset_classes says how many), or None where the dataset has none. name: 'cifar10' (32x32 train
    split), 'shapes' (the kind of the top-most shape), 'folder:PATH' (labels from class subfolders),
    'imagenet64:PATH' (load_imagenet64) or 'lsun:PATH' (load_lsun, 128x128 unless image_size)."""
    kind, path = _dataset(name)
    if image_size is not None and image_size < 8:
        raise ValueError(f"--image-size {image_size}: expected at least 8")
    size = FIXED_SIZE.get(kind)
    if size and image_size not in (None, size):
        raise ValueError(f"{kind} images are {size}x{size}, not {image_size}: pass --image-size {size}")
    if kind == "cifar10":
        images, y = load_cifar10(data_dir or os.path.join(CACHE_DIR, "data"))
    elif kind == "shapes":  # built once per process (20k images take 4 s), a copy per caller
        images, y = (t.clone() for t in _shapes(n_shapes, image_size or 32, seed, True))
    elif kind == "folder":
        images, y = load_folder(path, image_size or 32)
    elif kind == "imagenet64":
        images, y = load_imagenet64(path)
    else:
        images, y = load_lsun(path, image_size or 128), None
    return (images, y) if labels else images

def sample_batch(data, batch_size, generator, labels=None):
    """This rank's part of a random global batch of batch_size from a uint8 dataset: (x, y), x float [-1, 1]
    with random horizontal flips, y the drawn images' labels (None without labels), both on the generator's
    device (data may stay on the CPU, e.g. memory-mapped LSUN: only the batch moves). Every rank draws the
    whole batch's indices and flips."""
    idx = mine(torch.randint(len(data), (batch_size,), generator=generator, device=generator.device))
    x = to_float(data[idx.to(data.device)].to(generator.device))
    flip = mine(torch.rand(batch_size, generator=generator, device=generator.device)) < 0.5
    y = None if labels is None else labels[idx.to(labels.device)].to(generator.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x), y

DEVICE_DATA_GB = 8  # a dataset up to this size moves to the GPU once; a larger one stays in host memory

def data_to(device, images, labels=None):
    """(images, labels) where sample_batch reads them: on the device if the images take at most DEVICE_DATA_GB
    (CIFAR-10: 0.15 GB, ImageNet 64: 15.7 GB), else where they are (LSUN bedroom 128: 149 GB, memory-mapped);
    sample_batch then moves each batch."""
    if images.numel() > DEVICE_DATA_GB * 2 ** 30:
        return images, labels
    return images.to(device), None if labels is None else labels.to(device)

LABELLED = "cifar10, shapes, imagenet64:PATH or a folder of class subfolders"

CLASSES_HELP = "evaluation labels: comma-separated classes, seed s takes the (s mod n)-th ('' = uniform)"

def eval_classes(text, den):
    """--classes as a list (None when not given: each seed's label uniform), checked against the model."""
    if not text:
        return None
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        classes = []
    if not den.num_classes:
        raise ValueError(f"--classes: {den.source} is unconditional")
    if not classes or not all(0 <= c < den.num_classes for c in classes):
        raise ValueError(f"--classes {text!r}: expected comma-separated classes 0..{den.num_classes - 1}")
    return classes

def check_labels(den, labels, data):
    """A class-conditional model's labels of --data, checked once before any work (an embedding lookup out of
    range fails deep inside, on CUDA as a device assert); None for an unconditional model."""
    if not den.num_classes:
        return None
    if labels is None:
        raise ValueError(f"{den.source} is class-conditional ({den.num_classes} classes) and --data {data} has "
                         f"no labels; use {LABELLED}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < den.num_classes:
        raise ValueError(f"--data {data} has labels {int(labels.min())}..{int(labels.max())}; {den.source} "
                         f"knows {den.num_classes} classes (0..{den.num_classes - 1})")
    return labels

# ========================================= checkpoints ==========================================

CKPT_FORMAT = "distill-ref/1"

def save_checkpoint(path, **state):
    """One self-describing checkpoint (den.state(), ema, method, config, optimizer, step, what a method needs
    to resume), readable with weights_only=True, written atomically (start_run removes orphan temp files).
    log_bytes: the length of log.jsonl beside it, so that a resumed run drops the rows written after it.
    Rank 0 writes it (the state is the same on every rank)."""
    if rank() > 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "log.jsonl")
    state.setdefault("log_bytes", os.path.getsize(log) if os.path.exists(log) else 0)
    torch.save({"format": CKPT_FORMAT, **state}, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)

def load_checkpoint(path):
    """A checkpoint of this project (weights_only: a file cannot run code), or a one-line ValueError."""
    ckpt = read_file(path, "checkpoint")
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT):
        raise ValueError(f"{path} is not a checkpoint of this project (format {CKPT_FORMAT}); convert an "
                         "original ermongroup/pesser or guided-diffusion file with: "
                         f"python tools/convert_teacher.py {path} teacher.pt")
    return ckpt

def generator_state(gen):
    """A generator's state for a checkpoint, with its device type: a CPU generator's state (Mersenne Twister,
    5,056 bytes) and a CUDA one's (Philox seed and offset, 16 bytes) do not convert into each other."""
    return {"device": gen.device.type, "state": gen.get_state()}

def restore_generator(gen, saved, step):
    """Put a checkpoint's generator state back into `gen` (seeded as the run seeds it) when the device type is
    the same. Resumed on another device type (--device may change), the run cannot draw the numbers it would
    have drawn (CPU and CUDA generators draw different numbers from one seed), so `gen` is reseeded
    deterministically from its seed and the stored update `step`, said in one line: the resumed run is then
    a function of (seed, step, device type), as any run of this project."""
    if torch.is_tensor(saved):  # a checkpoint from before the device type was stored: known by its size
        saved = {"device": "cpu" if len(saved) == len(torch.Generator().get_state()) else "cuda",
                 "state": saved}
    if saved["device"] == gen.device.type:
        return gen.set_state(saved["state"])
    print0(f"resumed on {gen.device.type} from a {saved['device']} checkpoint: the generator is reseeded from "
           f"its seed and update {step} (the draws differ from an uninterrupted run's)")
    return gen.manual_seed((gen.initial_seed() * 1_000_003 + step) % 2 ** 63)

# ========================================== evaluation ==========================================


def batched(seeds, batch_size):
    """Seeds in batches dealt round-robin over the ranks (EDM's generate.py): of batch_size, or smaller when
    there are fewer batches than ranks, so that every rank samples (the batches, and so the samples, are then
    those of one process only when len(seeds) >= ranks x batch_size)."""
    b = max(1, min(batch_size, -(-len(seeds) // world_size())))
    return [seeds[i:i + b] for i in range(0, len(seeds), b)]

def sample_seeds(sample_fn, seeds, shape, device, size):
    """sample_fn(z, seeds) over the seeds' own noise. A batch shorter than `size` is padded with copies of its
    last seed, whose images are dropped (a sample depends on its seed alone), so that every call of a phase has
    one shape: cuDNN autotunes once and a compiled sampler (dynamic=False) is not compiled again for the last
    batch. Off the CPU only: there the padding would be work for nothing."""
    pad = size - len(seeds) if torch.device(device).type != "cpu" else 0
    padded = list(seeds) + [seeds[-1]] * pad
    return sample_fn(seeded_noise(padded, shape, device), padded)[:len(seeds)]

@torch.no_grad()
def generate(sample_fn, seeds, shape, batch_size, device, what="sampling", full=None):
    """Run sample_fn(z, seeds) -> images in [-1, 1] over per-seed noise in batches, the batches shared out
    over the ranks (EDM's generate.py); returns every seed's image, in order, on every rank (CPU tensor).
    full: how many the full run samples here, under --rehearse."""
    seeds = list(seeds)
    batches = batched(seeds, batch_size)
    done, t0, ours = 0, time.time(), {}
    for first in range(0, len(batches), world_size()):  # rounds of a batch per rank
        stop_if_preempted(what)
        if (i := first + rank()) < len(batches):
            ours[i] = sample_seeds(sample_fn, batches[i], shape, device, len(batches[0])).float().cpu()
        done += sum(map(len, batches[first:first + world_size()]))
        progress(what, min(done, len(seeds)), len(seeds), t0, " images/s")
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, ours)
        ours = {i: images for part in parts for i, images in part.items()}
    rehearsal_rate(what, len(seeds), time.time() - t0, full)
    return torch.cat([ours[i] for i in range(len(batches))])


def save_png(image_uint8, path):
    """One (C, H, W) uint8 image as a PNG, written atomically: a file that exists is complete."""
    from PIL import Image
    tmp = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(image_uint8.permute(1, 2, 0).cpu().numpy().squeeze()).save(tmp, format="PNG")
    os.replace(tmp, path)

def save_grid(images, path, nrow=8):
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid with 1-pixel gaps (rank 0)."""
    if rank() > 0:
        return
    x = to_uint8(images.cpu())
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    grid = torch.full((c, (n + ncol - 1) // ncol * (h + 1) + 1, ncol * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):(r + 1) * (h + 1), 1 + k * (w + 1):(k + 1) * (w + 1)] = x[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(grid, path)

@torch.no_grad()
def sample_to_folder(sample_fn, n, folder, shape, batch_size, device, seed0=0, full=None):
    """n samples as PNGs named by seed (seed0 .. seed0+n-1), each written atomically, so that an interrupted
    run resumes where it stopped, the batches shared out over the ranks: the folder is the same whatever their
    number (on CPU; cuDNN's autotuned kernels may differ by a rounding per process). The folder belongs to one
    model: a retrained model needs a fresh one. full: the full run's n, under --rehearse."""
    os.makedirs(folder, exist_ok=True)
    todo = broadcast_object([s for s in range(seed0, seed0 + n)
                             if not os.path.exists(os.path.join(folder, f"{s:06d}.png"))])
    batches = batched(todo, batch_size)
    done, t0 = 0, time.time()
    for first in range(0, len(batches), world_size()):  # rounds of a batch per rank
        stop_if_preempted(f"sampling {os.path.basename(folder)}")
        seeds = batches[first + rank()] if first + rank() < len(batches) else []
        if seeds:
            for s, im in zip(seeds, to_uint8(sample_seeds(sample_fn, seeds, shape, device, len(batches[0])))):
                save_png(im, os.path.join(folder, f"{s:06d}.png"))
        done += sum(map(len, batches[first:first + world_size()]))
        progress(f"sampling {os.path.basename(folder)}", min(done, len(todo)), len(todo), t0, " images/s")
    barrier()
    rehearsal_rate(f"FID samples {os.path.basename(folder)}", len(todo), time.time() - t0,
                   full and full * len(todo) // n)
    return folder

def reference_pngs(data, n, folder, stats=None, images=None, image_size=None):
    """The FID reference of --data: None where statistics serve (clean-fid's of cifar10, or --fid-stats),
    else n of its images (`images`, or loaded) as PNGs in folder, written once: a fixed random subset (the
    first n of a sorted class tree would be one class)."""
    if data == "cifar10" or stats:
        return None
    images = load_dataset(data, image_size) if images is None else images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
    return write_pngs(images[pick.sort().values].cpu(), folder)

def write_pngs(images_uint8, folder):
    """Images (N, C, H, W) uint8 as numbered PNGs (e.g. real images as the FID reference of datasets without
    clean-fid statistics), written once, each rank its share: into a temp folder, renamed when complete."""
    if not broadcast_object(os.path.isdir(folder)):
        if rank() == 0:
            shutil.rmtree(folder + ".tmp", ignore_errors=True)
            os.makedirs(folder + ".tmp")
        barrier()
        for i in mine(torch.arange(len(images_uint8))).tolist():
            save_png(images_uint8[i], os.path.join(folder + ".tmp", f"{i:06d}.png"))
        barrier()
        if rank() == 0:
            os.replace(folder + ".tmp", folder)
    barrier()
    return folder

INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
FID_MODES = ("legacy_tensorflow", "clean")

def inception_weights(path=None):
    """The path of the Inception weights: `path` if given (it must exist), else a copy downloaded once."""
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"--inception {path}: no such file")
        return path
    path = os.path.join(CACHE_DIR, "inception-2015-12-05.pt")
    try:
        return download(INCEPTION_URL, path, what="Inception weights")
    except ValueError as e:
        raise ValueError(f"Inception weights unavailable: {e}; or pass --inception PATH") from None

CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/cifar10_{mode}_train_32.npz"

def cifar10_statistics(mode):
    """(mu, sigma) of the CIFAR-10 train images: clean-fid's, fetched once into CACHE_DIR/fid_stats by
    download() (clean-fid's own fetch writes into its package folder from every rank at once, not
    atomically). Every rank calls it."""
    stats = os.path.join(CACHE_DIR, "fid_stats", f"cifar10_{mode}_train_32.npz")
    try:
        download(CLEANFID_STATS_URL.format(mode=mode), stats, what=f"CIFAR-10 statistics ({mode})")
    except ValueError as e:
        raise ValueError(f"clean-fid's CIFAR-10 statistics ({mode}) are unavailable ({e}); or pass "
                         "--fid-stats PATH") from None
    with np.load(stats) as f:
        return f["mu"], f["sigma"]

def stats_modes(stats):
    """The FID modes that a --fid-stats .npz serves, checked without loading it (one-line errors): `mu` and
    `sigma`, statistics of the TF Inception's pool_3 features (clean-fid's 'legacy_tensorflow'; clean-fid's
    files, ADM's reference batches such as VIRTUAL_imagenet64_labeled.npz), serve 'legacy_tensorflow';
    `arr_0`, images (N, H, W, 3) uint8 (ADM's reference batches), serve every mode (stats_reference)."""
    if not os.path.isfile(stats):
        raise ValueError(f"--fid-stats {stats}: no such file")
    try:
        with zipfile.ZipFile(stats) as z:
            keys = {os.path.splitext(name)[0] for name in z.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"--fid-stats {stats}: not an .npz ({e})") from None
    if "arr_0" in keys:
        return FID_MODES
    if {"mu", "sigma"} <= keys:
        return ("legacy_tensorflow",)
    raise ValueError(f"--fid-stats {stats}: holds {', '.join(sorted(keys)) or 'nothing'}; expected mu and "
                     "sigma (TF Inception statistics) or arr_0 (images, as ADM's reference batches)")

def stats_reference(stats, mode, det, inception, batch_size, device):
    """(mu, sigma) in `mode` from a --fid-stats .npz (stats_modes): its own for 'legacy_tensorflow' where it
    has them, else those of its arr_0 images, written once as PNGs under CACHE_DIR/fid_stats and scored as a
    reference folder; these statistics cached there too, keyed by the file and the Inception weights (with a
    network object passed as `inception`: once a run). Every rank calls it."""
    with np.load(stats) as f:
        if mode == "legacy_tensorflow" and {"mu", "sigma"} <= set(f.files):
            return f["mu"], f["sigma"]
    base = os.path.join(CACHE_DIR, "fid_stats", os.path.splitext(os.path.basename(stats))[0] + "_" + _key(
        os.path.realpath(stats), os.path.getsize(stats), os.path.getmtime(stats)))
    weights = None if det is inception else inception_weights(inception)
    cache = weights and f"{base}_{mode}_{_key(os.path.realpath(weights), os.path.getsize(weights))}.npz"
    if cache and sum_over_ranks(np.float64(os.path.isfile(cache)))[0] == world_size():  # all ranks or none
        with np.load(cache) as f:
            return f["mu"], f["sigma"]
    with np.load(stats) as f:
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"--fid-stats {stats}: arr_0 is {images.dtype} {images.shape}; expected uint8 "
                         "images (N, H, W, 3)")
    folder = write_pngs(torch.from_numpy(images).permute(0, 3, 1, 2), base + "_images")
    mu, sigma = _reference(folder, mode, det, inception, batch_size, device)
    if cache and rank() == 0:
        with open(f"{cache}.{os.getpid()}.tmp", "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(f"{cache}.{os.getpid()}.tmp", cache)
    return mu, sigma

def prepare_fid(dataset, inception=None, stats=None):
    """Fetch or verify what fid_is will need (the Inception weights; the --fid-stats file, else for cifar10
    clean-fid's statistics) before any work, so that a machine that cannot fetch them fails at the start, not
    after the training."""
    inception_weights(inception)
    if stats:
        stats_modes(stats)
    elif dataset == "cifar10":
        for mode in FID_MODES:
            cifar10_statistics(mode)

class Inception:
    """clean-fid's TF-ported Inception-v3: features(x, mode) of uint8-valued images (resized inside, as TF,
    for 'legacy_tensorflow'; 299x299 for 'clean'), probs(x) for the IS (no output bias, as its code)."""

    def __init__(self, path=None, device="cpu"):
        self.base = torch.jit.load(inception_weights(path), map_location=device).eval()

    def features(self, x, mode):
        if mode == "legacy_tensorflow":
            return self.base(x, return_features=True).view(len(x), -1)
        return self.base.layers.forward((x - 128) / 128).view(len(x), -1)

    def probs(self, x):
        return self.base(x, no_output_bias=True)

def _is_sums(probs, first, n, splits):
    """This share's part of the IS of images 0 .. n-1: per split (np.array_split order; probs are images first
    .. first + len(probs) - 1, those past n left out) the count, sum over images of sum_y p log p, and sum of
    p(y|x)."""
    which = np.repeat(np.arange(splits), [len(c) for c in np.array_split(np.arange(n), splits)])
    which = which[first:first + len(probs)]
    p = np.asarray(probs, dtype=np.float64)[:len(which)]
    p_sum = np.zeros((splits, p.shape[1]))
    np.add.at(p_sum, which, p)
    plogp = np.bincount(which, (p * np.log(p + 1e-12)).sum(1), minlength=splits)
    return np.bincount(which, minlength=splits).astype(np.float64), plogp, p_sum

def _is_from_sums(count, plogp, p_sum):
    """exp(E_x KL(p(y|x) || p(y))) per split from _is_sums (E_x sum_y p log p - sum_y p(y) log p(y))."""
    marginal = p_sum / count[:, None]
    scores = np.exp(plogp / count - (marginal * np.log(marginal + 1e-12)).sum(1))
    return float(np.mean(scores)), float(np.std(scores))

def inception_score(probs, splits=10):
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))), mean and std over splits."""
    return _is_from_sums(*_is_sums(probs, 0, len(probs), splits))

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017) as clean-fid (eps I if singular),
    ours as clean-fid 0.1.35 passes sqrtm(disp=False), which scipy 1.18 removed."""
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))

def sum_over_ranks(*arrays):
    """float64 numpy arrays summed over the ranks, on every rank (as they are in a plain run)."""
    if world_size() == 1:
        return arrays
    flat = torch.from_numpy(np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64))
    on_gpu = dist.get_backend() == "nccl"
    flat = flat.cuda() if on_gpu else flat
    dist.all_reduce(flat)
    flat, out, i = flat.cpu().numpy(), [], 0
    for a in arrays:
        out.append(flat[i:i + np.size(a)].reshape(np.shape(a)))
        i += np.size(a)
    return out

def _scored(files, det, mode, splits, batch_size, device, is_count=None):
    """Inception over every rank's share of `files` (contiguous, in order; NVlabs/edm's fid.py), reduced to
    (mu, sigma) in clean-fid's `mode` and, with splits, the IS (mean, std) from the same pass: of the first
    is_count files (None: all)."""
    from cleanfid import fid as cleanfid
    ours = np.array_split(np.arange(len(files)), world_size())[rank()]
    width, chunk = [], 8 * batch_size  # between chunks every rank reads the preemption flag

    def fn(x):  # clean-fid's batches of uint8 values as float (B, 3, H, W): features, then the IS's p(y|x)
        f = det.features(x.float(), mode)
        width[:] = [f.shape[1]]
        return torch.cat([f, det.probs(x.float())], 1) if splits else f
    parts = []
    for first in range(0, -(-len(files) // world_size()), chunk):  # the largest share's chunks, on every rank
        stop_if_preempted("FID/IS scoring")
        if len(part := ours[first:first + chunk]):
            parts.append(cleanfid.get_files_features([files[i] for i in part], model=fn, num_workers=0,
                                                     mode=mode, batch_size=batch_size,
                                                     device=torch.device(device), verbose=False))
    out = np.concatenate(parts) if parts else None
    d = broadcast_object(width[0] if width else None)  # the feature width (a rank may have had no files)
    f = out[:, :d].astype(np.float64) if out is not None else np.zeros((0, d))
    n, s1, s2 = sum_over_ranks(np.float64(len(f)), f.sum(0), f.T @ f)
    mu = s1 / n
    scores = None
    if splits:
        probs, n = out[:, d:] if out is not None else np.zeros((0, 1)), min(is_count or len(files), len(files))
        scores = _is_from_sums(*sum_over_ranks(*_is_sums(probs, ours[0] if len(ours) else 0, n,
                                                         min(splits, n))))
    return mu, (s2 - n * np.outer(mu, mu)) / (n - 1), scores

def image_files(folder):
    """The images below a folder, sorted, as clean-fid lists them."""
    from cleanfid.utils import EXTENSIONS
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                  if os.path.splitext(f)[1].lower()[1:] in EXTENSIONS)

_REFERENCE = {}  # (folder, its image count, mode, Inception) -> (mu, sigma): each reference scored once a run

def _reference(folder, mode, det, inception, batch_size, device):
    """(mu, sigma) of a folder of real images in `mode`, scored once a run (again on every rank unless every
    rank has it). Every rank calls it."""
    refs = image_files(folder)
    key = (os.path.realpath(folder), len(refs), mode, inception if det is not inception else id(det))
    if sum_over_ranks(np.float64(key in _REFERENCE))[0] < world_size():  # scored on all ranks or none
        _REFERENCE[key] = _scored(refs, det, mode, 0, batch_size, device)[:2]
    return _REFERENCE[key]

@functools.lru_cache(maxsize=2)
def _inception(path, device):
    """The Inception network of `path` (None: the cached download) on `device`, loaded once a run."""
    return Inception(path, device)

def fid_is(folder, dataset, device="cpu", inception=None, ref_folder=None, stats=None, modes=FID_MODES,
           batch_size=200, splits=10, full=None, is_samples=None):
    """{'fid', 'fid_clean', 'is', 'is_std'} of a folder of PNGs, FID in clean-fid's modes against (the first
    given) `stats` (a --fid-stats .npz, any dataset: its mu and sigma serve 'legacy_tensorflow' only, its
    arr_0 images every mode; stats_modes), ref_folder (real PNGs), for cifar10 clean-fid's statistics of the
    50k *train* images (the papers'). inception: a path or an object like Inception. Every rank calls it and
    scores its share of the images; every rank returns rank 0's numbers. full: the full run's number of
    images, under --rehearse. is_samples: the IS of the first n images alone (DSD: FID on 30k, IS on 5k)."""
    if not stats and ref_folder is None and dataset != "cifar10":
        raise ValueError(f"FID for {dataset!r} needs a folder of reference images or --fid-stats (an .npz of "
                         "mu and sigma, or of images arr_0)")
    served = stats_modes(stats) if stats else FID_MODES
    det = inception if hasattr(inception, "features") else _inception(inception, device)
    files, out, t0 = image_files(folder), {}, time.time()
    for mode in [m for m in modes if m in served]:
        if stats:
            ref = stats_reference(stats, mode, det, inception, batch_size, device)
        elif ref_folder is not None:
            ref = _reference(ref_folder, mode, det, inception, batch_size, device)
        else:
            ref = cifar10_statistics(mode)
        # the IS of the images as they are (the network resizes inside, as TF's), from the TF-mode pass
        mu, sigma, scores = _scored(files, det, mode, splits if mode == "legacy_tensorflow" else 0,
                                    batch_size, device, is_samples)
        out["fid" if mode == "legacy_tensorflow" else "fid_" + mode] = \
            frechet_distance(mu, sigma, *ref) if rank() == 0 else None
        if scores is not None:
            out["is"], out["is_std"] = scores
    if "is" not in out:  # clean mode alone: the IS still reads the images as the TF network does
        out["is"], out["is_std"] = _scored(files[:is_samples], det, "legacy_tensorflow", splits, batch_size,
                                           device)[2]
    rehearsal_rate("FID/IS scoring", len(files), time.time() - t0, full, "image")
    return broadcast_object(out)

# =========================================== training ===========================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise SystemExit(f"error: {message} (see --help)")

def field(default, help, choices=None, low=None, high=None, below=None, fixed=True, rehearse=None):
    """A config field that becomes a flag: argparse checks choices, low <= value <= high and value < below
    (floats must be finite); fixed=False: may change when resuming, the run still equalling an uninterrupted
    one (logging, device, eval sizes, constant lr); rehearse: its value under --rehearse (a number: at most
    that, so 0 stays 0; or a function of the config as given)."""
    meta = dict(help=help, choices=choices, low=low, high=high, below=below, fixed=fixed, rehearse=rehearse)
    return dataclasses.field(default=default, metadata=meta)

def _flag_type(f):
    kind, m = f.type if isinstance(f.type, type) else eval(f.type), f.metadata
    bools = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def parse(text):
        try:
            value = bools[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            what = "true or false" if kind is bool else "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        for bad, what in ((kind is float and not math.isfinite(value), "a finite number"),
                          (m.get("low") is not None and value < m["low"], f"at least {m.get('low')}"),
                          (m.get("high") is not None and value > m["high"], f"at most {m.get('high')}"),
                          (m.get("below") is not None and value >= m["below"], f"below {m.get('below')}")):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse

def parse_config(cls, argv=None, quick=None, doc=None):
    """Flags from a config dataclass: every field becomes --field-name (help, choices and bounds from
    field()), plus --quick, which applies the `quick` overrides before any flag given explicitly."""
    parser = _Parser(description=doc)
    parser.add_argument("--quick", action="store_true", help="tiny configuration on shapes; minutes on a CPU")
    parser.add_argument(
        "--rehearse", action="store_true", help="this run with every count cut to the least "
        "that passes once through each phase, into OUT/rehearsal: the full run's time per phase")
    defaults = cls()
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(f),
                            choices=f.metadata.get("choices"), default=argparse.SUPPRESS,
                            help=f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)!r})"
                            .replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    if args.pop("rehearse"):
        _REHEARSAL["asked"] = True
    cfg = dataclasses.replace(defaults, **(quick or {})) if args.pop("quick") else defaults
    return dataclasses.replace(cfg, **args)

@functools.lru_cache(maxsize=1)
def cuda_usable():
    """Whether CUDA is usable; if not, why, said once a process (rank 0) in one line on stderr."""
    with warnings.catch_warnings(record=True) as caught:  # e.g. a driver older than the wheel needs
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if not usable and int(os.environ.get("RANK", 0)) == 0:
        why = str(caught[-1].message).splitlines()[0] if caught else \
            "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        print(f"--device auto: CUDA is not usable ({why}); running on the CPU", file=sys.stderr, flush=True)
    return usable

def pick_device(name="auto"):
    """A device torch has: auto (cuda if usable, else cpu: cuda_usable), cpu, cuda or cuda:N; else a one-line
    error."""
    if name == "auto":
        return "cuda" if cuda_usable() else "cpu"
    kind, _, index = name.partition(":")
    if name == "cpu" or (kind == "cuda" and (index == "" or index.isdigit())):
        count = torch.cuda.device_count() if kind == "cuda" else 1
        if kind == "cuda" and int(index or 0) >= count:
            raise ValueError(f"--device {name}: " + (f"only cuda:0 .. cuda:{count - 1} exist" if count else
                                                     "no CUDA GPU is visible; use --device cpu"))
        return name
    raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


# ---- many GPUs: torchrun and DistributedDataParallel (nanoGPT's and NVlabs/edm's pattern) -----------------
# One process per device. --batch is the global batch: every rank draws the whole batch's randomness from the
# same generator and keeps its own slice (mine), so k ranks take the update of one process with that batch, up
# to the order of float sums, and a run resumes on any number of ranks. Sampling is sharded by seed; rank 0
# alone writes files and prints.

# Waits: collectives of the process group time out after DIST_TIMEOUT (NCCL's default is 10 minutes), which
# every phase keeps well inside, as no rank works alone for long: sampling, FID and PNG writing are sharded.
# Work that only some ranks can do (a download, another job's lock on the cached teacher) is waited for on a
# second, gloo group with a 24-hour timeout (wait_for_fetchers).
DIST_TIMEOUT, WAIT_TIMEOUT = datetime.timedelta(minutes=30), datetime.timedelta(hours=24)
_WAIT_GROUP = None
DEVICE = "cpu"  # this process's device, set by setup_device (start_run records it)

def device_info(device):
    """What a run ran on (config.json and the first log row of each start): the device, its model, and the
    torch and CUDA versions (CUDA: the version this torch was built for; None on a CPU-only build)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        name = next(iter(re.findall(r"model name\s*:\s*(.+)", cpuinfo)), platform.processor() or "cpu")
    return {"device_used": str(device), "device_name": name, "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda}

def rank():
    return dist.get_rank() if dist.is_initialized() else 0

def local_rank():
    """This process's index on its node (torchrun's LOCAL_RANK): 0 fetches the node's downloads."""
    return int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else 0

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def setup_device(name="auto"):
    """This process's device. Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set; several nodes through its own
    rendezvous) the process group starts once, nccl on CUDA and gloo on CPU, and each process takes the GPU
    of its LOCAL_RANK; a plain `python method.py` is one process without a group."""
    global DEVICE
    device = DEVICE = pick_device(name)
    if device != "cpu":  # TF32 matmuls and convolutions (fp32 near bf16's speed, 10-bit mantissas: ample for
        # diffusion training) and cuDNN's autotuned kernels (the shapes repeat every update)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if "RANK" not in os.environ:
        return device
    stop_with_launcher()
    if device != "cpu":
        device = DEVICE = pick_device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        global _WAIT_GROUP
        dist.init_process_group("nccl" if device != "cpu" else "gloo", timeout=DIST_TIMEOUT,
                                device_id=torch.device(device) if device != "cpu" else None)
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
        atexit.register(_end_group)
    return device

def _end_group():
    """At exit, this rank's end of a group that cli did not close (a script of one's own): left to the
    interpreter's shutdown, gloo's threads were destroyed while running and a rank aborted (SIGABRT, CI)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

def stop_with_launcher():
    """A torchrun worker ends with its launcher: torchrun starts each worker in a session of its own, so a
    kill -9 of torchrun's process group (a job script's, a scheduler's) reaches torchrun alone, and its
    orphans would train on beside a restarted run. Linux sends the worker SIGTERM when the launcher dies
    (PR_SET_PDEATHSIG; torchrun starts its workers from its main thread): they stop as preempted, at
    the end of their current update (cli); a checkpoint is written to a temporary name and renamed, so the
    next start resumes as after any kill."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != PARENT:  # the launcher died before this process asked
        os.kill(os.getpid(), signal.SIGTERM)

def check_batch(**batches):
    """Before any work: each global batch (flag=size) must split evenly over the ranks."""
    for flag, batch in batches.items():
        if batch % world_size():
            raise ValueError(f"--{flag.replace('_', '-')} {batch}: the global batch must split evenly over "
                             f"the {world_size()} processes; pass a multiple of {world_size()}")

def mine(x):
    """This rank's slice of a global batch: its dim 0 in world_size() parts, as torch.tensor_split."""
    return x.tensor_split(world_size())[rank()]

def gather(x, n=None):
    """The global batch of n (default: equal parts) from every rank's slice `mine` made, in order, on every
    rank (x itself in a plain run)."""
    if world_size() == 1:
        return x
    q, r = divmod(n or len(x) * world_size(), world_size())
    sizes = [q + (i < r) for i in range(world_size())]
    padded = torch.cat([x, x.new_zeros((q + (r > 0) - len(x), *x.shape[1:]))]).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])

def mean_over_ranks(x):
    """The mean of a tensor over the ranks (a logged loss: the global batch's mean)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x

def broadcast_object(obj):
    """Rank 0's `obj`, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

def barrier():
    if world_size() > 1:
        dist.barrier()

def wait_for_fetchers():
    """A barrier on the 24-hour gloo group: where some ranks fetch or wait for a lock while the others
    wait."""
    if world_size() > 1:
        dist.barrier(group=_WAIT_GROUP)

def print0(*args, **kwargs):
    """print on rank 0 only (the other ranks print nothing but their errors)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)

def data_parallel(den):
    """den for the training pass: under torchrun its net in DistributedDataParallel (the same parameters,
    gradients averaged over the ranks in backward); den itself in a plain run. Checkpoints keep using den."""
    if world_size() == 1:
        return den
    device = next(den.net.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return den.view(nn.parallel.DistributedDataParallel(den.net, device_ids=ids))

def compiled(den, on=True):
    """den with its net under torch.compile (on): a view sharing the parameters, for the hot loops. Compiled
    code is reused by later networks of the same architecture (a progressive round's new student). Static
    shapes (dynamic=False): each of a run's few batch sizes (training, teacher, sampling) gets a graph of its
    own, where the default makes every graph after the first change of size symbolic, slower at every size;
    up to 64 graphs per network code (teacher and student, each size and mode), where dynamo's 8 would run the
    ninth eagerly."""
    if not on:
        return den
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return den.view(torch.compile(den.net, dynamic=False))

def rank_dropout_seed(seed):
    """Each rank its own dropout masks (a plain run keeps its generator): dropout makes k ranks match one
    process in distribution only."""
    if world_size() > 1:
        torch.manual_seed(seed * 1000 + rank())

def progress(what, done, total, t0, unit="/s"):
    """'what: done/total, rate, ETA' on rank 0's stderr: one line that updates on a terminal, in a log a line
    at most every 30 s and the last."""
    now = time.time()
    if rank() > 0 or (not sys.stderr.isatty() and now - _PRINTED.get(what, 0.0) < 30 and done < total):
        return
    _PRINTED[what] = now
    rate = done / max(now - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    print(f"\r{what}: {done:,}/{total:,}, {rate:.1f}{unit}, ETA {eta / 60:.1f} min", end=end, file=sys.stderr,
          flush=True)

_PRINTED = {}  # when progress() last printed each line

# ---- --rehearse: the run as configured, every count cut, each phase timed (Lightning's fast_dev_run) -------
# Networks, batches, dtype, --compile, data, teacher, FID files and processes stay; each count flag declares
# its cut (field(rehearse=...)); the phases report their rates through rehearsal_rate, and cli prints the
# table and writes OUT/rehearsal/rehearsal.json.
_REHEARSAL = {}  # "asked"; "runs": [(config as given, config as run)]; "phases": {name: row}

def rehearsal(cfg):
    """Under --rehearse: cfg with every count cut and --out OUT/rehearsal, started afresh; else cfg."""
    if not _REHEARSAL.get("asked"):
        return cfg
    cut = {}
    for f in dataclasses.fields(cfg):
        r, value = f.metadata.get("rehearse"), getattr(cfg, f.name)
        if r is not None:
            cut[f.name] = r(cfg) if callable(r) else min(value, r)
    fresh = {"resume": "auto"} if hasattr(cfg, "resume") else {}  # never a checkpoint of the real run
    run = dataclasses.replace(cfg, **cut, **fresh, out=os.path.join(cfg.out, "rehearsal"))
    if rank() == 0:
        shutil.rmtree(run.out, ignore_errors=True)
    barrier()
    _REHEARSAL.setdefault("runs", []).append((cfg, run))
    return run

def full_config(cfg):
    """The config as given of a rehearsed config (cfg itself outside a rehearsal): the full run's counts."""
    return next((given for given, run in _REHEARSAL.get("runs", []) if run == cfg), cfg)

def rehearsal_rate(phase, done, seconds, full_count=None, unit="sample", last=False):
    """A phase's measured rate into the rehearsal table: `done` units in `seconds`, of `full_count` in the
    full run. Sampling phases add up over their calls; a training loop reports each log interval (last=True),
    so that its row is the rate after warm-up. Peak memory: the device's since the previous row (CUDA), else
    the process's maximum resident set."""
    if not _REHEARSAL.get("asked") or done <= 0:
        return
    phases = _REHEARSAL.setdefault("phases", {})
    row = phases.get(phase) if not last else None
    row = row or dict(unit=unit, done=0, seconds=0.0, full=0, full_s=0.0)
    full_count = done if full_count is None else full_count
    row.update(done=row["done"] + done, seconds=row["seconds"] + seconds, full=row["full"] + full_count,
               full_s=row["full_s"] + seconds / done * full_count)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["peak_gib"] = max(row.get("peak_gib", 0.0), torch.cuda.max_memory_allocated() / 2 ** 30)
        torch.cuda.reset_peak_memory_stats()
    else:
        import resource
        row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    phases[phase] = row

def rehearsal_report():
    """The table of a finished rehearsal (rank 0): per phase the measured rate, peak memory and the full
    run's time at that rate on these processes; each run's checkpoint read back as --resume would."""
    if rank() > 0 or not _REHEARSAL.get("runs"):
        return
    for given, run in _REHEARSAL["runs"]:
        path = os.path.join(run.out, "ckpt.pt")
        if os.path.exists(path):
            t0 = time.time()
            read_resume(run)  # the resume path: a readable checkpoint whose fixed flags match
            rehearsal_rate(f"checkpoint read back ({os.path.getsize(path) / 2 ** 20:.0f} MB)", 1,
                           time.time() - t0, 1, "file")
    rows = [dict(phase=name, **row) for name, row in _REHEARSAL.get("phases", {}).items()]
    total = sum(row["full_s"] for row in rows)
    report = dict(world_size=world_size(), rows=rows, full_run_s=total)
    write_json(os.path.join(_REHEARSAL["runs"][0][1].out, "rehearsal.json"), report)
    print(
        f"rehearsal on {world_size()} process(es): rates measured here, the full run's counts at those rates")
    print(f"{'phase':<44} {'rehearsed':>10} {'rate':>16} {'peak GiB':>9} {'full run':>12} {'est. time':>10}")
    for row in rows:
        rate = row["done"] / max(row["seconds"], 1e-9)
        rate = f"{rate:.1f} {row['unit']}/s" if rate >= 1 else f"{1 / rate:.3f} s/{row['unit']}"
        print(f"{row['phase'][:44]:<44} {row['done']:>10,} {rate:>16} {row['peak_gib']:>9.2f} "
              f"{row['full']:>12,} {_duration(row['full_s']):>10}")
    print(f"{'the full run':<44} {'':>10} {'':>16} {'':>9} {'':>12} {_duration(total):>10}", flush=True)

def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"

# ---- the run contract: OUT/config.json, log.jsonl, ckpt.pt, metrics.json ---------------------------------

def write_json(path, obj):
    """Atomic JSON write (rank 0's)."""
    if rank() > 0:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)

def writable(path):
    """A one-line error unless a run directory can be made or written at `path`: its deepest existing folder
    takes a probe folder, removed at once (os.access says yes to root on a read-only filesystem)."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path}: {parent} is not a folder; pass another --out")
    probe = os.path.join(parent, f".probe{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise ValueError(f"--out {path}: {parent} is not writable ({e.strerror}); pass another --out") \
            from None

LOCKS = {}  # real path of a run folder -> the open OUT/.lock whose flock this process holds

def lock_out(out, flag="--out"):
    """One writer per run folder: rank 0 takes an exclusive flock on OUT/.lock (OUT must exist) before the run
    writes there and holds it while the run lives; the OS frees it when the process ends, killed or not, so a
    kill leaves no stale lock. A folder another process holds is a one-line error that names the holder (flag:
    the option that named the folder); one this process holds already is fine (one_writer frees a run's locks
    when it returns)."""
    key = os.path.realpath(out)
    if rank() > 0 or os.name != "posix" or key in LOCKS:
        return
    import fcntl
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{flag} {out} is in use by {holder}; wait for it to end, stop it, or pass another "
                         f"{flag}") from None
    except OSError as e:  # a filesystem without locks (some network mounts): the run goes on unguarded
        print(f"warning: {out} cannot be locked ({e.strerror}); see that no other run writes there",
              file=sys.stderr, flush=True)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    LOCKS[key] = f

def one_writer(run):
    """Decorates a run's entry point (a method's main, train_teacher): the --out locks it took are freed when
    it returns or raises, and its folder stops receiving stop_if_preempted's row, so that one process may run
    several runs in turn (pytest, tools/compare.py)."""
    @functools.wraps(run)
    def locked(*args, **kwargs):
        before, outer = set(LOCKS), dict(_RUN)
        try:
            return run(*args, **kwargs)
        finally:
            for key in set(LOCKS) - before:
                LOCKS.pop(key).close()
            _RUN.clear()
            _RUN.update(outer)  # the run this one was part of, if any (a base model's: the distillation's)
    return locked

def read_resume(cfg, ckpt_name="ckpt.pt"):
    """The checkpoint a run continues from (--resume auto: OUT/ckpt_name if present; PATH; none) or None,
    read before any work and writing nothing but the lock of an --out that exists (lock_out): a missing or
    unreadable file, an --out that cannot be written or that another run holds, or fixed flags that differ
    from the checkpoint's (listed) are one-line ValueErrors."""
    writable(cfg.out)
    if os.path.isdir(cfg.out):
        lock_out(cfg.out)
    path = {"none": None, "": None, "auto": os.path.join(cfg.out, ckpt_name)}.get(cfg.resume, cfg.resume)
    if cfg.resume not in ("none", "", "auto") and not os.path.isfile(path):
        raise ValueError(f"--resume {path}: no such checkpoint (expected auto, none or a file)")
    ckpt = load_checkpoint(path) if path and os.path.exists(path) else None
    old = (ckpt or {}).get("config") or {}
    diff = [f.name for f in dataclasses.fields(cfg) if f.metadata.get("fixed", True) and f.name in old
            and json.loads(json.dumps(getattr(cfg, f.name))) != old[f.name]]
    if diff:
        listed = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (was {old[k]!r})" for k in diff)
        raise ValueError(f"{path} was made with other settings: {listed}; rerun with the stored flags (see "
                         f"{os.path.join(cfg.out, 'config.json')}), or pass --resume none or another --out")
    return ckpt and {**ckpt, "path": path}

def start_run(cfg, ckpt, outputs=(), batch=None):
    """Open cfg.out for work once everything is checked (a finished run is left as it is). Resuming, log.jsonl
    is cut back to the rows written before the checkpoint (its log_bytes) and a 'resumed' row added; starting
    over, the old log, metrics.json and `outputs` (the method's result files and folders, glob patterns) go,
    so that no result of an earlier run is reported as this one's. Orphan temp files go; config.json is
    written; the first row says how many processes share the global batch. Both record the device
    (rank 0's), its model and the torch and CUDA versions (device_info)."""
    _RUN["out"] = cfg.out if rank() == 0 else None
    if rank() > 0:
        return barrier()
    os.makedirs(cfg.out, exist_ok=True)
    lock_out(cfg.out)  # before anything is written (read_resume took it if the folder was there)
    log = os.path.join(cfg.out, "log.jsonl")
    for tmp in [os.path.join(d, f) for d, _, files in os.walk(cfg.out) for f in files if f.endswith(".tmp")]:
        os.remove(tmp)
    if ckpt is None:
        for path in [p for name in ("log.jsonl", "metrics.json", *outputs)
                     for p in glob.glob(os.path.join(glob.escape(cfg.out), name))]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif os.path.exists(log) and ckpt.get("log_bytes") is not None:
        os.truncate(log, min(ckpt["log_bytes"], os.path.getsize(log)))
    ran_on = device_info(DEVICE)
    write_json(os.path.join(cfg.out, "config.json"), {**dataclasses.asdict(cfg), "world_size": world_size(),
                                                      **ran_on})
    ranks = {"world_size": world_size(), "batch_per_rank": batch // world_size()} if batch else {}
    log_row(cfg.out, {"event": "resumed", "from": ckpt["path"], "step": ckpt.get("step"), **ranks, **ran_on}
            if ckpt is not None else {"event": "started", **ranks, **ran_on})
    barrier()

def run_finished(out):
    """The metrics of a finished run in `out` (metrics.json with finished = true), else None."""
    try:
        metrics = read_file(os.path.join(out, "metrics.json"))
    except ValueError:
        return None
    return metrics if metrics.get("finished") else None

def log_row(out_dir, row):
    """Append one JSON line to out_dir/log.jsonl and print it (rank 0)."""
    if rank() > 0:
        return
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(*(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

class Meter:
    """A training loop's log (nanoGPT's pattern): losses summed on the device each update, no host sync; every
    --log-every updates one row of their mean over those updates and over the ranks (the loop's host syncs),
    s/update, elapsed time (a resumed run's included) and ETA, and under --rehearse the phase's rate. A
    non-finite loss stops the run in one line (its update and loss) at the next log or checkpoint: the loop
    calls check() before it writes a checkpoint, so none is ever written after a non-finite loss."""

    def __init__(self, out, step, total, elapsed, device, names=("loss",), phase="training", full_total=None):
        self.out, self.last, self.total, self.elapsed_s, self.names = out, step, total, elapsed, names
        self.phase, self.full_total, self.added = phase, full_total or total, step
        self.sums, self.t0 = torch.zeros(len(names), device=device), time.time()
        self.first_bad = torch.full((len(names),), math.inf, device=device)  # per loss: its first bad update

    def add(self, *losses):
        """One update's losses (called once per update, after its step): summed, and the update recorded
        where a loss is not finite, on the device."""
        losses, self.added = torch.stack([loss.detach().float() for loss in losses]), self.added + 1
        self.sums += losses
        self.first_bad.masked_fill_(~losses.isfinite() & self.first_bad.isinf(), self.added)

    def check(self, phase=None):
        """Stop in one line if a loss added so far was not finite (one host sync; the ranks agree)."""
        first = self.first_bad.clone()
        if world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = first.tolist()
        if any(map(math.isfinite, first)):
            update, name = min((u, n) for u, n in zip(first, self.names) if math.isfinite(u))
            raise ValueError(f"{phase or self.phase}: {name} is not finite at update {int(update)}; rerun with "
                             "a lower --lr (the checkpoint before it is kept)")

    def lap(self):
        """Count the time so far (a phase of no updates: a set prepared, a dataset sampled) and time the
        updates from here."""
        self.elapsed_s, self.t0 = self.now(), time.time()

    def now(self):
        """Seconds of the run so far: what a checkpoint stores as `elapsed`."""
        return self.elapsed_s + time.time() - self.t0

    def log(self, step, row, phase=None, full_total=None, preempted=False):
        """The row at update `step` (row: the loop's own fields first), then with `preempted` (preempted())
        a 'preempted' row, before the checkpoint of that update is written (a resumed log keeps both);
        returns the mean losses."""
        self.check(phase)
        dt, n = time.time() - self.t0, step - self.last
        self.elapsed_s, self.t0, self.last = self.elapsed_s + dt, time.time(), step
        means = (mean_over_ranks(self.sums) / n).tolist()
        self.sums.zero_()
        log_row(self.out, {**row, **dict(zip(self.names, means)), "sec_per_update": dt / n,
                           "elapsed_s": self.elapsed_s, "eta_s": (self.total - step) * dt / n})
        rehearsal_rate(phase or self.phase, n, dt, full_total or self.full_total, "update", last=True)
        if preempted:
            log_row(self.out, {"event": "preempted", "phase": phase or self.phase, "step": step})
        return means

def write_metrics(out_dir, method, dataset, teacher, reference, results, finished=False):
    """metrics.json of the run contract. reference: {'sampler': str, 'steps': int}; results: a list of
    {'model': 'teacher'|'student', 'steps', 'rmse_to_reference', 'fid', 'is', ...}; finished: last write."""
    write_json(os.path.join(out_dir, "metrics.json"), dict(method=method, dataset=dataset, teacher=teacher,
                                                           reference=reference, results=results,
                                                           finished=finished))

# ---- preemption: a scheduler's SIGTERM (or SIGUSR1, SLURM's --signal) stops a run at the end of an update ----
# The signal only sets a flag. Each training loop asks preempted() once per update, after the update: every
# rank then logs a 'preempted' row, writes the checkpoint of that update and raises Preempted, which cli ends
# with PREEMPTED_STATUS; the next start resumes from that update. Sampling phases ask once per round of
# batches, FID/IS scoring once per chunk of 8 batches (stop_if_preempted): what they wrote (PNGs per seed,
# pairs per chunk) is kept.
PREEMPTED_STATUS = 75  # EX_TEMPFAIL (sysexits.h): "try again later", for a job script to requeue on
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PREEMPT = [False]  # set by the signal handler, read by preempted()

class Preempted(KeyboardInterrupt):
    """A run stopped by preemption once its state was written (cli: PREEMPTED_STATUS)."""

def ask_to_stop(signum, frame):
    """The handler of PREEMPT_SIGNALS: the run stops at the end of its update (or round of sampling
    batches). A repeated signal changes nothing (torchrun forwards the scheduler's SIGTERM that the workers
    got too); the scheduler's kill after its grace period is the hard stop."""
    _PREEMPT[0] = True

def preempted():
    """Whether any rank was asked to stop, on every rank alike, so that all stop at the same update: under
    torchrun a one-element all-reduce of a CPU tensor on the gloo group, else the flag itself. Asked every
    update: it needs no device sync, so on a GPU it runs while the update's kernels are queued; measured
    0.33 ms a call with two ranks on a loaded 2-core CPU (docs/many_gpus.md), under 1% of a CPU update."""
    if world_size() == 1:
        return _PREEMPT[0]
    flag = torch.tensor([float(_PREEMPT[0])])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_WAIT_GROUP)
    return bool(flag.item())

_RUN = {}  # "out": the folder of the run this process works for (start_run), for stop_if_preempted's row

def log_preempted(phase):
    """The 'preempted' row of the run this process works for (none outside a run, e.g. tools/sample.py)."""
    if _RUN.get("out"):
        log_row(_RUN["out"], {"event": "preempted", "phase": phase})

def stop_if_preempted(what):
    """In a sampling phase, once per round of batches on every rank: on preemption a 'preempted' row (the
    phase) and Preempted; what the phase wrote so far is where the next start resumes."""
    if preempted():
        log_preempted(what)
        raise Preempted(what)

def cli(main):
    """Run main() as a command: expected failures (bad values, files, downloads, a full disk) end in one line
    'error: ...' that says what to do; a traceback is left for real bugs. SIGTERM and SIGUSR1 preempt the
    run (the state of its current update written, status PREEMPTED_STATUS); SIGINT (Ctrl-C) ends it at once
    in one line 'interrupted: ...' (rank 0's), status 1, resumed from the last checkpoint."""
    previous = {s: signal.signal(s, ask_to_stop) for s in PREEMPT_SIGNALS}
    try:
        main()
        rehearsal_report()
        if dist.is_initialized():  # a clean exit (a rank aborted at exit once in CI, gloo): DDP's reducers
            gc.collect()           # freed while their group lives, then every rank tears it down together
            dist.barrier()
            dist.destroy_process_group()
        return
    except (ValueError, OSError, EOFError) as e:
        line, status = f"error: {e}", 1
    except Preempted as e:
        line, status = f"preempted at {e}, its state written: rerun the same command to resume", \
            PREEMPTED_STATUS
    except KeyboardInterrupt:
        line, status = "interrupted: rerun the same command to resume", 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    shown = rank() == 0 or line.startswith("error")  # an error on any rank; the interruption once
    if dist.is_initialized():  # this rank's end of the group, without waiting for the others
        dist.destroy_process_group()
    if shown and status == 1:
        sys.exit(line)  # printed to stderr, status 1
    if shown:
        print(line, file=sys.stderr, flush=True)
    sys.exit(status)

# ---- standard diffusion training (Alg. 1) -----------------------------------------------------------------





def diffusion_loss(den, weighting, x, generator, y=None, vlb_weight=0.001):
    """Salimans & Ho alg. 1 (Ho et al. alg. 1), t ~ U[0, 1] or U{0..T-1}; learned-range variance adds Nichol &
    Dhariwal's lambda L_vlb = lambda T E_t[L_t] (sec. 3.1) with the mean under stop-gradient. y: x's labels
    (a class-conditional model)."""
    B, schedule, g = x.shape[0] * world_size(), den.schedule, generator  # x: this rank's part of B
    t = torch.randint(schedule.T, (B,), generator=g, device=g.device) if schedule.discrete else \
        torch.rand(B, generator=g, device=g.device)
    t = mine(t).to(x.device)
    alpha, sigma = (bcast(v, x) for v in schedule.alpha_sigma(t))
    eps = mine(torch.randn((B, *x.shape[1:]), generator=g, device=g.device)).to(x.device)
    z = alpha * x + sigma * eps
    x_pred, eps_pred, v = den.full(z, t, y=y)
    loss = weighted_loss(x_pred, eps_pred, x, eps, alpha, sigma, weighting)
    if den.var == "learned_range":
        loss = loss + vlb_weight * schedule.T * vlb_terms(schedule, z, t, x, x_pred.detach(), v)
    return loss.mean()

def grad_scaler(device, dtype):
    """fp16's loss scaling (Micikevicius et al. 2018): the loss is multiplied before backward so that small
    gradients do not underflow fp16's range, the gradients divided back before clipping and the step, which
    is skipped (and the scale lowered) when they overflow. A no-op for fp32 and bf16 (bf16 has fp32's range).
    Fused Adam takes the scale and the overflow flag on the device: no host sync per update on CUDA."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "fp16")

# --compile: the long sampling phases are the teacher's pairs, knowledge and synthetic sets and the FID
# samples; each network is compiled once. Measured on an H100: the CIFAR-10 U-Net's forward 2.7x, a pd_cifar10
# update 1.4x faster. Off by default: on CPU the compile time is not won back in short runs.
COMPILE_HELP = "torch.compile each network of the training loop and of the long sampling phases"

@dataclasses.dataclass
class TeacherConfig:
    """Alg. 1; defaults: the shared shapes teacher, a small linear-beta eps model with Nichol & Dhariwal's
    learned variance (hybrid loss), so that every method, DKDM's variance term included, has a CPU teacher."""
    data: str = field("shapes", f"dataset: {DATASETS}")
    image_size: int = field(16, "image resolution", low=8)
    net: str = field("tiny", "network preset (common.PRESETS)", choices=tuple(PRESETS))
    class_cond: bool = field(False, "class-conditional: a class embedding, labels from --data")
    dropout: float = field(0.0, "dropout in the res blocks", low=0.0, below=1.0)
    schedule: str = field("linear", "noise schedule", choices=("linear", "cosine", "cosine_logsnr"))
    param: str = field("eps", "network output", choices=PARAMS[:4])
    weighting: str = field("snr", "loss weighting (see weighted_loss)", choices=WEIGHTINGS)
    var: str = field("learned_range", "ancestral variance", choices=("fixed_small", "fixed_large",
                                                                     "learned_range"))
    updates: int = field(1500, "updates (the lr is constant after warm-up: runs extend)", low=1, fixed=False)
    batch: int = field(16, "batch size", low=1)
    lr: float = field(5e-4, "Adam learning rate", low=0.0)
    warmup: int = field(100, "linear warm-up updates", low=0)
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)", low=0.0)
    ema: float = field(0.995, "EMA decay", low=0.0, below=1.0)
    grad_clip: float = field(1.0, "clip the global gradient norm (0 = off)", low=0.0)
    seed: int = field(0, "seed")
    device: str = field("auto", "auto | cpu | cuda[:N]", fixed=False)
    dtype: str = field("fp32", "network precision (fp16: with loss scaling)", choices=("fp32", "bf16", "fp16"))
    compile: bool = field(False, COMPILE_HELP, fixed=False)
    log_every: int = field(100, "log every N updates", low=1, fixed=False)
    ckpt_every: int = field(1000, "checkpoint every N updates", low=1, fixed=False)
    sample_steps: int = field(50, "DDIM steps for the sample grid", low=1, fixed=False)
    out: str = field("runs/teacher", "run directory (config.json, log.jsonl, ckpt.pt, samples.png)",
                     fixed=False)
    resume: str = field("auto", "auto (continue from --out/ckpt.pt if present) | none | PATH", fixed=False)

@one_writer
def train_teacher(cfg, full_updates=None):
    """Train a diffusion model from scratch (Alg. 1) into cfg.out/ckpt.pt, resumable, and write a sample grid.
    Returns the checkpoint path; the checkpoint loads with load_teacher. full_updates: the full run's, under
    --rehearse."""
    if cfg.var == "learned_range" and cfg.schedule == "cosine_logsnr":
        raise ValueError("--var learned_range needs a discrete schedule (linear or cosine)")
    device = setup_device(cfg.device)
    check_batch(batch=cfg.batch)
    ckpt, path = read_resume(cfg), os.path.join(cfg.out, "ckpt.pt")
    if ckpt and ckpt["step"] >= cfg.updates and os.path.exists(os.path.join(cfg.out, "samples.png")):
        return path  # finished: nothing to do, nothing rewritten
    data, labels = load_dataset(cfg.data, cfg.image_size, seed=cfg.seed, labels=True)
    if cfg.class_cond and labels is None:
        raise ValueError(f"--class-cond: --data {cfg.data} has no class labels; use {LABELLED}")
    classes = dataset_classes(cfg.data) if cfg.class_cond else 0
    data, labels = data_to(device, data, labels if classes else None)
    out_ch = 3 * (2 if cfg.param == "both" else 1) + (3 if cfg.var == "learned_range" else 0)
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.net, image_size=data.shape[-1], out_channels=out_ch, dropout=cfg.dropout,
                    num_classes=classes).to(device)
    den = Denoiser(net, Schedule(cfg.schedule), cfg.param, cfg.var)
    trained, ema = compiled(data_parallel(den), cfg.compile), copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device != "cpu")  # one kernel for the whole update on CUDA
    gen = torch.Generator(device).manual_seed(cfg.seed)  # the same on every rank: the global batch's draws
    scaler = grad_scaler(device, cfg.dtype)
    rank_dropout_seed(cfg.seed)
    step, elapsed = 0, 0.0
    start_run(cfg, ckpt, outputs=("samples.png",), batch=cfg.batch)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"]), scaler.load_state_dict(ckpt.get("scaler", {}))
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        restore_generator(gen, ckpt["gen"], step)
    net.train()
    meter = Meter(cfg.out, step, cfg.updates, elapsed, device, phase="base model (Alg. 1)",
                  full_total=full_updates)
    while step < cfg.updates:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        x, y = sample_batch(data, cfg.batch, gen, labels)
        with autocast(device, cfg.dtype):
            loss = diffusion_loss(trained, cfg.weighting, x, gen, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, net, cfg.ema)
        step += 1
        meter.add(loss)
        stop = preempted()
        if step % cfg.log_every == 0 or step == cfg.updates or stop:
            meter.log(step, {"stage": "teacher", "step": step}, preempted=stop)
        if step % cfg.ckpt_every == 0 or step == cfg.updates or stop:
            meter.check()  # never a checkpoint after a non-finite loss
            save_checkpoint(path, **den.state(), ema=ema.state_dict(), method="teacher",
                            config=dataclasses.asdict(cfg), optimizer=opt.state_dict(), step=step,
                            gen=generator_state(gen), scaler=scaler.state_dict(), elapsed=meter.now())
        if stop:
            raise Preempted(f"update {step}")
    z = seeded_noise(range(64), data.shape[1:], device)
    y = (torch.arange(64, device=device) // 8) % classes if classes else None  # a row per class
    grid = ddim_sample(den.copy(ema).freeze(), z, sampler_times(den.schedule, cfg.sample_steps), True, y)
    save_grid(grid, os.path.join(cfg.out, "samples.png"))
    barrier()  # every rank leaves with the final checkpoint on disk (the next step loads it)
    return path

def cached_teacher(cfg=None):
    """A teacher trained once with `cfg` (default TeacherConfig()) and cached under CACHE_DIR/teachers,
    keyed by the config, so every script and test reuses the same one. Returns its checkpoint path."""
    cfg = cfg or TeacherConfig()
    free = ("out", "resume", "device", "log_every", "ckpt_every", "sample_steps", "compile")
    recipe, net = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}, PRESETS[cfg.net]
    defaults = type(net)()  # the preset's architecture as the fields it sets: a new field keeps the key
    recipe["net"] = {k: v for k, v in dataclasses.asdict(net).items() if v != getattr(defaults, k)}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{cfg.data.replace(':', '_').replace('/', '_')}{cfg.image_size}_{key}.pt"
    path = os.path.join(CACHE_DIR, "teachers", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        if os.name == "posix" and rank() == 0:  # runs sharing the cache (pytest -n workers): one trains
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)    # may wait while another job trains it: the others wait
        wait_for_fetchers()                     # on the 24-hour group
        if not broadcast_object(os.path.exists(path)):  # the ranks of one run train it together
            if cfg.batch % world_size():
                raise ValueError(
                    f"the cached {cfg.data} teacher ({name}) trains once at batch {cfg.batch}, "
                    f"which does not split over {world_size()} processes: run this command once "
                    "as one process (or a divisor of the batch); later runs on any number reuse it")
            run_dir = path[:-3] + "_run"
            if rank() == 0:
                print(f"training the {cfg.data} teacher once ({cfg.updates} updates) into {run_dir}",
                      flush=True)
            trained = train_teacher(dataclasses.replace(cfg, out=run_dir))
            if rank() == 0:
                shutil.copyfile(trained, path + ".tmp")
                os.replace(path + ".tmp", path)
        barrier()  # every rank leaves with the cached file on disk
    return path

if __name__ == "__main__":
    cli(lambda: print(train_teacher(parse_config(TeacherConfig, doc="Train a diffusion model (Alg. 1).")))
        if rank() == 0 else None)
