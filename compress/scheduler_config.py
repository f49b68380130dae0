"""The model's own scheduler: a diffusers scheduler config read into the `SolverConfig` that
reproduces its sampling loop step for step (on the model's schedule: VP, or a `FlowSchedule` for
the FlowMatch schedulers and the multistep ones with ``use_flow_sigmas``).

Missing keys take the defaults of the diffusers class (written out below, so reading a config
needs no diffusers import; the tests check them against diffusers). Keys of other scheduler
classes are ignored, as diffusers ignores them. Settings the solvers cannot reproduce raise
`UserError` naming the setting, never a silent approximation. `variance_type` is not read: a
model predicting its variance must drop those channels in its Denoiser module.

Where diffusers 0.42 itself breaks, the solver does the sound thing instead: UniPC with
solver_type='bh1' returns NaN on a last step onto sigma = 0 (here: the limit, the last x0), and
DPMSolverMultistep with Karras sigmas on squaredcos_cap_v2 truncates its first timesteps to the
same value (998) and then fails on its own step index (here: every level is run once).
"""
from __future__ import annotations

import math

from compress.errors import UserError
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig, spaced_timesteps

_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
_SPACING = {"timestep_spacing": "linspace", "steps_offset": 0}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_MULTISTEP = {
    **_BETAS,
    **_SIGMAS,
    "solver_order": 2,
    "lower_order_final": True,
    "thresholding": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}
