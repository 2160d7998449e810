"""Samplers as tables: every scheduler is a per-step coefficient table plus one pure step function.

The samplers SD users know (diffusers' DDIM, PNDM, Euler, Euler ancestral, DPM-Solver++ 2M, LCM) are all *linear*
in the tensors they touch. With x_i the latent entering step i, m_i the model output at step i and z_i fresh noise,
each of them is

    x_{i+1} = sum_k a[i, k] x_{i-k}  +  sum_k b[i, k] m_{i-k}  +  c_noise[i] z_i  (+ c_x0[i] clamp(x0_i))

with coefficients that depend only on the step index. So `make_schedule` runs diffusers' bookkeeping once, in Python
floats, and writes the coefficients into tensors; `step` is a few multiply-adds indexed by the step index (an int or
a 0-d device tensor), with the history x_{i-1..}, m_{i-1..} passed in and out explicitly. There is no Python-side
state and no host sync, so a whole denoising loop can be captured in one CUDA graph.

  ddim             x0 and eps from the prediction, x_{i+1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps      (eta = 0)
  pndm             PLMS (skip_prk_steps=True): Adams-Bashforth over the last 4 kept model outputs; history 4 m, 1 x
  euler            x_{i+1} = x + (x - x0) / sigma * (sigma_next - sigma)
  euler-a          Euler to sigma_down, plus sigma_up * z_i
  dpmpp-2m(-karras) DPM-Solver++ 2M on x0 predictions (x0_{i-1} rebuilt from x_{i-1}, m_{i-1}); history 1 x, 1 m
  lcm              consistency boundary c_skip x + c_out x0, re-noised to the next timestep with z_i

Coefficients are computed in float64 from diffusers' own float32 alphas_cumprod / sigmas (rebuilt here with the same
torch/numpy calls, so the tables agree to the last bit) and stored as float32: the latents are float32, diffusers'
tables are float32 too, and float32's 6e-8 rounding is far below the 1e-5 we test against diffusers.

Noise. Initial latents: txt2img `randn(latent shape) * init_noise_sigma`; img2img `add_noise(sched, x0, randn, 0)`.
Per-step noise z_i (the caller draws it, in the order diffusers does, to reproduce a seed):
  euler-a  EulerAncestralDiscreteScheduler.step draws at *every* step, after the UNet call and CFG:
           randn_tensor(model_output.shape, generator=generator, device=..., dtype=model_output.dtype), i.e.
           torch.randn(latent shape, generator=g, dtype=UNet dtype) on the generator's device, then moved.
  lcm      LCMScheduler.step draws the same way (dtype of the latents) at every step except the last.
`Schedule.draws_noise[i]` says whether diffusers draws at step i.

Where diffusers' loop is state-dependent we reproduce it: PNDM restarts its counter when img2img starts mid-schedule
(its corrector then steps from t + T/n), DPM-Solver starts first-order. Two departures, both where diffusers breaks:
repeated Karras timesteps run in order (as with set_begin_index(0), which the SDXL pipeline calls; SD1.5's pipeline
skips a step and overruns), and DPM's 0/0 steps are a null step where a sigma repeats (Karras + final_sigmas_type
sigma_min; leading or linspace spacing at ~1000 steps) and first order on the step after one.
"""

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from sdrt.errors import SdrtError

SCHEDULERS = ("ddim", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "lcm")

