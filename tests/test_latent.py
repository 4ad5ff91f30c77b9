"""Latent-diffusion teachers (issue #31): the VQ-f4 autoencoder against diffusers' VQModel and the LDM key
layout, its loaders, the cin256-v2 cross-attention blocks against a float64 reference written from
ldm/modules/attention.py, the 'scaled_linear' schedule against diffusers, and LDM's DDIM grids. Random
weights, no downloads."""
import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import common as C
import runtime as R
from standins import one_line, perturb

TINY = C.AUTOENCODERS["vq_tiny"]
# the hub's vqvae/config.json of CompVis/ldm-celebahq-256 (reference notes B), no scaling_factor
CELEBAHQ_VQVAE = {
    "_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3, "in_channels": 3, "latent_channels": 3,
    "layers_per_block": 2, "num_vq_embeddings": 8192, "out_channels": 3, "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 3}
# a small diffusers VQModel with attention at the 8-pixel level and z_channels != embed_dim
SMALL_VQVAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, vq_embed_dim=3,
                   num_vq_embeddings=32, sample_size=16,
                   down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))

def test_vq_f4_is_the_ldm_and_hub_autoencoder():
    """vq_f4 has LDM model.py's tensor names and shapes and as many parameters as diffusers' VQModel of the
    hub config (55.3M, the hub's 221 MB fp32 file), which vq_config_from_diffusers maps onto vq_f4."""
    from diffusers import VQModel as DiffusersVQModel
    assert R.vq_config_from_diffusers(CELEBAHQ_VQVAE) == C.AUTOENCODERS["vq_f4"]
    with torch.device("meta"):
        ours = C.build_net(C.AUTOENCODERS["vq_f4"]).state_dict()
        theirs = DiffusersVQModel(**{k: v for k, v in CELEBAHQ_VQVAE.items() if k != "_class_name"})
    count = sum(t.numel() for t in ours.values())
    assert count == sum(p.numel() for p in theirs.parameters()) == 55_322_782
    ldm = {  # names and shapes read off ldm/modules/diffusionmodules/model.py Encoder/Decoder, autoencoder.py
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.mid.block_2.norm2.weight": (512,), "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (3, 512, 3, 3), "quant_conv.weight": (3, 3, 1, 1),
        "quantize.embedding.weight": (8192, 3), "post_quant_conv.weight": (3, 3, 1, 1),
        "decoder.conv_in.weight": (512, 3, 3, 3), "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
        "decoder.up.2.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.2.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3)}
    assert {k: tuple(ours[k].shape) for k in ldm} == ldm
    assert not any(k.startswith(("encoder.down.2.downsample", "decoder.up.0.upsample")) or ".attn." in k
                   for k in ours)  # no resampler past the ends, no attention outside the mid blocks
    assert len([k for k in ours if k.startswith("decoder.up.1.block.") and k.endswith("conv1.weight")]) == 3

@pytest.fixture(scope="module")
def small_vqvae(tmp_path_factory):
    """A small diffusers VQModel of perturbed random weights (codebook N(0, 1)), saved as a pipeline's
    vqvae/."""
    from diffusers import VQModel as DiffusersVQModel
    torch.manual_seed(0)
    ref = perturb(DiffusersVQModel(**SMALL_VQVAE).eval(), 1, 0.1)
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()
    folder = tmp_path_factory.mktemp("pipeline")
    ref.save_pretrained(folder / "vqvae")
    return ref, folder

def test_autoencoder_matches_diffusers_vqmodel(small_vqvae, tmp_path, monkeypatch):
    """load_autoencoder of a diffusers folder (its default scaling_factor 0.18215 ignored) encodes and
    decodes, with and without quantization, as diffusers' VQModel does. Tolerance 1e-4 on outputs of size
    ~2: float32 rounding of the same sums in another order (1x1 convs for Linears, fused attention), ~4e-6
    here; a wrong name, level order or missing step is O(1). A hub id reads the pipeline's vqvae/."""
    ref, folder = small_vqvae
    assert ref.config.scaling_factor == 0.18215
    ae = R.load_autoencoder(str(folder))
    monkeypatch.setattr("runtime.CACHE_DIR", str(tmp_path))  # hub_download's cache, filled: no request
    shutil.copytree(folder, tmp_path / "hub" / "CompVis--ldm-celebahq-256" / "main")
    hub = R.load_autoencoder("CompVis/ldm-celebahq-256").state_dict()
    assert all(torch.equal(v, hub[k]) for k, v in ae.state_dict().items())
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    assert ae.config == dataclasses.replace(TINY, z_channels=4, embed_dim=3, n_embed=32)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = ref.encode(x).latents
        assert (ae.encode(x) - h).abs().max() <= 1e-4
        assert (ae.quantize(h) - ref.quantize(h)[0]).abs().max() == 0  # the same codebook entries
        assert (ae.quantize(h) - h).abs().max() > 0.1  # and quantizing moved the latents
        for quantize in (True, False):
            want = ref.decode(h, force_not_quantize=not quantize).sample
            assert (ae.decode(h, quantize=quantize) - want).abs().max() <= 1e-4, quantize
        assert (ae.decode(h) - ae.decode(h, quantize=False)).abs().max() > 0.1

def test_autoencoder_from_old_diffusers_names(small_vqvae):
    """A state dict with the attention names of diffusers' early files (query, key, value, proj_attn), as
    the first ldm-celebahq-256 upload may have, loads to the same weights; a tensor too many is one line."""
    ref, _ = small_vqvae
    cfg = R.vq_config_from_diffusers(dict(ref.config))
    new = ref.state_dict()
    old = {}
    for k, v in new.items():
        for a, b in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{a}.", f".{b}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    a, b = (R.autoencoder_from_diffusers(sd, cfg).state_dict() for sd in (new, old))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError) as e:
        R.autoencoder_from_diffusers({**new, "encoder.extra.weight": torch.zeros(1)}, cfg)
    assert "1 unexpected, e.g. 'encoder.extra.weight'" in one_line(e)

