"""sdrt.schedulers against the diffusers schedulers of the same name, built with from_config of the same config.

A fake deterministic "UNet" (0.1 * input + a fixed pattern that depends on t) runs through diffusers' loop (as its
SD pipelines drive it: set_timesteps, init_noise_sigma or img2img add_noise, scale_model_input, step with a
generator) and through ours, and every step's latents must agree.
"""

import inspect
import math
from dataclasses import replace

import pytest
import torch

from sdrt.errors import SdrtError
from sdrt.schedulers import SCHEDULERS, add_noise, init_state, make_schedule, scale_input, step

diffusers = pytest.importorskip("diffusers")
# diffusers' own np.array(tensor) calls warn under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_SD = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
CONFIGS = {
    # runwayml SD1.5 scheduler_config.json (PNDMScheduler); no timestep_spacing: each class uses its own default
    "sd15": dict(_SD),
    # SD2.1 768 (DDIMScheduler, v-prediction)
    "sd21v": dict(_SD, prediction_type="v_prediction"),
    # SDXL base (EulerDiscreteScheduler)
    "sdxl": dict(
        _SD,
        interpolation_type="linear",
        prediction_type="epsilon",
        sample_max_value=1.0,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    ),
    # sd-turbo (EulerDiscreteScheduler, trailing)
    "turbo": dict(_SD, interpolation_type="linear", timestep_spacing="trailing", timestep_type="discrete"),
    # nothing: every class default (DDIM clips x0, linear betas, linspace for Euler/DPM)
    "defaults": {},
    # zero-terminal-SNR v-model, trailing
    "zsnr": dict(_SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    # the less common knobs: cosine betas, x0-prediction, Karras sigmas for euler, sigma_min final, heun DPM, clip 2
    "extras": {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "sample",
        "use_karras_sigmas": True,
        "final_sigmas_type": "sigma_min",
        "solver_type": "heun",
        "clip_sample": True,
        "clip_sample_range": 2.0,
        "timestep_spacing": "linspace",
    },
}
STEPS = (1, 4, 20, 30, 50)
# free-running loop tolerance (see check): zsnr's first Euler step in diffusers already loses ~5e-4 absolute
# (float32 cancellation at |x| ~ 4096 * 3) on an output of ~4, and that error is carried to the end.
TOL_LOOP = {"zsnr": 2e-4}
TABLES = ("timesteps", "scale_in", "c_sample", "c_model", "c_noise", "c_x0", "x0_of", "noise_in")
SHAPE = (2, 4, 8, 8)  # batch 2 latents, small spatial size: the math is elementwise


def diffusers_scheduler(name, cfg):
    d = diffusers
    if name == "pndm":
        return d.PNDMScheduler.from_config(cfg, skip_prk_steps=True)
    if name.startswith("dpmpp-2m"):
        return d.DPMSolverMultistepScheduler.from_config(
            cfg, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name.endswith("karras")
        )
    cls = {
        "ddim": d.DDIMScheduler,
        "euler": d.EulerDiscreteScheduler,
        "euler-a": d.EulerAncestralDiscreteScheduler,
        "lcm": d.LCMScheduler,
    }[name]
    return cls.from_config(cfg)


def unsupported(name, cfg):
    # diffusers itself rejects x0-prediction for PNDM and Euler ancestral
    return name in ("pndm", "euler-a") and cfg.get("prediction_type") == "sample"


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(4)]  # pattern a, pattern b, initial latents, init noise


def fake_unet(x, t, a, b):
    t = float(t)
    return 0.1 * x + math.cos(t / 300) * a + math.sin(t / 170) * b