# The __init__ defaults of the diffusers class behind each name: `from_config(cfg)` takes a key from cfg when the
# class accepts it and the default otherwise, and so do we.
# fmt: off
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_DEFAULTS = {
    "ddim": dict(_COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
                 timestep_spacing="leading", rescale_betas_zero_snr=False),
    "pndm": dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "euler": dict(_COMMON, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                  use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                  timestep_type="discrete", rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "euler-a": dict(_COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "dpmpp-2m": dict(_COMMON, solver_order=2, thresholding=False, algorithm_type="dpmsolver++", solver_type="midpoint",
                     lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                     final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
                     timestep_spacing="linspace", rescale_betas_zero_snr=False, use_dynamic_shifting=False),
    "lcm": dict(_COMMON, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
                clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
                timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
}
_DEFAULTS["dpmpp-2m-karras"] = _DEFAULTS["dpmpp-2m"]
# What the name fixes whatever the config says (SD runs PNDM as PLMS only).
_FORCED = {
    "pndm": {"skip_prk_steps": True},
    "dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    "dpmpp-2m-karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
}
# Options diffusers has and we do not implement: the config must leave them at these values.
_UNSUPPORTED = {"thresholding": False, "interpolation_type": "linear", "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "timestep_type": "discrete", "use_lu_lambdas": False,
                "use_flow_sigmas": False, "variance_type": None, "use_dynamic_shifting": False}
_CHOICES = {"timestep_spacing": ("leading", "linspace", "trailing"), "final_sigmas_type": ("zero", "sigma_min"),
            "solver_type": ("midpoint", "heun")}
# fmt: on
_PREDICTIONS = {"pndm": ("epsilon", "v_prediction"), "euler-a": ("epsilon", "v_prediction")}


@dataclass(frozen=True)
class Schedule:
    """Everything a denoising loop needs, as tensors indexed by the step i in [0, S)."""

    name: str
    timesteps: Tensor  # (S,) the UNet's timestep input, exactly as diffusers feeds it (int64; float32 for Euler types)
    scale_in: Tensor  # (S,) UNet input = latent * scale_in[i]  (Euler types: 1/sqrt(sigma^2+1); else 1)
    c_sample: Tensor  # (S, 1+Hx) weights of x_i, x_{i-1}, ..., x_{i-Hx}
    c_model: Tensor  # (S, 1+Hm) weights of m_i, m_{i-1}, ..., m_{i-Hm}
    c_noise: Tensor  # (S,) weight of the fresh noise z_i (euler-a, lcm; else 0)
    c_x0: Tensor  # (S,) weight of clamp(x0_i), only used when clip is set (DDIM/LCM clip_sample)
    x0_of: Tensor  # (S, 2) x0_i = x0_of[i, 0] x_i + x0_of[i, 1] m_i, only used when clip is set
    noise_in: Tensor  # (S, 2) add_noise at step i: noisy = noise_in[i, 0] x0 + noise_in[i, 1] noise
    init_noise_sigma: float  # txt2img: initial latents = randn * init_noise_sigma
    clip: float | None = None  # clamp x0 to [-clip, clip] (diffusers clip_sample / clip_sample_range)
    draws_noise: tuple[bool, ...] = field(default=())  # (S,) diffusers draws z_i inside step i

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device) -> "Schedule":
        tables = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tables.items() if isinstance(v, Tensor)})


State = tuple[Tensor, Tensor]  # (past samples (Hx, *shape), past model outputs (Hm, *shape)), newest first


def make_schedule(name: str, scheduler_config: dict, num_steps: int, *, strength: float = 1.0) -> Schedule:
    """The schedule diffusers' `<class>.from_config(scheduler_config)` runs for `num_steps` steps.

    strength < 1 (img2img) keeps the last int(num_steps * strength) steps, as StableDiffusionImg2ImgPipeline does.
    """
    if name not in SCHEDULERS:
        raise SdrtError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise SdrtError(f"the number of steps must be an integer >= 1, got {num_steps!r}")
    if not 0.0 < strength <= 1.0:
        raise SdrtError(f"strength must be in (0, 1], got {strength}")
    keep = min(int(num_steps * strength), num_steps)  # diffusers' get_timesteps
    if keep < 1:
        raise SdrtError(f"strength {strength} with {num_steps} steps leaves no step to run (int(steps * strength) = 0)")
    cfg = _config(name, scheduler_config)
    if num_steps > cfg["num_train_timesteps"]:
        raise SdrtError(f"{num_steps} steps is more than the model's {cfg['num_train_timesteps']} training timesteps")
    build = {"ddim": _ddim, "pndm": _pndm, "euler": _euler, "euler-a": _euler, "dpmpp-2m": _dpmpp_2m,
             "dpmpp-2m-karras": _dpmpp_2m, "lcm": _lcm}[name]  # fmt: skip
    return build(name, cfg, num_steps, num_steps - keep)