def test_autoencoder_loads_from_ldm_layout_and_own_checkpoint(tmp_path):
    """An LDM model.ckpt ({'state_dict': ...} with model.diffusion_model.*, cond_stage_model.* and
    first_stage_model.* tensors) gives back exactly the autoencoder it was made from; so does a checkpoint of
    this project (net_config as JSON + state dict); a wrong ddconfig is a one-line error."""
    torch.manual_seed(0)
    ae = perturb(C.build_net(TINY), 3, 0.1)
    ldm = {"model.diffusion_model.out.2.weight": torch.zeros(3), "cond_stage_model.embedding.weight":
           torch.zeros(4, 2), **{f"first_stage_model.{k}": v for k, v in ae.state_dict().items()}}
    torch.save({"state_dict": ldm, "global_step": 7}, tmp_path / "model.ckpt")
    R.save_checkpoint(str(tmp_path / "ae.pt"), net_config=json.loads(json.dumps(C.net_config(ae))),
                      model=ae.state_dict())
    for loaded in (R.autoencoder_from_ldm(ldm, TINY), R.load_autoencoder(str(tmp_path / "model.ckpt"), TINY),
                   R.load_autoencoder(str(tmp_path / "ae.pt"))):
        assert loaded.config == TINY
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ae.state_dict().items())
    with pytest.raises(ValueError) as e:
        R.autoencoder_from_ldm(ldm, dataclasses.replace(TINY, n_embed=8192))
    assert "1 of another shape, e.g. 'quantize.embedding.weight'" in one_line(e)

def test_ldm_state_dict_without_first_stage_model(tmp_path):
    """A state dict with no first_stage_model.* (a bare UNet, a converted teacher) and a checkpoint of this
    project without an autoencoder are one-line errors that say what was expected."""
    with pytest.raises(ValueError) as e:
        R.autoencoder_from_ldm({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(3)}})
    assert "has no first_stage_model.* (an LDM model.ckpt holds its autoencoder" in one_line(e)
    den = C.Denoiser(C.build_net("tiny16"), C.Schedule(), "eps")
    R.save_checkpoint(str(tmp_path / "teacher.pt"), **den.state())
    with pytest.raises(ValueError) as e:
        R.load_autoencoder(str(tmp_path / "teacher.pt"))
    assert "no autoencoder's (arch 'unet')" in one_line(e)

