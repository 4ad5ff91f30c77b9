"""Exact identities of the diffusion math in common.py: schedules, parameterisations, DDIM, the
progressive-distillation target, posteriors, KL and timestep sequences."""
import math

import numpy as np
import pytest
import torch

import common as C

# Reference lists from shared/reference/teacher_checkpoints.md section 5 (checked against the official code).
QUAD_100 = [800, 783, 768, 752, 736, 721, 705, 690, 675, 661, 646, 632, 617, 603, 589, 575, 562, 548, 535,
            522, 509, 496, 483, 471, 459, 446, 434, 423, 411, 399, 388, 377, 366, 355, 344, 334, 323, 313,
            303, 293, 284, 274, 265, 255, 246, 238, 229, 220, 212, 204, 195, 188, 180, 172, 165, 158, 150,
            143, 137, 130, 124, 117, 111, 105, 99, 94, 88, 83, 78, 73, 68, 63, 59, 55, 51, 47, 43, 39, 35, 32,
            29, 26, 23, 20, 18, 15, 13, 11, 9, 8, 6, 5, 3, 2, 2, 1, 0, 0, 0, 0]
LINSPACE_100 = [999, 989, 979, 969, 959, 949, 938, 928, 918, 908, 898, 888, 878, 868, 858, 848, 838, 827, 817,
                807, 797, 787, 777, 767, 757, 747, 737, 727, 716, 706, 696, 686, 676, 666, 656, 646, 636, 626,
                616, 605, 595, 585, 575, 565, 555, 545, 535, 525, 515, 505, 494, 484, 474, 464, 454, 444, 434,
                424, 414, 404, 394, 383, 373, 363, 353, 343, 333, 323, 313, 303, 293, 283, 272, 262, 252, 242,
                232, 222, 212, 202, 192, 182, 172, 161, 151, 141, 131, 121, 111, 101, 91, 81, 71, 61, 50, 40,
                30, 20, 10, 0]

def test_timestep_sequences_match_reference_lists():
    assert C.ddim_timesteps(1000, 10, "uniform") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert C.ddim_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert C.ddim_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert C.ddim_timesteps(1000, 10, "quad") == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert C.ddim_timesteps(1000, 100, "quad") == QUAD_100
    assert len(set(QUAD_100)) == 96
    assert C.ddim_timesteps(1000, 100, "linspace") == LINSPACE_100
    assert C.ddim_timesteps(1000, 100, "uniform") == list(range(990, -1, -10))
    assert C.ddim_timesteps(1000, 100, "trailing") == list(range(999, 8, -10))
    assert C.sampler_times(C.Schedule("cosine_logsnr"), 4, "unit") == [1.0, 0.75, 0.5, 0.25]
    assert C.sampler_times(C.Schedule("linear"), 4, "unit") == [999, 749.25, 499.5, 249.75]
    with pytest.raises(ValueError, match="unknown skip"):
        C.ddim_timesteps(1000, 10, "cubic")

def test_every_skip_gives_exactly_n_steps_from_the_noise_end():
    """Issue 23: exactly N timesteps for every N in 1..T (ermongroup's range(0, T, T // N) gives 67 for 64),
    each in 0..T-1, descending (quad repeats some: identity steps); a 1-step chain starts at T - 1."""
    for T in (1000, 37):
        for skip in C.SKIPS[:4]:
            for n in range(1, T + 1):
                times = C.ddim_timesteps(T, n, skip)
                assert len(times) == n and 0 <= times[-1] and times[0] <= T - 1, (T, skip, n)
                assert all(a > b if skip != "quad" else a >= b for a, b in zip(times, times[1:])), (skip, n)
            assert C.ddim_timesteps(T, 1, skip) == [T - 1]
            with pytest.raises(ValueError, match=f"{T + 1} steps over a {T}-step model"):
                C.ddim_timesteps(T, T + 1, skip)
    assert C.ddim_timesteps(1000, 64, "uniform")[:2] == [945, 930]
    assert len(C.ddim_timesteps(1000, 61, "trailing")) == 61
    assert C.sampler_times(C.Schedule("linear"), 1, "uniform") == [999]