def init_state(sched: Schedule, sample: Tensor) -> State:
    """Empty history for step 0: zeros, which the step-0 coefficients weight by 0."""
    hx, hm = sched.c_sample.shape[1] - 1, sched.c_model.shape[1] - 1
    return sample.new_zeros((hx, *sample.shape)), sample.new_zeros((hm, *sample.shape))


def scale_input(sched: Schedule, sample: Tensor, i) -> Tensor:
    """The UNet input at step i (diffusers' scale_model_input)."""
    return sample * _at(sched.scale_in, i).to(sample.dtype)


def step(sched: Schedule, i, model_output: Tensor, sample: Tensor, state: State, noise: Tensor | None = None):
    """x_{i+1} and the new state from x_i = sample and m_i = model_output. i: int or 0-d integer tensor.

    Computes in sample's dtype (keep latents float32, as diffusers' Euler and DPM steps do internally).
    noise: z_i, the latent-shaped noise diffusers draws inside step i; required for euler-a and lcm.
    """
    if noise is None and any(sched.draws_noise):
        raise ValueError(f"{sched.name} is stochastic: pass the step's noise (see Schedule.draws_noise)")
    x, m = sample, model_output.to(sample.dtype)
    past_x, past_m = state
    xs = torch.cat([x[None], past_x])  # (1+Hx, *shape): x_i, x_{i-1}, ...
    ms = torch.cat([m[None], past_m])  # (1+Hm, *shape): m_i, m_{i-1}, ...
    out = _weighted_sum(_at(sched.c_sample, i), xs) + _weighted_sum(_at(sched.c_model, i), ms)
    if sched.clip is not None:  # the clamp is not linear, so x0 stays a separate term
        a, b = _at(sched.x0_of, i).to(x.dtype)
        out = out + _at(sched.c_x0, i).to(x.dtype) * (a * x + b * m).clamp(-sched.clip, sched.clip)
    if noise is not None:
        out = out + _at(sched.c_noise, i).to(x.dtype) * noise.to(x.dtype)
    return out, (xs[:-1], ms[:-1])  # drop the oldest: the history keeps its length


def add_noise(sched: Schedule, original: Tensor, noise: Tensor, i=0) -> Tensor:
    """Noise clean latents to the level of step i (diffusers' add_noise at timesteps[i]; img2img uses i = 0)."""
    a, b = _at(sched.noise_in, i).to(original.dtype)
    return a * original + b * noise


def _at(table: Tensor, i) -> Tensor:
    # table[i] with a 0-d tensor i would call i.item(): a host sync that breaks CUDA graph capture. index_select
    # reads i on the device.
    if isinstance(i, Tensor):
        return table.index_select(0, i.reshape(1)).squeeze(0)
    return table[i]


def _weighted_sum(weights: Tensor, xs: Tensor) -> Tensor:
    # weights (K,), xs (K, *shape). Broadcast-multiply and sum rather than tensordot: a matmul could run in TF32.
    return (weights.to(xs.dtype).view(-1, *[1] * (xs.dim() - 1)) * xs).sum(0)


# ---- build time: Python floats and numpy, mirroring diffusers' set_timesteps/step bookkeeping ----------------------


@dataclass
class _Row:
    """One step's coefficients while building."""

    sample: tuple  # weights of x_i, x_{i-1}, ...
    model: tuple  # weights of m_i, m_{i-1}, ...
    noise_in: tuple  # (a, b) for add_noise
    scale_in: float = 1.0
    noise: float = 0.0
    draws_noise: bool = False
    x0: float = 0.0
    x0_of: tuple = (0.0, 0.0)


def _schedule(name, timesteps: Tensor, rows: list, init_noise_sigma: float, clip=None) -> Schedule:
    def table(key, width=None):
        vals = [getattr(r, key) for r in rows]
        if width is not None:  # pad the history weights to a common width with zeros
            vals = [tuple(v) + (0.0,) * (width - len(v)) for v in vals]
        return torch.tensor(vals, dtype=torch.float64).to(torch.float32)

    hx, hm = max(len(r.sample) for r in rows), max(len(r.model) for r in rows)
    tables = {"scale_in": table("scale_in"), "c_sample": table("sample", hx), "c_model": table("model", hm),
              "c_noise": table("noise"), "c_x0": table("x0"), "x0_of": table("x0_of"),
              "noise_in": table("noise_in")}
    draws = tuple(r.draws_noise for r in rows)
    return Schedule(name, timesteps, **tables, init_noise_sigma=float(init_noise_sigma), clip=clip, draws_noise=draws)