def run_diffusers(name, cfg, n, strength):
    a, b, x, z = tensors()
    sched = diffusers_scheduler(name, cfg)
    sched.set_timesteps(n)
    if strength == 1.0:
        timesteps, latents = sched.timesteps, x * sched.init_noise_sigma
        if hasattr(sched, "set_begin_index"):  # as StableDiffusionXLPipeline does; without it diffusers looks the
            sched.set_begin_index(0)  # step up by timestep and skips a step when Karras timesteps repeat (zsnr/extras)
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(n - min(int(n * strength), n), 0)
        timesteps = sched.timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(x, z, timesteps[:1])
    gen = torch.Generator().manual_seed(1)
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    outs = [latents]
    for t in timesteps:
        m = fake_unet(sched.scale_model_input(latents, t), t, a, b)
        latents = sched.step(m, t, latents, **({"generator": gen} if takes_gen else {})).prev_sample
        outs.append(latents)
    return sched, timesteps, outs


def run_ours(sched, strength, forced=None, index=torch.tensor):
    """Our loop; with forced (diffusers' latents), step i starts from forced[i] instead of our own previous output."""
    a, b, x, z = tensors()
    latents = x * sched.init_noise_sigma if strength == 1.0 else add_noise(sched, x, z, 0)
    state = init_state(sched, latents)
    gen = torch.Generator().manual_seed(1)  # the same stream diffusers' step draws from, in the same order
    stochastic = any(sched.draws_noise)
    outs = [latents]
    for i in range(sched.num_steps):
        if forced is not None:
            latents = forced[i]
        m = fake_unet(scale_input(sched, latents, index(i)), sched.timesteps[i], a, b)
        noise = torch.randn(SHAPE, generator=gen) if sched.draws_noise[i] else torch.zeros(SHAPE)
        latents, state = step(sched, index(i), m, latents, state, noise if stochastic else None)
        outs.append(latents)
    return outs


def rel_err(ours, ref, scale):
    return (ours.double() - ref.double()).abs().max().item() / max(scale.abs().max().item(), 1e-3)


def check(name, config, n, strength):
    cfg = CONFIGS[config]
    if unsupported(name, cfg):
        with pytest.raises(SdrtError, match="prediction_type"):
            make_schedule(name, cfg, n, strength=strength)
        return
    ref_sched, ref_t, ref = run_diffusers(name, cfg, n, strength)
    sched = make_schedule(name, cfg, n, strength=strength)
    assert sched.timesteps.dtype == ref_t.dtype and torch.equal(sched.timesteps, ref_t)
    if strength == 1.0:
        assert sched.init_noise_sigma == float(ref_sched.init_noise_sigma)
    if not torch.isfinite(ref[-1]).all():  # dpmpp-2m-karras with sigma_min final: diffusers' last step divides 0/0
        assert (name, config) == ("dpmpp-2m-karras", "extras") and n >= 15, "unexpected NaN in diffusers"
        ours = run_ours(sched, strength)
        assert torch.isfinite(ours[-1]).all() and torch.equal(ours[-1], ours[-2])  # we take the null step
        ref, sched = ref[:-1], replace(sched, **{f: getattr(sched, f)[:-1] for f in TABLES})  # compare the rest
    # Each step on its own, from diffusers' latents. Both sides compute in float32, ours with coefficients rounded once
    # from float64, diffusers recomputing them in float32 every step: a few ulp apart (worst seen 1.3e-6).
    # Relative to the step's input and output: diffusers forms x + d (x - x0) in float32, so its rounding scales with
    # |x|, which is 4096x the output on a zero-terminal-SNR first Euler step (sigma = 4096).
    forced = run_ours(sched, strength, forced=ref)
    assert len(forced) == len(ref)
    for i in range(1, len(ref)):
        err = rel_err(forced[i], ref[i], torch.stack([ref[i - 1], ref[i]]))
        assert err <= 1e-5, f"{name}/{config}/{n} steps, strength {strength}, step {i - 1}: rel err {err:.3g}"
    # The whole loop on its own: the same, accumulated over the steps.
    free = run_ours(sched, strength)
    for i in range(len(ref)):
        err = rel_err(free[i], ref[i], ref[i])
        assert err <= TOL_LOOP.get(config, 1e-5), (
            f"{name}/{config}/{n} steps, strength {strength}, entry {i}: {err:.3g}"
        )


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_txt2img_matches_diffusers(name, config, n):
    check(name, config, n, 1.0)