def test_timesteps_match_diffusers_spacings():
    from diffusers import DDIMScheduler
    for spacing, skip in (("leading", "uniform"), ("trailing", "trailing"), ("linspace", "linspace")):
        sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        for steps in (10, 50, 100):
            sched.set_timesteps(steps)
            assert sched.timesteps.tolist() == C.ddim_timesteps(1000, steps, skip), (spacing, steps)

def test_linear_schedule_closed_form():
    s = C.Schedule("linear")
    ac = s.alphas_cumprod
    assert abs(ac[0] - 0.9999) < 1e-12
    assert abs(ac[499] - 0.07859) < 1e-5 and abs(ac[999] - 4.036e-5) < 1e-8
    betas = np.linspace(1e-4, 0.02, 1000)
    assert np.allclose(ac.numpy(), np.cumprod(1 - betas), rtol=0, atol=1e-15)
    a, sig = s.alpha_sigma(torch.arange(1000))
    assert torch.allclose(a.double() ** 2, ac, atol=1e-7)
    assert torch.allclose(a.double() ** 2 + sig.double() ** 2, torch.ones(1000, dtype=torch.float64),
                          atol=1e-6)
    # fractional times interpolate the log-SNR and are exact at integers
    lam = s.logsnr(torch.tensor([10.0, 10.5, 11.0]))
    assert lam[0] == s.logsnr_table[10] and lam[2] == s.logsnr_table[11]
    assert abs(lam[1] - (s.logsnr_table[10] + s.logsnr_table[11]) / 2) < 1e-12
    assert s.net_time(torch.tensor([0, 999])).tolist() == [0.0, 999.0]