def _config(name: str, given: dict) -> dict:
    defaults = _DEFAULTS[name]
    cfg = {k: given.get(k, v) for k, v in defaults.items()}
    cfg.update(_FORCED.get(name, {}))
    for k, ok in _UNSUPPORTED.items():
        if k in cfg and cfg[k] != ok:
            raise SdrtError(f"scheduler {name}: config {k}={cfg[k]!r} is not supported (only {ok!r})")
    if cfg["prediction_type"] not in _PREDICTIONS.get(name, ("epsilon", "v_prediction", "sample")):
        raise SdrtError(f"scheduler {name} does not support prediction_type={cfg['prediction_type']!r}")
    if cfg["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2") and cfg["trained_betas"] is None:
        raise SdrtError(f"unknown beta_schedule {cfg['beta_schedule']!r}")
    for k, allowed in _CHOICES.items():
        if k in cfg and cfg[k] not in allowed:
            raise SdrtError(f"scheduler {name}: config {k}={cfg[k]!r} is not one of {', '.join(allowed)}")
    for k, default in defaults.items():  # a user's scheduler_config.json: "num_train_timesteps": "1000" and the like
        v, kind = cfg[k], type(default)
        if kind is bool:
            ok = isinstance(v, bool)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind is float:  # an int will do; -inf is lambda_min_clipped's default, NaN never is
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
        else:
            continue
        if not ok:
            raise SdrtError(f"scheduler {name}: config {k}={v!r} is not a{'n' if kind is int else ''} {kind.__name__}")
    if cfg["num_train_timesteps"] < 1:
        raise SdrtError(f"scheduler {name}: config num_train_timesteps={cfg['num_train_timesteps']} is not >= 1")
    return cfg


def _alphas_cumprod(cfg: dict, zero_snr_floor: bool = False) -> Tensor:
    """(T,) float32, computed with diffusers' exact torch calls so every table agrees with it to the bit."""
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule, betas capped at 0.999
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    if cfg.get("rescale_betas_zero_snr"):  # rescale so that the last timestep has zero SNR (arXiv 2305.08891)
        s = torch.cumprod(1.0 - betas, dim=0).sqrt()
        s0, st = s[0].clone(), s[-1].clone()
        s = (s - st) * (s0 / (s0 - st))
        abar_t = s**2
        betas = 1 - torch.cat([abar_t[0:1], abar_t[1:] / abar_t[:-1]])
    ac = torch.cumprod(1.0 - betas, dim=0)
    if cfg.get("rescale_betas_zero_snr") and zero_snr_floor:  # Euler/DPM avoid an infinite sigma
        ac[-1] = 2**-24
    return ac


