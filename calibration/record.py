"""Trajectory recording: the network inputs (x_t, t, cond) the full-precision model really sees.

Every recorded state comes from running the model's own chain from standard normal noise x_T:
a fine DDIM trajectory (``trajectory_steps`` levels, trailing spacing). A state at a timestep t
between two levels of that chain is the exact DDIM transfer from the level above it, so any
timestep can be recorded without extra network evaluations: x_t = alpha_t * x0 + sigma_t * eps,
with the predictions made at that level (at a level itself this gives the chain's own state).
With classifier-free guidance the chain is guided, and each state is recorded twice, with its
condition and with the null condition: the two halves of the batch the network gets.
"""
from __future__ import annotations

import numpy as np
import torch

from calibration.config import CalibrationConfig
from calibration.storage import CalibrationSet, build_header
from calibration.timesteps import Requests, sample_requests
from compress.denoiser import Denoiser, condition_to, draw_conditions, guided, map_condition, select_condition
from compress.errors import UserError
from compress.solvers import Predictor, SolverConfig

TRAJECTORY_SPACING = "trailing"  # starts at T - 1, so every timestep lies below the first level


@torch.no_grad()
def record_states(denoiser: Denoiser, requests: Requests, noise: torch.Tensor, cond, config: CalibrationConfig, device="cpu") -> torch.Tensor:
    """x_t for every request, taken from the fine full-precision chain of its trajectory."""
    plan = SolverConfig("ddim", config.trajectory_steps, TRAJECTORY_SPACING).plan(denoiser.schedule)
    module = denoiser.module.to(device).eval()
    guidance = config.guidance_scale if cond is not None else None
    states = torch.empty((len(requests.t), *noise.shape[1:]), dtype=torch.float32)
    for start in range(0, len(noise), config.batch_size):
        rows = np.arange(start, min(start + config.batch_size, len(noise)))
        wanted = np.flatnonzero((requests.trajectory >= rows[0]) & (requests.trajectory <= rows[-1]))
        x = plan.start(noise[rows].to(device))
        c = condition_to(select_condition(cond, rows), device)
        null = denoiser.null_condition(len(rows), device) if guidance is not None else None

        def network(xt, t):
            return guided(module, xt, t, c, null, guidance) if guidance is not None else module(xt, t, c)

        predict = Predictor(network, plan, denoiser.prediction_type)
        for i in range(plan.steps):
            if len(wanted) == 0:
                break
            x0, eps = predict(x, i)
            below = plan.timesteps[i + 1] if i + 1 < plan.steps else -np.inf
            here = wanted[requests.t[wanted] > below]  # recorded from this level: it is the last one above them
            for k in here:
                b = requests.trajectory[k] - rows[0]
                states[k] = (float(requests.alpha[k]) * x0[b] + float(requests.sigma[k]) * eps[b]).float().cpu()
            wanted = np.setdiff1d(wanted, here)
            a, s = plan.end(i)
            x = a * x0 + s * eps
    return states


def calibrate(denoiser: Denoiser, config: CalibrationConfig, solver: SolverConfig | None = None, device="cpu",
              final_latents: SolverConfig | None = None) -> CalibrationSet:
    """Records a calibration set from ``denoiser``'s own full-precision trajectories.

    Each trajectory's condition is drawn by `draw_conditions` (a random class; for a text-to-image
    pipeline one of its encoded prompts from the denoiser's condition pool). ``final_latents`` (the
    baked solver) also records where each trajectory ends under it: what the pipeline's VAE decoder sees.
    """
    config.validate()
    if config.guidance_scale is not None and not denoiser.supports_guidance:
        raise UserError(f"model {denoiser.name!r} is unconditional: calibration guidance needs a conditional model")
    requests = sample_requests(config, denoiser.schedule, solver)
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn((requests.trajectories, *denoiser.sample_shape), generator=generator)
    cond = draw_conditions(denoiser, requests.trajectories, generator)
    x = record_states(denoiser, requests, noise, cond, config, device)
    t = torch.from_numpy(requests.t.astype(np.float32))
    state_cond = select_condition(cond, torch.from_numpy(requests.trajectory))
    if state_cond is not None and config.guidance_scale is not None:
        # Both halves of every guided evaluation, interleaved so that any prefix holds both kinds.
        null = denoiser.null_condition(len(x))
        x, t = x.repeat_interleave(2, 0), t.repeat_interleave(2, 0)
        state_cond = map_condition(lambda c, n: torch.stack([c, n], 1).flatten(0, 1), state_cond, null)
    header = build_header(denoiser, config, solver, requests, inputs=len(x))
    negative = denoiser.null_condition(1) if denoiser.null_text is not None else None
    latents = None
    if final_latents is not None:
        from compress.sampling import sample

        latents = sample(denoiser, final_latents, noise, cond, batch_size=config.batch_size, device=device, show_progress=False)
        header["latents"] = {"solver": final_latents.name, "steps": final_latents.steps, "guidance_scale": final_latents.guidance_scale}
    return CalibrationSet(x.contiguous(), t.contiguous(), state_cond, noise, cond, header, negative, latents)
