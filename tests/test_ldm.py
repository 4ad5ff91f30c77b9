"""The CompVis latent-diffusion U-Nets (issue #31): the LDM-VQ-4 U-Net against diffusers' UNet2DModel of
CompVis/ldm-celebahq-256's config, the cin256-v2 cross-attention U-Net, and LDM model.ckpt conversion (the
denoiser, its EMA copy, the autoencoder) by tools/convert_teacher.py. Fake model.ckpt files of random weights
laid out as latent_and_conditional.md A.5 describes; no downloads."""
import copy
import dataclasses
import json

import pytest
import torch

import common as C
import runtime as R
from standins import one_line, perturb
from tools.convert_teacher import main as convert, to_original

# CompVis/ldm-celebahq-256 unet/config.json (latent_and_conditional.md B)
CELEBAHQ_UNET = dict(
    sample_size=64, in_channels=3, out_channels=3, block_out_channels=[224, 448, 672, 896],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
    attention_head_dim=32, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
    norm_num_groups=32, time_embedding_type="positional")
SMALL_UNET = dict(CELEBAHQ_UNET, sample_size=16, block_out_channels=[32, 64, 96, 128])  # = PRESETS["ldm_tiny"]
LDM_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                 "beta_end": 0.0195, "clip_sample": False, "num_train_timesteps": 1000}
LDM_SPEC = dict(kind="scaled_linear", T=1000, beta_start=0.0015, beta_end=0.0195, t_scale=1.0)
CKPT_KEYS = {"format", "net_config", "model", "schedule", "param", "var", "sampler", "autoencoder",
             "converted_from", "ema_used", "log_bytes"}

def ldm_alphas_cumprod():
    """ddpm.py register_schedule's buffer: make_beta_schedule('linear', 1000, 0.0015, 0.0195), stored float32."""
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()

def first_stage(seed):
    """A vq_tiny autoencoder's state dict as an LDM model.ckpt holds it (first_stage_model.*)."""
    torch.manual_seed(seed)
    ae = perturb(C.build_net(C.AUTOENCODERS["vq_tiny"]), seed)
    return {f"first_stage_model.{k}": v for k, v in ae.state_dict().items()}

def convert_ldm(state_dict, tmp_path, name):
    """Save {'state_dict': ...} as a Lightning model.ckpt, convert it; (teacher, found, raw checkpoint)."""
    src, dst = tmp_path / f"{name}.ckpt", tmp_path / f"{name}.pt"
    torch.save({"state_dict": state_dict, "global_step": 0}, src)
    found = convert([str(src), str(dst)])
    return R.load_teacher(str(dst)), found, torch.load(dst, weights_only=True)

@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    """A shrunk ldm-celebahq-256 UNet2DModel of random weights saved as a diffusers folder, its output, and
    the same weights as a celeba-style LDM state dict (the converter's inverse map, LDM's prefixes)."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**SMALL_UNET).eval(), 1)
    folder = tmp_path_factory.mktemp("ldm_celebahq_small")
    ref.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(LDM_SCHEDULER))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 871.5])
    with torch.no_grad():
        y = ref(x, t).sample
    den = R.load_teacher(str(folder))
    ldm = to_original(den.net.state_dict(), C.PRESETS["ldm_tiny"], "ldm")
    return dict(den=den, x=x, t=t, y=y, ldm=dict(ldm, alphas_cumprod=ldm_alphas_cumprod()))

def test_ldm_vq4_unet_is_the_hub_unet():
    """ldm_vq4_unet is the hub config (save the qkv order, a property of LDM files) with diffusers' parameter
    count, DSD table 3's 274.06M; ldm_tiny is the shrunk config of the next test."""
    from diffusers import UNet2DModel
    legacy = lambda cfg: dataclasses.replace(cfg, qkv_layout="legacy")
    assert legacy(R.unet_config_from_diffusers(CELEBAHQ_UNET)) == C.PRESETS["ldm_vq4_unet"]
    assert legacy(R.unet_config_from_diffusers(SMALL_UNET)) == C.PRESETS["ldm_tiny"]
    with torch.device("meta"):
        theirs = sum(p.numel() for p in UNet2DModel(**CELEBAHQ_UNET).parameters())
        ours = sum(p.numel() for p in C.build_net("ldm_vq4_unet").parameters())
    assert ours == theirs == 274_056_163