def test_cosine_schedule_closed_form():
    s = C.Schedule("cosine", T=1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # Nichol & Dhariwal eq. 17: alpha_bar_t = f(t+1)/f(0) (t 0-based), unclipped
        assert abs(s.alphas_cumprod[t].item() - f(t + 1) / f(0)) < 1e-9
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    s4000 = C.Schedule("cosine", T=4000, t_scale=0.25)
    assert s4000.net_time(torch.tensor([3999.0])).item() == pytest.approx(999.75)

def test_continuous_cosine_logsnr_schedule():
    s = C.Schedule("cosine_logsnr")
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    lam = s.logsnr(t)
    assert lam[0].item() == pytest.approx(20.0, abs=1e-9) and lam[-1].item() == pytest.approx(-20.0, abs=1e-9)
    assert (lam[1:] < lam[:-1]).all()
    a, sig = s.alpha_sigma(t)
    assert torch.allclose(a ** 2 + sig ** 2, torch.ones(101), atol=1e-6)
    assert torch.allclose(a[50], torch.tensor(math.sqrt(0.5)), atol=1e-6)   # lambda(1/2) = 0 by symmetry
    # the inv_cos network input recovers 1000 t up to the +-20 clipping offsets
    assert torch.allclose(s.net_time(t), (1000 * t).float(), atol=0.05)

def _random_state(shape=(4, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    lam = torch.empty(shape[0]).uniform_(-8, 8, generator=g)
    alpha, sigma = C.bcast(torch.sigmoid(lam).sqrt(), x), C.bcast(torch.sigmoid(-lam).sqrt(), x)
    return x, eps, alpha, sigma

def test_parameterisation_round_trips():
    x, eps, alpha, sigma = _random_state()
    z = alpha * x + sigma * eps
    v = C.v_from_x_eps(x, eps, alpha, sigma)
    assert torch.allclose(C.x_from_eps(z, eps, alpha, sigma), x, atol=1e-3)
    assert torch.allclose(C.eps_from_x(z, x, alpha, sigma), eps, atol=1e-3)
    assert torch.allclose(C.x_from_v(z, v, alpha, sigma), x, atol=1e-5)
    assert torch.allclose(C.eps_from_v(z, v, alpha, sigma), eps, atol=1e-5)
    outputs = {"eps": eps, "x": x, "v": v, "both": torch.cat([x, eps], 1), "resid": z - x}
    for param, out in outputs.items():
        xp, ep = C.x_eps_from_output(out, z, alpha, sigma, param)
        assert torch.allclose(xp, x, atol=1e-3) and torch.allclose(ep, eps, atol=1e-3), param
    # extra (learned-variance) channels after the mean channels are ignored
    xp, _ = C.x_eps_from_output(torch.cat([eps, torch.zeros_like(eps)], 1), z, alpha, sigma, "eps")
    assert torch.allclose(xp, x, atol=1e-3)
    with pytest.raises(ValueError, match="unknown parameterisation"):
        C.x_eps_from_output(eps, z, alpha, sigma, "score")

def test_ddim_step_is_invertible():
    """DDIM is a deterministic map: stepping t -> s and back s -> t with the same (x, eps) prediction
    returns z_t exactly (Song et al. 2021, sec. 4.3)."""
    x, eps, a_t, s_t = _random_state(seed=1)
    _, _, a_s, s_s = _random_state(seed=2)
    z_t = a_t * x + s_t * eps
    z_s = C.ddim_step(x, eps, a_s, s_s)
    back = C.ddim_step(C.x_from_eps(z_s, eps, a_s, s_s), eps, a_t, s_t)
    assert torch.allclose(back, z_t, atol=1e-4)
    assert torch.equal(C.ddim_step(x, eps, 1.0, 0.0), x)

class _Toy(torch.nn.Module):
    """A fixed nonlinear 'network' of (z, t) so DDIM chains are non-trivial."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3, 3, generator=g) * 0.5

    def forward(self, z, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, z) + t.view(-1, 1, 1, 1) / 1000)

def test_ddim_sample_matches_diffusers_ddim_unclipped():
    """Our DDIM chain equals diffusers' DDIMScheduler (clip_sample=False, set_alpha_to_one) step for step."""
    from diffusers import DDIMScheduler
    sched = C.Schedule("linear")
    net = _Toy(3)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        set_alpha_to_one=True)
    ref.set_timesteps(20)
    z0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    z = z0.clone()
    for t in ref.timesteps:
        z = ref.step(net(z, t.float().expand(2)), t, z).prev_sample
    ours = C.ddim_sample(C.Denoiser(net, sched, "eps"), z0, C.ddim_timesteps(1000, 20, "uniform"))
    assert (ours - z).abs().max() < 1e-4

def test_ldm_ddim_with_eta_ending_at_alpha_bar_0_matches_diffusers():
    """LDM's DDIMSampler (DSD's evaluation): the +1 grid, eta 0.1 (the official ImageNet setting) and the last
    step to alpha-bar_0 = diffusers' DDIMScheduler(steps_offset=1, set_alpha_to_one=False) given our noise."""
    from diffusers import DDIMScheduler
    net, seeds = _Toy(3), [5, 2]
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(20)
    times = C.ddim_timesteps(1000, 20, "ldm")
    assert ref.timesteps.tolist() == times
    z0 = C.seeded_noise(seeds, (3, 4, 4))
    z, noise = z0.clone(), C.SeededGenerators(seeds, stream=1)  # step k: the k-th draw of each seed's stream
    for t in ref.timesteps:
        z = ref.step(net(z, t.float().expand(2)), t, z, eta=0.1, variance_noise=noise.randn((3, 4, 4))).prev_sample
    ours = C.ddim_sample(C.Denoiser(net, C.Schedule("linear"), "eps"), z0, times, eta=0.1, seeds=seeds, last=0)
    assert (ours - z).abs().max() < 1e-5 * z.abs().max()  # float32 chains, the algebra in another order

def test_ddim_at_eta_1_is_ancestral_sampling_with_the_posterior_variance():
    """Song et al. sec. 4.1: eta = 1 gives the DDPM posterior (beta~) step; with the same noise streams DDIM
    and ancestral_sample(frac=0) agree (float32 rounding of two algebraic forms)."""
    den, seeds = C.Denoiser(_Toy(3), C.Schedule("linear"), "eps", "fixed_small"), [1, 7]
    times, z = C.ddim_timesteps(1000, 10, "uniform"), C.seeded_noise(seeds, (3, 4, 4))
    ddim = C.ddim_sample(den, z, times, eta=1.0, seeds=seeds)
    assert (ddim - C.ancestral_sample(den, z, times, seeds, frac=0.0)).abs().max() < 1e-4
    assert (ddim - C.ddim_sample(den, z, times)).abs().max() > 1e-2

def test_posterior_matches_ddpm_coefficients():
    """For adjacent discrete steps the posterior equals Ho et al. eq. 7: beta~_t, beta_t and the mean
    coefficients sqrt(abar_{t-1}) beta_t/(1-abar_t), sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t)."""
    s = C.Schedule("linear")
    ac = s.alphas_cumprod
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000))
    for t in (1, 10, 500, 999):
        a_t, s_t = (v.double() for v in s.alpha_sigma(t))
        a_s, s_s = (v.double() for v in s.alpha_sigma(t - 1))
        one = torch.ones((), dtype=torch.float64)
        mean_x, var_small, var_large = C.posterior(0 * one, one, a_t, s_t, a_s, s_s)
        mean_z, _, _ = C.posterior(one, 0 * one, a_t, s_t, a_s, s_s)
        beta_tilde = (1 - ac[t - 1]) / (1 - ac[t]) * betas[t]
        assert abs(var_small - beta_tilde) / beta_tilde < 1e-4
        assert abs(var_large - betas[t]) / betas[t] < 1e-4
        assert abs(mean_x - ac[t - 1].sqrt() * betas[t] / (1 - ac[t])) < 1e-5
        assert abs(mean_z - (1 - betas[t]).sqrt() * (1 - ac[t - 1]) / (1 - ac[t])) < 1e-5