# Each class's own parameters and defaults (diffusers ignores keys of other classes, and so do we).
DEFAULTS = {
    "DDIMScheduler": {
        **_BETAS,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "clip_sample": True,
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {**_BETAS, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": False, "skip_prk_steps": False},
    "EulerDiscreteScheduler": {
        **_BETAS,
        **_SPACING,
        **_SIGMAS,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "sigma_min": None,
        "sigma_max": None,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "HeunDiscreteScheduler": {**_BETAS, **_SPACING, **_SIGMAS, "clip_sample": False},
    "DPMSolverMultistepScheduler": {
        **_MULTISTEP,
        **_SPACING,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "euler_at_final": False,
        "use_lu_lambdas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "rescale_betas_zero_snr": False,
    },
    "DPMSolverSinglestepScheduler": {
        **_MULTISTEP,
        "lower_order_final": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
    },
    "UniPCMultistepScheduler": {
        **_MULTISTEP,
        **_SPACING,
        "solver_type": "bh2",
        "predict_x0": True,
        "disable_corrector": [],
        "solver_p": None,
        "final_sigmas_type": "zero",
        "sigma_min": None,
        "sigma_max": None,
        "rescale_betas_zero_snr": False,
    },
    "DEISMultistepScheduler": {**_MULTISTEP, **_SPACING, "algorithm_type": "deis", "solver_type": "logrho"},
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "invert_sigmas": False,
        "shift_terminal": None,
        **_SIGMAS,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
    "FlowMatchHeunDiscreteScheduler": {"num_train_timesteps": 1000, "shift": 1.0},
}
_FLOW_UNSUPPORTED = {
    "invert_sigmas": "inverted sigmas (noise at sigma = 0) are not reproduced",
    "shift_terminal": "a stretched terminal sigma is not reproduced",
    "use_karras_sigmas": "Karras sigmas on a flow are not implemented",
    "stochastic_sampling": "stochastic sampling cannot be baked into a graph",
}
SUPPORTED = tuple(DEFAULTS)

# Settings no solver here reproduces, when set to anything truthy.
_UNSUPPORTED = {
    "thresholding": "dynamic thresholding clips x0, which no linear solver step can do",
    "clip_sample": "clipping x0 is not linear; set clip_sample=false",
    "rescale_betas_zero_snr": "zero-terminal-SNR schedules are not reproduced",
    "use_exponential_sigmas": "exponential sigmas are not implemented",
    "use_beta_sigmas": "beta sigmas are not implemented",
    "sigma_min": "custom sigma bounds are not reproduced",
    "sigma_max": "custom sigma bounds are not reproduced",
    "solver_p": "a custom predictor scheduler is not reproduced",
}
_STOCHASTIC = {
    "DDPMScheduler",
    "EulerAncestralDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "LCMScheduler",
    "TCDScheduler",
}


def _fail(cls: str, key: str, value, why: str) -> None:
    raise UserError(f"{cls} setting {key}={value!r} is not supported: {why}")


def solver_from_scheduler_config(config: dict, steps: int, guidance_scale: float | None = None) -> SolverConfig:
    """The SolverConfig whose host loop and baked table reproduce ``config``'s diffusers loop at ``steps`` steps."""
    cls = config.get("_class_name")
    if cls in _STOCHASTIC:
        raise UserError(f"scheduler {cls} is stochastic and cannot be reproduced; choose a deterministic solver such as 'ddim' or 'dpmpp-2m'")
    if cls not in DEFAULTS:
        raise UserError(f"scheduler {cls!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    c = {**DEFAULTS[cls], **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cls.startswith("FlowMatch") or c.get("use_flow_sigmas"):
        return _flow(cls, c, steps, guidance_scale)
    _check_common(cls, c)
    base = dict(
        steps=steps,
        spacing=c.get("timestep_spacing", "linspace"),
        guidance_scale=guidance_scale,
        steps_offset=int(c.get("steps_offset", 0)),
        final=c.get("final_sigmas_type", "zero"),
    )
    return _READERS[cls](cls, c, base)


# The diffusers scheduler behind each named solver: `--solver X` on a pipeline keeps what `X.from_config(pipe.scheduler.config)` keeps.
SCHEDULER_OF_SOLVER = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler", "dpmpp-3m": "DPMSolverMultistepScheduler", "dpmpp-2s": "DPMSolverSinglestepScheduler",
    "unipc-bh1": "UniPCMultistepScheduler", "unipc-bh2": "UniPCMultistepScheduler", "deis-2": "DEISMultistepScheduler",
    "deis-3": "DEISMultistepScheduler",
}
INHERITED = ("spacing", "steps_offset", "final", "convention", "timestep_rounding", "lambda_min_clipped")


def inherited_settings(config: dict, solver: str, steps: int) -> dict:
    """The plan settings (spacing, steps offset, final level, timestep convention) that the named ``solver``
    keeps from a pipeline's scheduler ``config``, as diffusers' ``from_config`` keeps them; {} when there is no
    such scheduler or the config cannot be read for it. A flow keeps the spacing of its own levels."""
    cls = config.get("_class_name")
    if cls not in DEFAULTS:
        return {}
    c = {**DEFAULTS[cls], **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cls.startswith("FlowMatch") or c.get("use_flow_sigmas"):
        try:
            return {"spacing": _flow(cls, c, steps, None).spacing}
        except UserError:
            return {}
    target = SCHEDULER_OF_SOLVER.get(solver)
    try:
        made = solver_from_scheduler_config({**config, "_class_name": target}, steps) if target else None
    except UserError:  # a setting the solver's scheduler would apply and we cannot (clip_sample): keep the spacing alone
        made = None
    if made is not None:
        return {key: getattr(made, key) for key in INHERITED}
    spacing = c.get("timestep_spacing")
    return {"spacing": spacing, "steps_offset": int(c.get("steps_offset") or 0)} if spacing in ("linspace", "leading", "trailing") else {}


def _check_common(cls: str, c: dict) -> None:
    for key, why in _UNSUPPORTED.items():
        if key in DEFAULTS[cls] and c.get(key):
            _fail(cls, key, c[key], why)
    choices = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    for key, allowed in choices.items():
        if key in DEFAULTS[cls] and c[key] not in allowed:
            _fail(cls, key, c[key], f"expected one of {', '.join(allowed)}")


def _order(c: dict, steps: int) -> int:
    # With fewer steps than the order, diffusers never reaches that order: the lower one is the same loop.
    return min(int(c["solver_order"]), steps)


def _sigmas(cls: str, c: dict, base: dict, rounding: str = "round") -> dict:
    """karras/logsnr spacings replace the timestep spacing; multistep timesteps may be clipped by lambda."""
    if c.get("use_karras_sigmas"):
        base.update(spacing="karras", timestep_rounding=rounding)
    elif c.get("use_lu_lambdas"):
        base.update(spacing="logsnr", timestep_rounding=rounding)
    clip = c.get("lambda_min_clipped", -math.inf)
    if clip is not None and clip > -math.inf:
        base["lambda_min_clipped"] = float(clip)
    return base


def _dpm_algorithm(cls: str, c: dict) -> None:
    algorithm = "dpmsolver++" if c["algorithm_type"] == "deis" else c["algorithm_type"]  # as diffusers remaps it
    if algorithm.startswith("sde-"):
        _fail(cls, "algorithm_type", algorithm, "stochastic variants cannot be baked; use 'dpmsolver++'")
    if algorithm != "dpmsolver++":
        _fail(cls, "algorithm_type", algorithm, "only the data-prediction 'dpmsolver++' is implemented")
    solver_type = c["solver_type"] if c["solver_type"] in ("midpoint", "heun") else "midpoint"
    c["solver_type"] = solver_type


def _ddim(cls, c, base):
    final = "zero" if c["set_alpha_to_one"] else "sigma_min"
    return SolverConfig("ddim", **{**base, "final": final}, convention="ddim")


def _pndm(cls, c, base):
    if not c["skip_prk_steps"]:
        _fail(cls, "skip_prk_steps", False, "only PLMS (skip_prk_steps=True) is implemented, not the Runge-Kutta warm-up")
    if c["prediction_type"] == "sample":
        _fail(cls, "prediction_type", "sample", "PNDMScheduler takes epsilon or v_prediction")
    steps = base["steps"]
    if steps > 1:
        schedule = NoiseSchedule.from_scheduler_config(c)
        t = spaced_timesteps(schedule, steps, base["spacing"], base["steps_offset"], convention="ddim")
        T = schedule.num_train_timesteps
        if t[1] + T // steps != t[0]:
            _fail(
                cls,
                "timestep_spacing",
                base["spacing"],
                f"at {steps} steps diffusers restarts its warm-up from timestep {t[1] + T // steps} instead of {t[0]}; use 'leading' or a step count dividing {T}",
            )
    final = "zero" if c["set_alpha_to_one"] else "sigma_min"
    options = {"combine": "output"} if c["prediction_type"] == "v_prediction" else {}
    return SolverConfig("pndm", **{**base, "final": final}, convention="ddim", options=options)


def _euler(cls, c, base):
    if c["interpolation_type"] != "linear":
        _fail(cls, "interpolation_type", c["interpolation_type"], "only 'linear' is reproduced")
    if c["timestep_type"] != "discrete":
        _fail(cls, "timestep_type", c["timestep_type"], "only 'discrete' is reproduced")
    if c["use_karras_sigmas"] and c["timestep_spacing"] != "linspace":
        _fail(cls, "timestep_spacing", c["timestep_spacing"], "with use_karras_sigmas only 'linspace' is reproduced")
    return SolverConfig("euler", **_sigmas(cls, c, base), convention="euler")


def _heun(cls, c, base):
    if c["use_karras_sigmas"]:
        _fail(cls, "use_karras_sigmas", True, "Heun on Karras sigmas is not reproduced")
    return SolverConfig("heun", **base, convention="euler")


def _dpm_multistep(cls, c, base):
    _dpm_algorithm(cls, c)
    if c["euler_at_final"] and c["final_sigmas_type"] != "zero":  # onto sigma = 0 the last step is Euler anyway
        _fail(cls, "euler_at_final", True, "a first-order last step that ends above sigma = 0 is not implemented")
    order = _order(c, base["steps"])
    # diffusers leaves these timesteps unrounded for the cosine schedule, then truncates them to integers.
    rounding = "floor" if c["beta_schedule"] == "squaredcos_cap_v2" else "round"
    base = _sigmas(cls, c, base, rounding)
    if order == 1:
        return SolverConfig("ddim", **base)
    options = {"lower_order_final": bool(c["lower_order_final"])}
    if order == 2:
        options["solver_type"] = c["solver_type"]
    return SolverConfig(f"dpmpp-{order}m", **base, options=options)


def _dpm_singlestep(cls, c, base):
    _dpm_algorithm(cls, c)
    order = _order(c, base["steps"])
    base = _sigmas(cls, c, {**base, "spacing": "linspace", "steps_offset": 0})
    if order == 1:
        return SolverConfig("ddim", **base)
    if order > 2:
        _fail(cls, "solver_order", c["solver_order"], "only orders 1 and 2 (DPM-Solver++(2S)) are implemented")
    options = {"lower_order_final": bool(c["lower_order_final"]), "solver_type": c["solver_type"]}
    return SolverConfig("dpmpp-2s", **base, options=options)


def _unipc(cls, c, base):
    if not c["predict_x0"]:
        _fail(cls, "predict_x0", False, "only the data-prediction UniPC is implemented")
    variant = c["solver_type"] if c["solver_type"] in ("bh1", "bh2") else "bh2"  # as diffusers remaps it
    options = {"order": _order(c, base["steps"]), "lower_order_final": bool(c["lower_order_final"])}
    if c["disable_corrector"]:
        options["disable_corrector"] = tuple(int(i) for i in c["disable_corrector"])
    return SolverConfig(f"unipc-{variant}", **_sigmas(cls, c, base), options=options)


def _deis(cls, c, base):
    if c["algorithm_type"] not in ("deis", "dpmsolver", "dpmsolver++"):
        _fail(cls, "algorithm_type", c["algorithm_type"], "only 'deis' is implemented")
    order = _order(c, base["steps"])
    # DEIS always ends on the schedule's first level (Karras: its last sigma, the same level).
    if c["use_karras_sigmas"] and base["steps"] == 1:
        _fail(cls, "use_karras_sigmas", True, "at 1 step diffusers ends on the level it starts from, so nothing is denoised")
    base = _sigmas(cls, c, {**base, "final": "sigma_min"})
    if order == 1:
        return SolverConfig("ddim", **base)
    return SolverConfig(f"deis-{order}", **base, options={"lower_order_final": bool(c["lower_order_final"])})


def _flow(cls: str, c: dict, steps: int, guidance_scale) -> SolverConfig:
    """Flow schedulers: the shift is the schedule's (`FlowSchedule`); here only the method and its levels."""
    for key, why in {**_UNSUPPORTED, **_FLOW_UNSUPPORTED}.items():
        if key in DEFAULTS[cls] and c.get(key):
            _fail(cls, key, c[key], why)
    if c.get("use_dynamic_shifting") and c.get("time_shift_type", "exponential") != "exponential":
        _fail(cls, "time_shift_type", c["time_shift_type"], "only the exponential dynamic shift is reproduced")
    if c.get("final_sigmas_type", "zero") != "zero":
        _fail(cls, "final_sigmas_type", c["final_sigmas_type"], "flow sigmas are reproduced ending on a clean sample only")
    if "prediction_type" in DEFAULTS[cls] and c["prediction_type"] != "flow_prediction":
        _fail(cls, "prediction_type", c["prediction_type"], "use_flow_sigmas needs prediction_type='flow_prediction'")
    base = dict(steps=steps, guidance_scale=guidance_scale)
    if cls == "FlowMatchEulerDiscreteScheduler":
        return SolverConfig("euler", spacing="linspace", timestep_rounding="none", **base)
    if cls == "FlowMatchHeunDiscreteScheduler":
        return SolverConfig("heun", spacing="linspace", timestep_rounding="none", **base)
    if cls == "DPMSolverMultistepScheduler":
        _dpm_algorithm(cls, c)
        order = _order(c, steps)
        if order == 3:
            _fail(cls, "solver_order", 3, "third order on flow sigmas is not reproduced")
        base.update(spacing="dpmsolver", timestep_rounding="floor")
        if order == 1:
            return SolverConfig("ddim", **base)
        return SolverConfig("dpmpp-2m", **base, options={"lower_order_final": bool(c["lower_order_final"]), "solver_type": c["solver_type"]})
    if cls == "UniPCMultistepScheduler":
        return _unipc(cls, c, {**base, "spacing": "unipc", "timestep_rounding": "floor"})
    _fail(cls, "use_flow_sigmas", True, "flow sigmas are reproduced for DPMSolverMultistepScheduler and UniPCMultistepScheduler")


_READERS = {
    "DDIMScheduler": _ddim,
    "PNDMScheduler": _pndm,
    "EulerDiscreteScheduler": _euler,
    "HeunDiscreteScheduler": _heun,
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "DPMSolverSinglestepScheduler": _dpm_singlestep,
    "UniPCMultistepScheduler": _unipc,
    "DEISMultistepScheduler": _deis,
}