def reference_spatial_transformer(sd, x, context, heads):
    """LDM SpatialTransformer in float64 from its description (ldm/modules/attention.py): GN(32, 1e-6),
    1x1 proj_in, per block x += attn1(LN x), x += attn2(LN x, context), x += W2 (a * gelu(gate)) with
    [a | gate] = W0 LN x; 1x1 proj_out; + input. Attention: softmax(q k^T / sqrt(d)) v per head."""
    sd = {k: v.double() for k, v in sd.items()}
    x, context = x.double(), context.double()
    B, C_, H, W = x.shape
    h = F.group_norm(x, 32, sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    h = torch.einsum("oc,bcn->bno", sd["proj_in.weight"][:, :, 0, 0], h.flatten(2)) + sd["proj_in.bias"]

    def ln(v, name):
        return F.layer_norm(v, v.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    def attend(v, ctx, name):
        q, k, val = (torch.einsum("oi,bni->bno", sd[f"{name}.to_{c}.weight"], src).unflatten(2, (heads, -1))
                     for c, src in (("q", v), ("k", ctx), ("v", ctx)))
        w = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        out = torch.einsum("bhnm,bmhd->bnhd", w, val).flatten(2)
        return out @ sd[f"{name}.to_out.0.weight"].T + sd[f"{name}.to_out.0.bias"]

    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        h = h + attend(ln(h, p + "norm1"), ln(h, p + "norm1"), p + "attn1")
        h = h + attend(ln(h, p + "norm2"), context, p + "attn2")
        proj = ln(h, p + "norm3") @ sd[p + "ff.net.0.proj.weight"].T + sd[p + "ff.net.0.proj.bias"]
        a, gate = proj.chunk(2, dim=-1)
        h = h + (a * F.gelu(gate)) @ sd[p + "ff.net.2.weight"].T + sd[p + "ff.net.2.bias"]
    out = torch.einsum("oc,bnc->bon", sd["proj_out.weight"][:, :, 0, 0], h) + sd["proj_out.bias"][:, None]
    return x + out.view(B, C_, H, W)

def test_spatial_transformer_matches_float64_reference():
    """Our SpatialTransformer (2 heads of 16, depth 2, a 3-token context of width 12) with random weights
    equals the reference: in float64 to 1e-10 (the same math in another order), in float32 to 1e-4 (float32
    rounding, ~1e-6 here; a missing norm, scale or residual is O(0.1)). LDM's tensor names, zero proj_out."""
    torch.manual_seed(0)
    st = C.SpatialTransformer(64, heads=2, dim_head=16, context_dim=12, depth=2)
    x, context = torch.randn(2, 64, 4, 4), torch.randn(2, 3, 12)
    with torch.no_grad():
        assert torch.equal(st(x, context), x)  # the zeroed proj_out: the block starts as the identity
    names = {"norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"}
    for i in range(2):
        names |= {f"transformer_blocks.{i}.{n}" for n in (
            "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
            "attn1.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight",
            "ff.net.2.bias", "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight",
            "attn2.to_out.0.weight", "attn2.to_out.0.bias", "norm1.weight", "norm1.bias", "norm2.weight",
            "norm2.bias", "norm3.weight", "norm3.bias")}
    assert set(st.state_dict()) == names
    assert st.state_dict()["transformer_blocks.0.attn2.to_k.weight"].shape == (32, 12)
    assert st.state_dict()["transformer_blocks.0.ff.net.0.proj.weight"].shape == (2 * 4 * 32, 32)
    perturb(st, 4, scale=0.3)
    want = reference_spatial_transformer(st.state_dict(), x, context, heads=2)
    with torch.no_grad():
        assert (st(x, context) - want).abs().max() <= 1e-4
        assert (st.double()(x.double(), context.double()) - want).abs().max() <= 1e-10
        assert (want - x.double()).abs().max() > 0.1  # the block does something

def test_class_embedder_gives_a_one_token_context():
    """ClassEmbedder: labels (B,) -> (B, 1, embed_dim) rows of its table (LDM key 'embedding'); with one
    token, cross-attention is to_out(to_v(c)) at every position (the softmax over one key is 1)."""
    torch.manual_seed(0)
    emb = C.ClassEmbedder(1001, 12)
    y = torch.tensor([3, 1000])
    c = emb(y)
    assert list(emb.state_dict()) == ["embedding.weight"] and c.shape == (2, 1, 12)
    assert torch.equal(c[:, 0], emb.embedding.weight[y])
    attn = C.CrossAttention(32, heads=2, dim_head=16, context_dim=12)
    with torch.no_grad():
        out = attn(torch.randn(2, 5, 32), c)
        assert (out - attn.to_out(attn.to_v(c))).abs().max() <= 1e-6  # float32 rounding of the sums

def test_scaled_linear_schedule_matches_diffusers(tmp_path):
    """'scaled_linear' (LDM's "linear": sqrt-beta linear from 0.0015 to 0.0195) has diffusers' DDIMScheduler
    alphas_cumprod to 2e-6 relative (diffusers computes them in float32, we in float64 like LDM: ~1e-6), is
    rebuilt from its spec, and load_diffusers reads it from a scheduler config."""
    from diffusers import DDIMScheduler, UNet2DModel
    s = C.Schedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)
    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195).alphas_cumprod
    assert torch.allclose(s.alphas_cumprod, theirs.double(), rtol=2e-6, atol=0)
    assert s.alphas_cumprod[0] == pytest.approx(1 - 0.0015, abs=1e-15)
    assert not torch.allclose(C.Schedule("linear", beta_start=0.0015, beta_end=0.0195).alphas_cumprod,
                              s.alphas_cumprod, rtol=1e-2)  # not the plain linear schedule
    assert s.spec() == dict(kind="scaled_linear", T=1000, beta_start=0.0015, beta_end=0.0195, t_scale=1.0)
    assert torch.equal(C.Schedule(**s.spec()).alphas_cumprod, s.alphas_cumprod)
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
    unet.save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.0015,
         "beta_end": 0.0195, "clip_sample": False, "num_train_timesteps": 1000}))
    assert R.load_teacher(str(tmp_path)).schedule.spec() == s.spec()