def _spaced(cfg: dict, n: int, round_linspace: bool = True) -> np.ndarray:
    """Descending timesteps of DDIM/PNDM/Euler set_timesteps, as float64 (callers cast as their diffusers class)."""
    big = cfg["num_train_timesteps"]
    if cfg["timestep_spacing"] == "linspace":
        t = np.linspace(0, big - 1, n)
        return (t.round() if round_linspace else t)[::-1].copy()
    if cfg["timestep_spacing"] == "leading":
        return (np.arange(0, n) * (big // n)).round()[::-1] + cfg["steps_offset"]
    return np.round(np.arange(big, 0, -big / n)) - 1  # trailing


def _pred(prediction_type: str, sa: float, sb: float):
    """x0 and eps as (weight of x, weight of m) for a VP latent x = sa x0 + sb eps."""
    if prediction_type == "epsilon":
        if sa == 0.0:  # zero-SNR betas at t = T - 1: x = eps says nothing of x0 (diffusers: NaN)
            raise SdrtError("an epsilon-prediction model cannot step from the zero-SNR timestep T - 1 that this "
                            "schedule reaches (rescale_betas_zero_snr): zero-SNR betas need a v_prediction model")
        return (1 / sa, -sb / sa), (0.0, 1.0)
    if prediction_type == "v_prediction":  # v = sa eps - sb x0
        return (sa, -sb), (sb, sa)
    return (0.0, 1.0), (1 / sb, -sa / sb)  # sample


def _x0_row(x0_of, c_x0: float, sample: float, model: float, clip, **kw) -> _Row:
    """A first-order row out = c_x0 x0 + sample x + model m; x0 folded into the linear weights unless clamped."""
    if clip is not None:
        return _Row(sample=(sample,), model=(model,), x0=c_x0, x0_of=tuple(x0_of), **kw)
    return _Row(sample=(sample + c_x0 * x0_of[0],), model=(model + c_x0 * x0_of[1],), **kw)


def _in_range(ts: np.ndarray, cfg: dict, n: int) -> None:
    """An error where leading spacing's steps_offset pushes a timestep that runs (ts: the kept ones) past T - 1
    (diffusers: IndexError): DDIM and PNDM index alphas_cumprod with it."""
    if ts.max() >= cfg["num_train_timesteps"]:
        raise SdrtError(f"{n} steps with timestep_spacing {cfg['timestep_spacing']} and steps_offset "
                        f"{cfg['steps_offset']} start at timestep {int(ts.max())}, past the model's "
                        f"{cfg['num_train_timesteps']} training timesteps: use fewer steps")


def _ddim(name, cfg, n, start):
    ac = _alphas_cumprod(cfg).tolist()
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    ts = _spaced(cfg, n).astype(np.int64)
    _in_range(ts[start:], cfg, n)
    clip = cfg["clip_sample_range"] if cfg["clip_sample"] else None
    rows = []
    for t in ts[start:].tolist():
        prev = t - cfg["num_train_timesteps"] // n
        a, ap = ac[t], (ac[prev] if prev >= 0 else final)
        x0, eps = _pred(cfg["prediction_type"], math.sqrt(a), math.sqrt(1 - a))
        # eta = 0: x_prev = sqrt(ap) x0 + sqrt(1 - ap) eps, with eps from the unclamped prediction
        se = math.sqrt(1 - ap)
        rows.append(
            _x0_row(x0, math.sqrt(ap), se * eps[0], se * eps[1], clip, noise_in=(math.sqrt(a), math.sqrt(1 - a)))
        )
    return _schedule(name, torch.from_numpy(ts[start:].copy()), rows, 1.0, clip)


def _pndm(name, cfg, n, start):
    ac = _alphas_cumprod(cfg).tolist()
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    asc = _spaced(cfg, n)[::-1]
    # PLMS timesteps: the second one is repeated (a warm-up predictor-corrector pair), so S = n + 1 for n > 1.
    ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)[start:]
    _in_range(ts, cfg, n)  # the corrector's t + T/n is the kept step before it: in range with them
    ratio = cfg["num_train_timesteps"] // n
    # Adams-Bashforth weights over the kept outputs, newest first, by how many diffusers keeps.
    ab = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    kept, rows = [], []  # kept: the step indices whose model outputs diffusers' `ets` holds, oldest first
    for c, t in enumerate(ts.tolist()):  # c is diffusers' counter: it restarts at 0 even mid-schedule (img2img)
        if c == 1:  # the corrector: re-steps from x_0 with the mean of m_0 and m_1, between the same two timesteps
            t_from, t_to, sample_lag, combo = t + ratio, t, 1, {0: 0.5, 1: 0.5}
        else:
            kept = kept[-3:] + [c]
            t_from, t_to, sample_lag = t, t - ratio, 0
            combo = {c - k: w for k, w in zip(reversed(kept), ab[len(kept)])}  # lag -> weight
        a, ap = ac[t_from], (ac[t_to] if t_to >= 0 else final)
        # x_prev = sqrt(ap/a) x - (ap - a) / (a sqrt(1-ap) + sqrt(a (1-a) ap)) eps   (PNDM paper eq. 9)
        cs = math.sqrt(ap / a)
        cm = (ap - a) / (a * math.sqrt(1 - ap) + math.sqrt(a * (1 - a) * ap))
        sa, sb = (math.sqrt(a), math.sqrt(1 - a)) if cfg["prediction_type"] == "v_prediction" else (1.0, 0.0)
        sample = [0.0] * (sample_lag + 1)
        sample[sample_lag] = cs - cm * sb  # v: eps = sa v + sb x
        model = [0.0] * (max(combo) + 1)
        for lag, w in combo.items():
            model[lag] = -cm * sa * w
        rows.append(_Row(sample=tuple(sample), model=tuple(model), noise_in=(math.sqrt(ac[t]), math.sqrt(1 - ac[t]))))
    return _schedule(name, torch.from_numpy(ts.copy()), rows, 1.0)


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. 2022 eq. 5: n sigmas evenly spaced in sigma^(1/7)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
    return (hi + ramp * (lo - hi)) ** 7.0


def _euler(name, cfg, n, start):
    ac = _alphas_cumprod(cfg, zero_snr_floor=True)
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # (T,) float32, ascending in t
    ts = _spaced(cfg, n, round_linspace=False).astype(np.float32)
    sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    if cfg.get("use_karras_sigmas"):  # euler only; euler-a has no such option
        lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
        hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
        sigmas = _karras(lo, hi, n)
        ts = _sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    sig32 = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))  # (n+1,) as diffusers holds them
    init = sig32.max() if cfg["timestep_spacing"] in ("linspace", "trailing") else (sig32.max() ** 2 + 1) ** 0.5
    sig, rows = sig32.tolist(), []
    for j in range(start, len(ts)):
        s, s_next = sig[j], sig[j + 1]
        # x0 in the Euler (variance-exploding) scale x = x0 + s eps, i.e. the VP latent x / sqrt(s^2 + 1)
        x0_vp = _pred(cfg["prediction_type"], 1 / math.sqrt(s * s + 1), s / math.sqrt(s * s + 1))[0]
        x0 = (x0_vp[0] / math.sqrt(s * s + 1), x0_vp[1])
        if name == "euler-a":  # step down to sigma_down, add sigma_up fresh noise: sigma_down^2 + sigma_up^2 = s_next^2
            up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
            s_next, noise = math.sqrt(s_next**2 - up**2), up
        else:
            noise = 0.0
        d = (s_next - s) / s  # x_next = x + (x - x0) * d
        row = _Row(sample=(1 + d - d * x0[0],), model=(-d * x0[1],), noise_in=(1.0, s), noise=noise)
        rows.append(replace(row, draws_noise=name == "euler-a", scale_in=1 / math.sqrt(s * s + 1)))
    return _schedule(name, torch.from_numpy(ts[start:].copy()), rows, init)