def test_learned_range_variance_interpolates_in_log_space():
    small, large = torch.tensor([0.01]), torch.tensor([0.04])
    for v, expected in ((-1.0, 0.01), (1.0, 0.04), (0.0, 0.02)):
        logvar = C.ancestral_logvar(small, large, C.variance_frac("learned_range", torch.tensor([v])))
        assert torch.exp(logvar).item() == pytest.approx(expected, rel=1e-5)
    assert C.variance_frac("fixed_small") == 0.0 and C.variance_frac("fixed_large") == 1.0
    with pytest.raises(ValueError, match="unknown variance type"):
        C.variance_frac("fixed_medium")

def test_ancestral_step_adds_no_noise_into_the_data():
    z, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha_t, sigma_t, alpha_s, sigma_s = (torch.tensor(v) for v in (0.9, 0.4359, 1.0, 0.0))
    out = C.ancestral_step(z, x, alpha_t, sigma_t, alpha_s, sigma_s, torch.randn(2, 3, 4, 4), frac=1.0)
    assert torch.allclose(out, x, atol=1e-6)

def test_step_gaussian_matches_improved_diffusion_coefficients():
    """p(z_{t-1} | z_t) for learned-range frac: log-variance frac log beta_t + (1 - frac) log beta~_t with
    improved-diffusion's clipped beta~ (beta~_0 := beta~_1); at t = 0 the mean is x_pred."""
    s = C.Schedule("linear")
    ac = s.alphas_cumprod
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000))
    beta_tilde = lambda t: (1 - ac[t - 1]) / (1 - ac[t]) * betas[t]
    z, x = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    t = torch.tensor([0, 1, 700])
    frac = torch.tensor([0.3, 0.7, 0.5]).view(-1, 1, 1, 1).expand_as(z)
    mean, logvar = C.step_gaussian(s, z, t, x, frac)
    for i, ti in enumerate(t.tolist()):
        f = frac[i, 0, 0, 0].item()
        want = f * math.log(betas[ti]) + (1 - f) * math.log(beta_tilde(max(ti, 1)))
        assert logvar[i].float().mean().item() == pytest.approx(want, rel=1e-4)
    assert torch.allclose(mean[0], x[0], atol=1e-5)