def test_ldm_ddim_grids():
    """'ldm' is LDM's make_ddim_timesteps('uniform'): range(0, T, T // S) + 1, whole (17/33/67 steps for
    S = 16/32/64); 'ldm_exact' is DSD's arange(S) * (T // S) + 1 (64 steps from 946); grids reaching t = T
    and counts check_steps refuses are one-line errors; the methods' SKIPS are unchanged."""
    assert C.SKIPS == ("uniform", "quad", "trailing", "linspace", "unit")
    for S in (2, 4, 8, 16, 32, 64, 100, 200):
        c = 1000 // S
        assert C.ddim_timesteps(1000, S, "ldm") == [t + 1 for t in range(0, 1000, c)][::-1]
        assert C.ddim_timesteps(1000, S, "ldm_exact") == [i * c + 1 for i in range(S)][::-1]
    assert [len(C.ddim_timesteps(1000, S, "ldm")) for S in (2, 4, 8, 16, 32, 64, 100)] == \
        [2, 4, 8, 17, 33, 67, 100]
    ldm64 = C.ddim_timesteps(1000, 64, "ldm")
    assert ldm64[:3] == [991, 976, 961] and ldm64[-1] == 1
    assert C.ddim_timesteps(1000, 64, "ldm_exact")[:2] == [946, 931]
    assert C.ddim_timesteps(1000, 4, "ldm") == C.ddim_timesteps(1000, 4, "ldm_exact") == [751, 501, 251, 1]
    assert C.ddim_timesteps(1000, 1, "ldm") == [999]  # the project's 1-step rule (LDM's own: [1])
    assert C.sampler_times(C.Schedule("scaled_linear"), 16, "ldm_exact")[0] == 931
    with pytest.raises(ValueError) as e:  # range(0, 1000, 111) + 1 ends at 1000
        C.ddim_timesteps(1000, 9, "ldm")
    assert "reaches t = 1000" in one_line(e)
    assert C.ddim_timesteps(1000, 9, "ldm_exact")[0] == 889
    with pytest.raises(ValueError) as e:
        C.check_steps(C.Schedule(), "ldm", steps=4, reference_steps=9)
    assert one_line(e).startswith("--reference-steps 9: the ldm grid of 9 steps")
    C.check_steps(C.Schedule(), "ldm_exact", steps=9)
    with pytest.raises(ValueError) as e:
        C.ddim_timesteps(1000, 4, "ldm_uniform")
    assert "ldm, ldm_exact" in one_line(e)
