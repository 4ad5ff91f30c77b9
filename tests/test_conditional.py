"""Class-conditional models (issue 30): the class embedding in the nets and its formats (diffusers
num_class_embeds, guided-diffusion label_emb), labels through the Denoiser and samplers, labels per seed,
each method on the conditional shapes teacher with its claim in small, and the one-line errors."""
import dataclasses
import json
import os

import pytest
import torch

from common import (PRESETS, build_net, ddim_sample, net_config, rmse, sampler_spec, sampler_times,
                    seeded_labels, seeded_noise)

import runtime as R
from standins import one_line, perturb
from tools.convert_teacher import from_original, infer_preset, main as convert, to_original

# a small ADM-style diffusers UNet2DModel with a class embedding (nn.Embedding(5, 4 ch), no class_embed_type)
ADM_SMALL = dict(sample_size=16, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
                 attention_head_dim=16, resnet_time_scale_shift="scale_shift", downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, attn_norm_num_groups=32,
                 down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet",
                 upsample_type="resnet", num_class_embeds=5)
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
             "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
             "variance_type": "learned_range"}
TINY = dataclasses.replace(PRESETS["tiny"], num_classes=3)

# ---- nets and formats ------------------------------------------------------------------------------------

def test_diffusers_class_embedding_loads_and_guided_label_emb_converts(tmp_path):
    """A conditional diffusers UNet2DModel (num_class_embeds) gives diffusers' outputs for several labels; its
    guided-diffusion form (label_emb) converts back to the same tensors. 1e-5 absorbs float32 summation
    order (outputs ~1)."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**ADM_SMALL).eval(), 1)
    ref.save_pretrained(tmp_path / "diffusers")
    (tmp_path / "diffusers" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    den = R.load_teacher(str(tmp_path / "diffusers"))
    assert den.num_classes == 5 and den.net.config.num_classes == 5
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3.0, 250.5, 500.0, 999.0])
    outs = []
    for y in (torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 0, 2])):
        with torch.no_grad():
            theirs, ours = ref(x, t, class_labels=y).sample, den.net(x, t, y)
        assert (ours - theirs).abs().max() <= 1e-5
        outs.append(ours)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the label matters

    gcfg = dataclasses.replace(den.net.config, qkv_layout="new")
    g = to_original(den.net.state_dict(), gcfg, "guided")
    assert tuple(g["label_emb.weight"].shape) == (5, 128)  # nn.Embedding(num_classes, 4 ch)
    back = from_original(g, gcfg, "guided")
    assert all(torch.equal(back[k], v) for k, v in den.net.state_dict().items())
    torch.save(g, tmp_path / "guided.pt")
    (tmp_path / "unet.json").write_text(json.dumps(net_config(den.net)))
    convert([str(tmp_path / "guided.pt"), str(tmp_path / "converted.pt"), "--preset", str(tmp_path / "unet.json"),
             "--qkv-layout", "new", "--schedule", "cosine"])
    loaded = R.load_teacher(str(tmp_path / "converted.pt"))
    assert loaded.num_classes == 5 and loaded.var == "learned_range"
    with torch.no_grad():
        assert torch.equal(loaded.net(x, t, torch.tensor([0, 1, 2, 3])), outs[0])

@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_a_label_adds_its_embedding_to_the_time_embedding(arch):
    """ADM's label_emb (= the official progressive code's one-hot Dense, its bias in every row): the output
    for label c equals the unconditional network's whose time MLP's last bias is shifted by row c. Exact up
    to float32 rounding of one addition (1e-5 on outputs ~1)."""
    cfg = TINY if arch == "unet" else dataclasses.replace(PRESETS["dit_tiny"], num_classes=3)
    torch.manual_seed(0)
    net = perturb(build_net(cfg).eval(), 2, 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 700.0])
    for c in range(3):
        plain = build_net(dataclasses.replace(cfg, num_classes=0)).eval()
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("label_emb")}
        state["time_mlp.2.bias"] = state["time_mlp.2.bias"] + net.label_emb.weight[c].detach()
        plain.load_state_dict(state)
        with torch.no_grad():
            assert (net(x, t, torch.tensor([c, c])) - plain(x, t)).abs().max() <= 1e-5

def test_conditional_presets_and_inference():
    """Fig. 4's base models (app. E, the official configs) and the public conditional ImageNet 64 teachers."""
    with torch.device("meta"):
        pd64, lsun, adm = (build_net(n) for n in ("pd_imagenet64", "pd_lsun128", "adm_imagenet64"))
    assert pd64.time_mlp[2].out_features == 768 and lsun.time_mlp[2].out_features == 768  # emb_ch 768
    assert lsun.conv_in.out_channels == 64 and len(lsun.down) == 5 and pd64.conv_in.out_channels == 192
    assert tuple(adm.label_emb.weight.shape) == (1000, 768)
    with torch.device("meta"):
        g = to_original(adm.state_dict(), adm.config, "guided")
    assert infer_preset(g, "guided") == "adm_imagenet64"