def _dpmpp_2m(name, cfg, n, start):
    ac = _alphas_cumprod(cfg, zero_snr_floor=True)
    big = cfg["num_train_timesteps"]
    lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    last_t = big - int(torch.searchsorted(torch.flip(lambdas, [0]), cfg["lambda_min_clipped"]))
    if cfg["timestep_spacing"] == "linspace":  # DPM spaces n+1 points and drops the last
        ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif cfg["timestep_spacing"] == "leading":
        ts = (np.arange(0, n + 1) * (last_t // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
        ts += cfg["steps_offset"]
    else:
        ts = np.arange(last_t, 0, -big / n).round().copy().astype(np.int64) - 1
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    if cfg["use_karras_sigmas"]:
        sigmas = _karras(train_sigmas[0].item(), train_sigmas[-1].item(), n)
        tf = _sigma_to_t(sigmas, np.log(train_sigmas))
        ts = torch.from_numpy(tf if cfg["beta_schedule"] == "squaredcos_cap_v2" else tf.round()).to(torch.int64).numpy()
    else:
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sig = np.concatenate([sigmas, [last]]).astype(np.float32).tolist()  # (S+1,) variance-exploding sigmas
    steps = len(ts)

    def alpha_sigma(s):  # VP coefficients of x = alpha x0 + sigma eps for VE sigma s
        alpha = 1 / math.sqrt(s * s + 1)
        return alpha, s * alpha

    rows = []
    for j in range(start, steps):
        (a_s, s_s), (a_t, s_t) = alpha_sigma(sig[j]), alpha_sigma(sig[j + 1])
        x0 = _pred(cfg["prediction_type"], a_s, s_s)[0]
        # h = lambda_t - lambda_s with lambda = log(alpha/sigma) = -log(VE sigma), so exp(-h) = sig[j+1] / sig[j]
        big_a = a_t * (1 - sig[j + 1] / sig[j])  # x_t = (s_t/s_s) x + big_a * D0 [+ D1 term]
        final = j == steps - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and steps < 15) or cfg["final_sigmas_type"] == "zero"
        )
        noise_in = (a_s, s_s)
        # first order (DPM-Solver++ 1 = DDIM): no history yet, the last step, or the step after a null one (a sigma
        # repeated, as at 999 leading steps: nothing to extrapolate from; diffusers divides by r0 = 0, NaN)
        if j == start or final or sig[j - 1] == sig[j]:
            rows.append(_Row(sample=(s_t / s_s + big_a * x0[0],), model=(big_a * x0[1],), noise_in=noise_in))
            continue
        # second order: D0 = x0_j, D1 = (x0_j - x0_{j-1}) / r0, r0 = h_{j-1} / h_j
        h = math.log(sig[j] / sig[j + 1])
        if h == 0.0:  # Karras + final_sigmas_type sigma_min repeats the last sigma: a null step (diffusers: NaN)
            rows.append(_Row(sample=(1.0,), model=(0.0,), noise_in=noise_in))
            continue
        r0 = math.log(sig[j - 1] / sig[j]) / h
        if cfg["solver_type"] == "midpoint":
            d1 = 0.5 * big_a  # x_t = ... + 0.5 * big_a * D1
        else:  # heun
            d1 = a_t * ((math.exp(-h) - 1.0) / h + 1.0)
        p, q = big_a + d1 / r0, -d1 / r0  # weights of x0_j and x0_{j-1}
        a_p, s_p = alpha_sigma(sig[j - 1])
        x0_prev = _pred(cfg["prediction_type"], a_p, s_p)[0]
        rows.append(
            _Row(sample=(s_t / s_s + p * x0[0], q * x0_prev[0]), model=(p * x0[1], q * x0_prev[1]), noise_in=noise_in)
        )
    return _schedule(name, torch.from_numpy(ts[start:].copy()), rows, 1.0)