def test_ldm_unet_equals_diffusers_through_both_loaders(celeba, tmp_path):
    """The same weights through load_teacher of the diffusers folder and through an LDM model.ckpt's
    conversion give diffusers' output. 2e-5 absorbs float32 reassociation (outputs are O(1))."""
    den, found, ckpt = convert_ldm({**celeba["ldm"], **first_stage(2)}, tmp_path, "celeba")
    assert found["format"] == "ldm" and found["preset"] == "ldm_tiny" and found["ema_used"] is False
    for d in (celeba["den"], den):
        assert d.schedule.spec() == LDM_SPEC and (d.param, d.var) == ("eps", "fixed_small")
        with torch.no_grad():
            diff = (d.net(celeba["x"], celeba["t"]) - celeba["y"]).abs().max().item()
        print(f"{d.source}: LDM U-Net vs diffusers max|diff| = {diff:.2e}")
        assert diff <= 2e-5
    assert den.net.config == C.PRESETS["ldm_tiny"]

def test_ldm_ckpt_needs_its_autoencoder_and_keeps_it(celeba, tmp_path):
    """Without first_stage_model.* the one-line error; with it the checkpoint holds the autoencoder, equal
    to the source tensors; a file whose schedule buffer is not LDM's is refused."""
    with pytest.raises(ValueError) as e:
        convert_ldm(celeba["ldm"], tmp_path, "no_ae")
    assert "an LDM model.ckpt holds its autoencoder under first_stage_model.*" in one_line(e)
    source = first_stage(3)
    _, found, ckpt = convert_ldm({**celeba["ldm"], **source}, tmp_path, "with_ae")
    assert set(ckpt) == CKPT_KEYS and found["autoencoder"] == "vq_tiny" and ckpt["ema_used"] is False
    assert ckpt["autoencoder"]["net_config"] == C.net_config(C.build_net(C.AUTOENCODERS["vq_tiny"]))
    stored = ckpt["autoencoder"]["model"]
    assert stored.keys() == {k[len("first_stage_model."):] for k in source}
    assert all(torch.equal(stored[k[len("first_stage_model."):]], v) for k, v in source.items())
    C.build_net(ckpt["autoencoder"]["net_config"]).load_state_dict(stored)  # loadable as it is
    wrong = dict(celeba["ldm"], alphas_cumprod=C.Schedule("linear").alphas_cumprod.float())
    with pytest.raises(ValueError) as e:
        convert_ldm({**wrong, **source}, tmp_path, "wrong_schedule")
    assert "alphas_cumprod" in one_line(e)

def test_cross_attention_unet_ckpt_with_and_without_ema(tmp_path, capsys):
    """A cin256-v2-style model.ckpt (ldm_cin_tiny) converts with and without model_ema.*; with it, the EMA
    weights (made to differ from the raw ones) are what loads, the class embedder (not in LitEma) the raw
    one. The label changes the output, the null class 1000 is one of the 1001 and labels are required."""
    cfg = C.PRESETS["ldm_cin_tiny"]
    torch.manual_seed(0)
    raw = perturb(C.UNet(cfg).eval(), 4)
    ema = perturb(copy.deepcopy(raw), 5)
    raw_sd = to_original(raw.state_dict(), cfg, "ldm")
    assert raw_sd["cond_stage_model.embedding.weight"].shape == (1001, 64)
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in raw_sd
    shadow = {"model_ema." + k[len("model."):].replace(".", ""): v  # ldm/modules/ema.py LitEma names
              for k, v in to_original(ema.state_dict(), cfg, "ldm").items() if k.startswith("model.")}
    assert "model_ema.diffusion_modelinput_blocks00weight" in shadow  # A.5's example
    shadow.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})

    den, found, ckpt = convert_ldm({**raw_sd, **first_stage(6)}, tmp_path, "raw")
    assert (found["preset"], found["ema_used"], ckpt["ema_used"]) == ("ldm_cin_tiny", False, False)
    assert all(torch.equal(den.net.state_dict()[k], v) for k, v in raw.state_dict().items())

    den, found, ckpt = convert_ldm({**raw_sd, **shadow, **first_stage(6)}, tmp_path, "ema")
    assert found["ema_used"] is True and ckpt["ema_used"] is True and "ema_used True" in capsys.readouterr().out
    loaded = den.net.state_dict()
    for k, v in ema.state_dict().items():
        want = raw.state_dict()[k] if k.startswith("class_context.") else v
        assert torch.equal(loaded[k], want), k
    assert not torch.equal(loaded["conv_in.weight"], raw.state_dict()["conv_in.weight"])

    assert den.num_classes == 1001 and den.net.label_emb is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        a, b, null = (den.net(x, t, torch.tensor([y, y])) for y in (3, 4, 1000))
        x_pred, _ = den(x, 500, y=torch.tensor([3, 1000]))
    print(f"class 3 vs 4 max|diff| = {(a - b).abs().max():.3e}, vs null {(a - null).abs().max():.3e}")
    assert (a - b).abs().max() > 1e-4 and (a - null).abs().max() > 1e-4  # ~1e-2 at these weights
    assert x_pred.shape == x.shape
    with pytest.raises(ValueError) as e:
        den.net(x, t)
    assert "needs labels" in one_line(e)