@pytest.mark.parametrize("n", (4, 20, 50))  # 4 * 0.3 keeps a single step
@pytest.mark.parametrize("strength", (0.3, 0.75))
@pytest.mark.parametrize("config", ("sd15", "sd21v", "sdxl", "turbo"))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_matches_diffusers(name, config, strength, n):
    check(name, config, n, strength)


def test_pndm_repeats_its_second_timestep():
    # PLMS warm-up: diffusers runs n + 1 UNet calls, the second timestep twice
    sched = make_schedule("pndm", CONFIGS["sd15"], 4)
    assert sched.timesteps.tolist() == [751, 501, 501, 251, 1]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_is_pure_and_index_may_be_int(name):
    sched = make_schedule(name, CONFIGS["sdxl"], 20)
    a, b, x, z = tensors()
    stochastic = any(sched.draws_noise)
    state = init_state(sched, x)
    for i in range(3):  # fill some history
        x, state = step(sched, i, fake_unet(x, sched.timesteps[i], a, b), x, state, z if stochastic else None)
    before = [t.clone() for t in (x, *state)]
    m = fake_unet(x, sched.timesteps[3], a, b)
    out_int = step(sched, 3, m, x, state, z if stochastic else None)
    out_tensor = step(sched, torch.tensor(3), m, x, state, z if stochastic else None)
    assert all(torch.equal(t, u) for t, u in zip(before, (x, *state)))  # inputs untouched
    assert torch.equal(out_int[0], out_tensor[0])
    assert all(torch.equal(s, t) for s, t in zip(out_int[1], out_tensor[1]))


@pytest.mark.parametrize("name, history", [("pndm", (1, 4)), ("ddim", (0, 0)), ("lcm", (0, 0))])  # + clamp, noise
def test_step_runs_on_device_without_host_sync(name, history):
    # On the meta device any .item() (a host sync, fatal to CUDA graph capture) raises.
    sched = make_schedule(name, CONFIGS["defaults"], 20).to("meta")
    assert all(getattr(sched, f).device.type == "meta" for f in TABLES)
    x, i = torch.zeros(SHAPE, device="meta"), torch.tensor(5, device="meta")
    out, state = step(sched, i, x, scale_input(sched, add_noise(sched, x, x, i), i), init_state(sched, x), x)
    assert out.shape == SHAPE and out.device.type == "meta"
    assert tuple(s.shape[0] for s in state) == history and all(s.shape[1:] == SHAPE for s in state)