def _lcm(name, cfg, n, start):
    orig = cfg["original_inference_steps"]
    if n > orig:
        raise SdrtError(f"lcm runs at most original_inference_steps={orig} steps, got {n}")
    ac = _alphas_cumprod(cfg).tolist()
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    # The distillation's timestep grid (k - 1, 2k - 1, ..., T - 1), read from the top at n evenly spaced indices.
    k = cfg["num_train_timesteps"] // orig
    grid = (np.arange(1, orig + 1) * k - 1)[::-1].copy()
    ts = grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)].astype(np.int64)
    clip = cfg["clip_sample_range"] if cfg["clip_sample"] else None
    rows = []
    for j in range(start, n):
        t = int(ts[j])
        prev = int(ts[j + 1]) if j + 1 < n else t
        a, ap = ac[t], (ac[prev] if prev >= 0 else final)
        x0 = _pred(cfg["prediction_type"], math.sqrt(a), math.sqrt(1 - a))[0]
        # consistency-model boundary condition, sigma_data = 0.5: denoised = c_skip x + c_out x0
        st = t * cfg["timestep_scaling"]
        c_skip, c_out = 0.25 / (st * st + 0.25), st / math.sqrt(st * st + 0.25)
        last = j == n - 1  # the last step returns denoised; the others re-noise it to the next timestep
        keep, noise = (1.0, 0.0) if last else (math.sqrt(ap), math.sqrt(1 - ap))
        noise_in = (math.sqrt(a), math.sqrt(1 - a))
        row = _x0_row(x0, keep * c_out, keep * c_skip, 0.0, clip, noise_in=noise_in, noise=noise)
        rows.append(replace(row, draws_noise=not last))
    return _schedule(name, torch.from_numpy(ts[start:].copy()), rows, 1.0, clip)