def test_denoiser_takes_labels_exactly_when_conditional():
    den = R.Denoiser(build_net(TINY), R.Schedule(), "eps")
    z = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError) as e:
        den(z, 10)
    assert "class-conditional (3 classes): give it labels" in one_line(e)
    plain = R.Denoiser(build_net(PRESETS["tiny"]), R.Schedule(), "eps", source="plain.pt")
    with pytest.raises(ValueError) as e:
        plain(z, 10, y=torch.tensor([0, 1]))
    assert "plain.pt is unconditional" in one_line(e)
    assert den.view(den.net).num_classes == 3 and den.copy().num_classes == 3

def test_labels_and_samples_per_seed_whatever_the_batch():
    """Each sample's label comes from its own seed, like its noise: a conditional model's samples of seeds
    0..7 are those of seeds 4..7 sampled alone (1e-4: float32 rounding at another batch size, ~1e-6,
    amplified by x = (z - sigma eps) / alpha at t = 999, 1 / alpha ~ 160, in this untrained net's DDIM)."""
    labels = seeded_labels(range(8), 10)
    assert torch.equal(seeded_labels(range(4, 8), 10), labels[4:]) and len(set(labels.tolist())) > 2
    assert seeded_labels(range(3), 0) is None
    assert seeded_labels([5, 6, 7], 10, classes=[3, 9]).tolist() == [9, 3, 9]  # given: classes[seed % n]
    torch.manual_seed(0)
    den = R.Denoiser(perturb(build_net(TINY).eval(), 3), R.Schedule(), "eps")
    fn = lambda z, seeds: ddim_sample(den, z, [999, 500, 0], True, seeded_labels(seeds, 3))
    all8 = R.generate(fn, range(8), (3, 16, 16), 8, "cpu")
    assert (R.generate(fn, range(4, 8), (3, 16, 16), 3, "cpu") - all8[4:]).abs().max() <= 1e-4

# ---- each method on the class-conditional shapes teacher: its claim in small, the label shared -------------

COND = ["--class-cond", "true", "--device", "cpu"]

def _rmse(metrics, model, steps, key="steps"):
    return next(r["rmse_to_reference"] for r in metrics["results"] if r["model"] == model and r[key] == steps
                and r.get("sampler", "ddim") == "ddim")

def _label_matters(path):
    """The distilled model (a checkpoint read as any teacher) is conditional, and another label for the same
    noise gives another sample."""
    den = R.load_teacher(str(path))
    z = seeded_noise(range(4), (3, 16, 16))
    with torch.no_grad():
        a, b = (den.sample(z, range(4), torch.full((4,), c)) for c in (0, 2))
    assert den.num_classes == 3 and (a - b).abs().max() > 0.05

def test_progressive_distils_the_conditional_teacher(tmp_path):
    """4 -> 2 -> 1 steps (eps teacher: the re-parameterisation round at 2) from the conditional shapes
    teacher, labels from the data: the 1-step student at least twice as close to the teacher's 4-step output
    as the teacher's own 1-step DDIM (an unconditional --quick shows the same, test_progressive)."""
    import progressive as P
    metrics = P.main(["--quick", "--teacher", "cached", "--out", str(tmp_path), "--start-steps", "4",
                      "--updates-per-round", "100", "--reparam-updates", "150", "--batch", "8",
                      *COND])
    student, teacher = _rmse(metrics, "student", 1), _rmse(metrics, "teacher", 1)
    print(f"1 step: student {student:.4f}, teacher {teacher:.4f}")
    assert metrics["finished"] and student <= 0.5 * teacher
    _label_matters(tmp_path / "student_1steps.pt")