def test_vlb_terms_zero_at_the_true_posterior_and_decoder_nll_is_a_likelihood():
    s = C.Schedule("linear")
    x = C.to_float(torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8))
    z = torch.randn_like(x)
    t = torch.tensor([5, 100, 500, 999])
    v = -torch.ones_like(x)  # learned range at its lower end = the true posterior variance
    assert C.vlb_terms(s, z, t, x, x, v).abs().max() < 1e-5
    wrong = C.vlb_terms(s, z, t, x, x + 0.1, v)  # the mean's weight on x, hence the KL, shrinks as t grows
    assert (wrong[:3] > 0).all() and wrong[3] > -1e-6 and (wrong[:-1] > wrong[1:]).all()
    # the discretized decoder is a distribution over the 256 levels: probabilities sum to one
    levels = C.to_float(torch.arange(256, dtype=torch.uint8)).view(256, 1)
    mean, logvar = torch.full((256, 1), 0.3), torch.full((256, 1), math.log(0.01))
    total = torch.exp(-C.discretized_gaussian_nll(levels, mean, logvar)).sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)

def test_ancestral_sample_noise_depends_on_the_seed_only():
    den = C.Denoiser(_Toy(5), C.Schedule("linear"), "eps", "fixed_large")
    times = C.ddim_timesteps(1000, 5, "uniform")
    seeds = [3, 9, 4]
    z = C.seeded_noise(seeds, (3, 4, 4))
    together = C.ancestral_sample(den, z, times, seeds)
    alone = torch.cat([C.ancestral_sample(den, z[i:i + 1], times, seeds[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)
    assert not torch.allclose(together, C.ancestral_sample(den, z, times, [s + 1 for s in seeds]), atol=1e-3)
    assert not torch.allclose(together, C.ddim_sample(den, z, times), atol=1e-3)

def test_gaussian_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([-0.2, 0.5])
    lv1, lv2 = torch.tensor([-1.0, 0.5]), torch.tensor([0.2, -0.3])
    kl = C.gaussian_kl(m1, lv1, m2, lv2).double()
    samples = m1 + torch.exp(0.5 * lv1) * torch.randn(400000, 2, generator=g)
    logp = lambda x, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / torch.exp(lv))
    mc = (logp(samples, m1, lv1) - logp(samples, m2, lv2)).double().mean(0)
    assert torch.allclose(kl, mc, atol=0.01)
    assert C.gaussian_kl(m1, lv1, m1, lv1).abs().max() < 1e-7
    assert (kl > 0).all()

def test_weightings_are_snr_functions_of_the_x_mse():
    """Salimans & Ho sec. 4: eps-MSE = SNR x-MSE, trunc = max(SNR, 1) x-MSE, v-MSE = (1 + SNR) x-MSE."""
    x, eps, alpha, sigma = _random_state(seed=4)
    z = alpha * x + sigma * eps
    x_pred = x + 0.1 * torch.randn_like(x)
    eps_pred = C.eps_from_x(z, x_pred, alpha, sigma)
    snr = (alpha ** 2 / sigma ** 2).flatten()
    x_mse = ((x_pred - x) ** 2).flatten(1).mean(1)
    w = lambda name: C.weighted_loss(x_pred, eps_pred, x, eps, alpha, sigma, name)
    assert torch.allclose(w("const"), x_mse)
    assert torch.allclose(w("snr"), snr * x_mse, rtol=1e-3)
    assert torch.allclose(w("trunc_snr"), torch.maximum(snr, torch.ones_like(snr)) * x_mse, rtol=1e-3)
    assert torch.allclose(w("snr_plus_one"), (1 + snr) * x_mse, rtol=1e-3)

def test_lr_schedule():
    assert C.lr_at(0, 1.0, warmup=10) == pytest.approx(0.1)
    assert C.lr_at(50, 1.0, warmup=10) == 1.0
    assert C.lr_at(0, 1.0, total=100, anneal="linear") == 1.0
    assert C.lr_at(50, 1.0, total=100, anneal="linear") == pytest.approx(0.5)
    assert C.lr_at(100, 1.0, total=100, anneal="linear") == 0.0

class GaussianDenoiser(torch.nn.Module):
    """The exact x prediction for data x ~ N(0, s^2) per pixel, E[x | z_t] = alpha s^2 z / (alpha^2 s^2 +
    sigma^2), as a network of the cosine log-SNR schedule (fed 1000 atan(e^(-lambda/2)) / (pi/2))."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, z, t):
        lam = -2 * torch.log(torch.tan(t.double() / 1000 * math.pi / 2)).view(-1, 1, 1, 1)
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return (alpha * self.s ** 2 * z.double() / (alpha ** 2 * self.s ** 2 + sigma ** 2)).float()

def test_dpm_solver_2m_is_second_order_and_starts_as_ddim():
    """Issue 22: DPM-Solver++(2M) against its definition. On Gaussian data the probability-flow ODE keeps
    z_t / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed, so the exact output is known; on a grid uniform in lambda
    from -4 to 4, doubling the steps (past 32) halves DDIM's error (first order) and quarters
    DPM-Solver++(2M)'s (second order). Its first step is a DDIM step."""
    schedule, s = C.Schedule("cosine_logsnr"), 0.5
    den = C.Denoiser(GaussianDenoiser(s), schedule, "x")
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    b = math.atan(math.exp(-0.5 * schedule.logsnr_max))
    a = math.atan(math.exp(-0.5 * schedule.logsnr_min)) - b
    grid = lambda n: [(math.atan(math.exp(-lam / 2)) - b) / a for lam in torch.linspace(-4, 4, n).tolist()]
    assert torch.allclose(C.dpm_solver_2m(den, z, grid(2)), C.ddim_sample(den, z, grid(2)), atol=1e-6)

    def error(sampler, n):  # n network evaluations: n - 1 steps, then x_pred at lambda = 4
        var = lambda lam: torch.sigmoid(torch.tensor(lam, dtype=torch.float64)) * s ** 2 + \
            torch.sigmoid(torch.tensor(-lam, dtype=torch.float64))
        z_end = z.double() * (var(4.0) / var(-4.0)).sqrt()
        exact = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)).sqrt() * s ** 2 * z_end / var(4.0)
        return float((sampler(den, z, grid(n)).double() - exact).abs().max())

    ddim = [error(C.ddim_sample, n + 1) for n in (32, 64, 128)]
    dpm = [error(C.dpm_solver_2m, n + 1) for n in (32, 64, 128)]
    print(f"max error after 32 / 64 / 128 steps: DDIM {ddim}, DPM-Solver++(2M) {dpm}")
    for coarse, fine in zip(ddim, ddim[1:]):
        assert 1.8 < coarse / fine < 2.2  # first order
    for coarse, fine in zip(dpm, dpm[1:]):
        assert 3.4 < coarse / fine < 4.6  # second order
    assert dpm[-1] < ddim[-1] / 10
    # a repeated time (the quad sequence's at 100 steps) is an identity step: the grid without it, exactly
    times = grid(5)
    assert torch.equal(C.dpm_solver_2m(den, z, times[:2] + times[1:3] + times[2:] + times[-1:]),
                       C.dpm_solver_2m(den, z, times))

def test_the_core_is_math_and_networks_alone():
    """common.py is the file a user copies beside a method: it imports nothing of the runtime (nor file I/O,
    flags or torch.distributed), and no method file imports another."""
    import ast
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def imports(name):
        tree = ast.parse(open(os.path.join(root, name)).read())
        return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}, tree
    core, tree = imports("common.py")
    assert core <= {"copy", "dataclasses", "math", "numpy", "torch", "torch.nn", "torch.nn.functional"}, core
    assert not {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & {"open", "os", "dist", "argparse"}
    methods = {"progressive", "luhman_kd", "self_distill", "dkdm"}
    for method in methods:
        assert not imports(f"{method}.py")[0] & methods and \
            {"common", "runtime"} <= imports(f"{method}.py")[0]
    assert "common" in imports("runtime.py")[0]