def test_context_needs_classes_and_ldm_cin256_v2_count():
    """ldm_cin256_v2: 400.92M without its class embedder (DSD table 3), one head of all channels in every
    SpatialTransformer (openaimodel.py legacy: dim_head = ch // num_heads); a context without classes is a
    one-line error."""
    with torch.device("meta"):
        net = C.build_net("ldm_cin256_v2")
    count = sum(p.numel() for p in net.parameters())
    assert count == 401_433_091 and count - 1001 * 512 == 400_920_579
    assert net.mid_attn.transformer_blocks[0].attn1.heads == 1 and net.mid_attn.proj_in.out_channels == 960
    assert net.down[1].attn[0].transformer_blocks[0].attn2.to_k.weight.shape == (384, 512)
    with pytest.raises(ValueError) as e:
        C.UNet(dataclasses.replace(C.PRESETS["ldm_cin_tiny"], num_classes=0))
    assert "needs num_classes" in one_line(e)

# ---- classifier-free guidance and the latent runs of self_distill.py and dkdm.py -------------------------

def test_classifier_free_guidance_is_one_batched_pass():
    """guided(w): out_u + w (out_c - out_u) with out_u at the null class, from one batched pass; w = 1 is the
    conditional model (1e-5 on outputs ~1: float32 at another batch size, the pass runs 2B); w per sample;
    an unconditional model refuses a scale in one line."""
    torch.manual_seed(0)
    den = C.Denoiser(perturb(C.build_net(C.PRESETS["ldm_cin_tiny"]).eval(), 1, 0.05), C.Schedule(), "eps")
    z, y, null = torch.randn(3, 3, 16, 16), torch.tensor([3, 7, 999]), torch.full((3,), 1000)
    with torch.no_grad():
        cond, uncond = den(z, 600, y=y)[1], den(z, 600, y=null)[1]
        assert (den.guided(1.0)(z, 600, y=y)[1] - cond).abs().max() <= 1e-5
        w = torch.tensor([1.5, 3.0, 4.0])
        want = uncond + w[:, None, None, None] * (cond - uncond)
        assert (den.guided(w)(z, 600, y=y)[1] - want).abs().max() <= 1e-5 * want.abs().max()
        assert (den.guided(3.0)(z, 600, y=y)[1] - cond).abs().max() > 1e-3
    plain = C.Denoiser(C.build_net(C.PRESETS["ldm_tiny"]), C.Schedule(), "eps", source="celeba.pt")
    with pytest.raises(ValueError) as e:
        plain.guided(2.0)
    assert "celeba.pt is unconditional" in one_line(e)

LATENT_AE = C.VQConfig(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=4096)

@pytest.fixture(scope="module")
def latent_teacher(tmp_path_factory):
    """The cached shapes eps teacher read as a latent model: its 3x16x16 space is the latent space of a random
    VQ autoencoder (4096 codes) whose decoder makes 32x32 images. Samples live in latent space; evaluation
    decodes them."""
    state = R.load_checkpoint(R.cached_teacher())
    torch.manual_seed(0)
    ae = perturb(C.build_net(LATENT_AE).eval(), 2)
    path = str(tmp_path_factory.mktemp("latent") / "latent_shapes.pt")
    R.save_checkpoint(path, **{k: state[k] for k in ("net_config", "model", "ema", "schedule", "param", "var")},
                      autoencoder=dict(net_config=C.net_config(ae), model=ae.state_dict()), method="teacher")
    return path

def test_latent_teacher_samples_latents_and_decodes_images(latent_teacher):
    den = R.load_teacher(latent_teacher)
    assert den.image_shape == (3, 32, 32) and den.autoencoder is not None
    z = C.seeded_noise(range(2), (3, 16, 16))
    with torch.no_grad():
        x = C.ddim_sample(den, z, [999, 500, 0], clip=True)
        assert (x - C.ddim_sample(den, z, [999, 500, 0])).abs().max() == 0  # latents are never clipped
        images = den.image(x)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1