def test_self_distill_fine_tunes_the_conditional_teacher(tmp_path):
    """DSDI 16 -> 2 on trajectories of uniform labels: the 2-step output closer to the original model's
    16-step output than its own 2-step DDIM (as the unconditional claim test)."""
    import self_distill as S
    metrics = S.main(["--quick", "--out", str(tmp_path), "--eval-steps", "2", *COND])
    student, teacher = _rmse(metrics, "student", 2), _rmse(metrics, "teacher", 2)
    print(f"2 steps: student {student:.4f}, teacher {teacher:.4f}")
    assert student < 0.95 * teacher
    assert R.load_checkpoint(str(tmp_path / "ckpt.pt"))["y"].shape == (16,)  # with its trajectories: resumable
    _label_matters(tmp_path / "ckpt.pt")

def test_luhman_kd_pairs_carry_labels(tmp_path):
    """Each pair holds its label, drawn from its seed; the 1-step student at least twice as close to the
    teacher's 10-step output as the teacher's own 1-step DDIM (the unconditional claim's budget)."""
    import luhman_kd as kd
    metrics = kd.main(["--quick", "--out", str(tmp_path / "run"), "--num-pairs", "1024", "--num-test-pairs", "128",
                       "--batch", "16", "--eval-n", "128", "--time-batch", "0", "--other-size", "", *COND])
    pairs = kd.pair_array(str(tmp_path / "run" / "pairs"), "test", 128)
    assert pairs["y"].tolist() == seeded_labels(kd.noise_seeds(0, "test", 0, 128), 3).tolist()
    student, teacher = _rmse(metrics, "student", 1), _rmse(metrics, "teacher", 1)
    print(f"1 step: student {student:.4f}, teacher {teacher:.4f}")
    assert student <= 0.5 * teacher
    _label_matters(tmp_path / "run" / "best.pt")

def test_dkdm_knowledge_set_keeps_a_label_per_trajectory(tmp_path):
    """The dynamic set's entries carry labels (uniform); the student, conditional like its teacher, gets
    closer to the teacher's DDIM output than at initialisation (the unconditional claim's 0.7)."""
    import dkdm as D
    metrics = D.main(["--quick", "--out", str(tmp_path), "--eval-samples", "16",
                      "--eps-samples", "32", "--eval-steps", "20", *COND])
    row = lambda model: next(r for r in metrics["results"] if r["model"] == model and r["sampler"] == "ddim")
    print(f"DDIM RMSE: init {row('student_init')['rmse_to_reference']:.4f}, "
          f"student {row('student')['rmse_to_reference']:.4f}")
    assert row("student")["rmse_to_reference"] < 0.7 * row("student_init")["rmse_to_reference"]
    kset = R.load_checkpoint(str(tmp_path / "ckpt.pt"))["knowledge"]
    assert kset["y"].shape == kset["k"].shape and set(kset["y"].tolist()) == {0, 1, 2}
    _label_matters(tmp_path / "student.pt")