def test_ancestral_needs_noise():
    sched = make_schedule("euler-a", CONFIGS["sd15"], 4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        step(sched, 0, x, x, init_state(sched, x))


@pytest.mark.parametrize(
    "name, cfg, steps, strength, message",
    [
        ("heun", {}, 20, 1.0, "unknown scheduler 'heun'; choose one of: ddim, pndm, euler, euler-a, dpmpp-2m, "),
        ("ddim", {}, 0, 1.0, "steps must be an integer >= 1"),
        ("ddim", {}, 20, 0.0, r"strength must be in \(0, 1\]"),
        ("ddim", {}, 20, 1.5, r"strength must be in \(0, 1\]"),
        ("ddim", {}, 4, 0.2, "leaves no step"),
        ("ddim", {"thresholding": True}, 20, 1.0, "thresholding=True is not supported"),
        ("euler", {"timestep_spacing": "uniform"}, 20, 1.0, "timestep_spacing='uniform'"),
        ("euler-a", {"prediction_type": "sample"}, 20, 1.0, "does not support prediction_type='sample'"),
        ("lcm", {}, 60, 1.0, "at most original_inference_steps=50"),
        ("ddim", {}, 1001, 1.0, "more than the model's 1000"),
        # ill-typed values from a user's scheduler_config.json, once TypeErrors deep in the tables
        ("pndm", {"num_train_timesteps": "1000"}, 20, 1.0, "num_train_timesteps='1000' is not an int"),
        ("ddim", {"beta_start": "x"}, 20, 1.0, "beta_start='x' is not a float"),
        ("ddim", {"clip_sample": 1}, 20, 1.0, "clip_sample=1 is not a bool"),
        ("euler", {"beta_end": float("nan")}, 20, 1.0, "beta_end=nan is not a float"),
        ("ddim", {"num_train_timesteps": 0}, 1, 1.0, "num_train_timesteps=0 is not >= 1"),
        # where diffusers returns NaN or raises IndexError (these were ZeroDivisionError and IndexError here)
        ("ddim", dict(_SD, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 20, 1.0,
         "zero-SNR betas need a v_prediction model"),
        ("lcm", {"rescale_betas_zero_snr": True}, 4, 1.0, "zero-SNR betas need a v_prediction model"),
        ("ddim", dict(_SD, timestep_spacing="leading"), 1000, 1.0, "start at timestep 1000, past the model's 1000"),
        ("pndm", dict(_SD, timestep_spacing="leading"), 1000, 1.0, "start at timestep 1000, past the model's 1000"),
    ],
)
def test_errors_are_one_clear_line(name, cfg, steps, strength, message):
    with pytest.raises(SdrtError, match=message) as err:
        make_schedule(name, cfg, steps, strength=strength)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["ddim", "pndm"])
def test_img2img_that_never_reaches_the_offset_timestep_runs(name):
    # 1000 leading steps with steps_offset 1 start at t = 1000 (refused above), but at strength 0.5 the steps that
    # run start at t = 500: diffusers runs them, and so do we
    check(name, "sd15", 1000, 0.5)


@pytest.mark.parametrize("spacing, n", [("linspace", 1000), ("leading", 999)])
def test_dpm_after_a_repeated_sigma_steps_first_order(spacing, n):
    # A repeated sigma (linspace rounds two of its 1001 points to one timestep; leading + steps_offset 1 starts at
    # t = 1000, clamped to t = 999's sigma) makes a null step, then a second-order step divides by r0 = 0 in
    # diffusers (NaN from there on). We step first order there, and match diffusers on every step before.
    cfg = dict(_SD, timestep_spacing=spacing)
    _, ref_t, ref = run_diffusers("dpmpp-2m", cfg, n, 1.0)
    sched = make_schedule("dpmpp-2m", cfg, n)
    assert torch.equal(sched.timesteps, ref_t)
    finite = [bool(torch.isfinite(r).all()) for r in ref]
    first_nan = finite.index(False)
    ours = run_ours(sched, 1.0)
    assert all(torch.isfinite(o).all() for o in ours)
    before = replace(sched, **{f: getattr(sched, f)[: first_nan - 1] for f in TABLES})  # the steps diffusers took
    forced = run_ours(before, 1.0, forced=ref)
    for i in range(1, first_nan):
        assert rel_err(forced[i], ref[i], torch.stack([ref[i - 1], ref[i]])) <= 1e-5, f"step {i - 1}"
    # The step diffusers could not take, first order (DPM-Solver++ 1, i.e. DDIM) from sigma s to t (VE sigmas; the
    # latent is VP: x = alpha x0 + s alpha eps, alpha = 1 / sqrt(s^2 + 1)): x_t = (t alpha_t) / (s alpha_s) x +
    # alpha_t (1 - t / s) x0.
    j = first_nan - 1
    (s_, alpha_s), (t_, alpha_t) = [(float(sched.noise_in[k, 1] / sched.noise_in[k, 0]), float(sched.noise_in[k, 0]))
                                    for k in (j, j + 1)]
    a, b, _, _ = tensors()
    x = ours[j]
    x0 = (x - s_ * alpha_s * fake_unet(x, sched.timesteps[j], a, b)) / alpha_s  # epsilon prediction
    expected = (t_ * alpha_t) / (s_ * alpha_s) * x + alpha_t * (1 - t_ / s_) * x0
    assert torch.allclose(ours[j + 1], expected, rtol=1e-5, atol=1e-5)