@torch.no_grad()
def latent_rmse(den, reference, steps, skip="unit", clip=False):
    """RMSE in latent space between den's `steps`-step DDIM latents and `reference` (same seeds 0..n-1)."""
    z = C.seeded_noise(range(len(reference)), tuple(reference.shape[1:]))
    return C.rmse(C.ddim_sample(den, z, C.sampler_times(den.schedule, steps, skip), clip), reference)

def test_self_distill_fine_tunes_a_latent_teacher(latent_teacher, tmp_path):
    """DSDI 16 -> 2 in latent space on DSD's LDM grid (trajectories of 3x16x16 latents; evaluation decodes to
    32x32 images):
    in latent space the 2-step output is closer to the original model's 16-step output than its own 2-step
    DDIM (decoded through this random codebook both are near its images' spread, so the claim is read in
    latent space, where the method works)."""
    import self_distill as S
    metrics = S.main(["--quick", "--teacher", latent_teacher, "--skip", "ldm_exact", "--lr", "2e-5",
                      "--eval-steps", "2", "--out", str(tmp_path), "--device", "cpu"])  # latents unclipped
    assert metrics["finished"] and all(0 < r["rmse_to_reference"] < 2 for r in metrics["results"][1:])
    teacher, student = R.load_teacher(latent_teacher), R.load_teacher(str(tmp_path / "ckpt.pt"))
    with torch.no_grad():
        reference = C.ddim_sample(teacher, C.seeded_noise(range(64), (3, 16, 16)),
                                  C.sampler_times(teacher.schedule, 16, "ldm_exact"))
    ours, theirs = (latent_rmse(den, reference, 2, "ldm_exact") for den in (student, teacher))
    print(f"latent RMSE at 2 steps: student {ours:.4f}, teacher {theirs:.4f}")
    assert ours < 0.99 * theirs  # measured 1.339 vs 1.356 (lr 20x table 3's, 100 updates)
    assert student.autoencoder is not None and student.image_shape == (3, 32, 32)
    with torch.no_grad():
        assert student.sample(C.seeded_noise(range(2), (3, 16, 16))).shape == (2, 3, 32, 32)

def test_dkdm_distils_a_latent_teacher(latent_teacher, tmp_path):
    """DKDM in latent space: a fixed-variance student (the teacher's: L*_simple alone, eq. 20) of the
    teacher's latent size learns from the dynamic set and ends closer to the teacher's decoded DDIM output
    than at initialisation; student.pt carries the autoencoder."""
    import dkdm as D
    teacher = R.load_teacher(latent_teacher)
    fixed = latent_teacher.replace(".pt", "_fixed.pt")  # the LDMs' variance: fixed_small, no KL term
    R.save_checkpoint(fixed, **{**teacher.state(), "var": "fixed_small"}, method="teacher")
    metrics = D.main(["--quick", "--teacher", fixed, "--out", str(tmp_path), "--device", "cpu", "--updates", "150",
                      "--eval-samples", "8", "--eps-samples", "16", "--eval-steps", "20"])
    assert metrics["finished"]
    student, teacher = R.load_teacher(str(tmp_path / "student.pt")), R.load_teacher(fixed)
    initial = D.make_student(R.parse_config(D.Config, ["--quick", "--eval-steps", "20"], quick=D.QUICK),
                             teacher).freeze()
    times = C.sampler_times(teacher.schedule, 20, "linspace")  # as evaluated: DDIM on IDDPM's grid
    with torch.no_grad():
        reference = C.ddim_sample(teacher, C.seeded_noise(range(32), (3, 16, 16)), times)
    ours, before = (latent_rmse(den, reference, 20, "linspace") for den in (student, initial))
    print(f"latent DDIM RMSE to the teacher: init {before:.4f}, student {ours:.4f}")
    assert ours < 0.7 * before
    assert student.var == "fixed_small" and student.net.config.out_channels == 3
    assert student.autoencoder is not None
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert all(row.get("vlb_bits", 0) == 0 for row in log)

def test_latent_bad_input_is_one_line(latent_teacher, tmp_path):
    import luhman_kd as kd
    import progressive as P
    import self_distill as S
    for main, argv in ((P.main, ["--quick", "--teacher", latent_teacher]),
                       (kd.main, ["--quick", "--teacher", latent_teacher])):
        with pytest.raises(ValueError) as e:
            main([*argv, "--out", str(tmp_path / "run")])
        assert "is a latent model (LDM)" in one_line(e)
    with pytest.raises(ValueError) as e:
        S.main(["--quick", "--teacher", latent_teacher, "--guidance", "1,3", "--out", str(tmp_path / "g")])
    assert "guidance needs a class-conditional teacher" in one_line(e)