def test_compare_scores_conditional_models_with_labels_per_seed(tmp_path):
    """tools/compare.py on a class-conditional teacher and student: each seed's label drawn as the methods
    draw it, so a row equals a direct computation (rel 1e-4: float32 at another batch size)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import compare
    torch.manual_seed(0)
    teacher = R.Denoiser(perturb(build_net(TINY).eval(), 5), R.Schedule(), "eps", source="t.pt")
    times = lambda n: sampler_times(teacher.schedule, n, "unit")
    student = teacher.copy(sampler=sampler_spec(times(2), clip=True)).eval()
    cfg = R.parse_config(compare.Config, ["--quick", "--nfe", "2", "--eval-samples", "6", "--batch", "4",
                                          "--reference-steps", "8", "--out", str(tmp_path / "cmp")],
                         quick=compare.QUICK)
    os.makedirs(cfg.out)
    rows = compare.evaluate(cfg, teacher, {("self_distill", "ckpt"): student}, "cpu")
    z, y = seeded_noise(range(6), (3, 16, 16)), seeded_labels(range(6), 3)
    with torch.no_grad():
        reference = ddim_sample(teacher, z, times(8), True, y).clamp(-1, 1)
        direct = rmse(student.sample(z, range(6), y), reference)
    assert rows[-1]["rmse_to_reference"] == pytest.approx(direct, rel=1e-4)

def test_conditional_bad_input_is_one_line_before_any_work(tmp_path, monkeypatch):
    """Labels out of a teacher's range, a conditional teacher with unlabelled data, --class-cond with an
    unconditional teacher or unlabelled data: one-line errors, nothing trained or written."""
    import progressive as P
    import self_distill as S
    den = R.Denoiser(build_net(TINY), R.Schedule(), "eps", source="cond.pt")
    with pytest.raises(ValueError) as e:
        R.check_labels(den, torch.tensor([0, 2, 5]), "folder:x")
    assert "labels 0..5; cond.pt knows 3 classes (0..2)" in one_line(e)
    cond, plain = str(tmp_path / "cond.pt"), str(tmp_path / "plain.pt")
    R.save_checkpoint(cond, **den.state(), method="t")
    R.save_checkpoint(plain, **R.Denoiser(build_net(PRESETS["tiny"]), R.Schedule(), "eps").state(), method="t")
    flat = tmp_path / "flat"
    R.write_pngs(R.make_shapes(4, 16), str(flat))  # images, no class subfolders
    monkeypatch.setattr(R, "start_run", lambda *a, **k: pytest.fail("work started"))
    for main, argv, message in [
            (P.main, ["--teacher", cond, "--data", f"folder:{flat}", "--start-steps", "4"],
             "cond.pt is class-conditional (3 classes) and --data folder:"),
            (P.main, ["--class-cond", "true", "--data", f"lsun:{flat}"], "--class-cond: --data lsun:"),
            (S.main, ["--teacher", plain, "--class-cond", "true"], "--class-cond: " + plain),
            (S.main, ["--teacher", plain, "--eval-guidance", "3"], "guidance needs a class-conditional")]:
        with pytest.raises(ValueError) as e:
            main(["--quick", *argv, "--out", str(tmp_path / "run"), "--device", "cpu"])
        assert message in one_line(e)

def test_classes_flag_gives_each_seed_a_given_label(tmp_path):
    """--classes: evaluation's samples take the given labels (seed s the (s mod n)-th), checked against the
    teacher before any work."""
    den = R.Denoiser(build_net(TINY), R.Schedule(), "eps", source="cond.pt")
    assert R.eval_classes("", den) is None and R.eval_classes("2,0", den) == [2, 0]
    for text, message in (("3", "expected comma-separated classes 0..2"), ("a", "expected comma-separated")):
        with pytest.raises(ValueError) as e:
            R.eval_classes(text, den)
        assert message in one_line(e)
    with pytest.raises(ValueError) as e:
        R.eval_classes("1", R.Denoiser(build_net(PRESETS["tiny"]), R.Schedule(), "eps", source="plain.pt"))
    assert "--classes: plain.pt is unconditional" in one_line(e)
    import dkdm as D
    cfg = R.parse_config(D.Config, ["--quick", "--classes", "2", "--eval-steps", "3"], quick=D.QUICK)
    torch.manual_seed(0)
    cond = R.Denoiser(perturb(build_net(TINY).eval(), 1, 0.05), R.Schedule(), "eps")
    z = seeded_noise(range(3), (3, 16, 16))
    with torch.no_grad():
        given = D.samplers(cfg, cond)["ddim"](z, range(3))
        direct = cond.image(ddim_sample(cond, z, sampler_times(cond.schedule, 3, "linspace"), True,
                                        torch.full((3,), 2)))
    assert torch.equal(given, direct)
