"""Host-loop sampling: a Denoiser, a solver and fixed noise in, samples out."""
from __future__ import annotations

import torch

from compress.denoiser import Denoiser, guided, map_condition
from compress.errors import UserError
from compress.progress import progress
from compress.solvers import Predictor, SolverConfig, get_solver


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_noise(denoiser: Denoiser, n: int, seed: int) -> torch.Tensor:
    """Standard normal noise drawn on the CPU, so a seed gives the same noise on every device."""
    return torch.randn((n, *denoiser.sample_shape), generator=torch.Generator().manual_seed(seed))


def check_conditioning(denoiser: Denoiser, cond, guidance_scale) -> None:
    if guidance_scale is not None and not denoiser.supports_guidance:
        why = "it has no unconditional input" if denoiser.conditioning != "none" else "guidance needs a conditional model"
        raise UserError(f"model {denoiser.name!r} cannot use classifier-free guidance: {why}")
    if cond is not None and denoiser.conditioning == "none":
        raise UserError(f"model {denoiser.name!r} is unconditional: it takes no labels or conditioning")
    if denoiser.conditioning == "class" and cond is not None:
        bad = [int(c) for c in cond.flatten() if not 0 <= int(c) < denoiser.num_classes]
        if bad:
            raise UserError(f"class label {bad[0]} out of range: model {denoiser.name!r} has classes 0..{denoiser.num_classes - 1}")


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    solver: SolverConfig,
    noise: torch.Tensor,
    cond: torch.Tensor | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> torch.Tensor:
    """Samples from ``noise`` ([N, C, H, W], standard normal) with the solver's host loop; returns CPU float32."""
    check_conditioning(denoiser, cond, solver.guidance_scale)
    spec = get_solver(solver.name)
    plan = solver.plan(denoiser.schedule)
    device = torch.device(device) if device else default_device()
    module = denoiser.module.to(device).eval()
    results = []
    batches = range(0, noise.shape[0], batch_size)
    for start in progress(batches, description=f"sample {solver.name}-{solver.steps}") if show_progress else batches:
        x = noise[start : start + batch_size].to(device)
        c = map_condition(lambda t: t[start : start + batch_size].to(device), cond)
        null = denoiser.null_condition(x.shape[0], device) if c is not None and solver.guidance_scale is not None else None

        def network(xt, t):
            return guided(module, xt, t, c, null, solver.guidance_scale)

        extra = {}
        if spec.stochastic:
            gen = torch.Generator().manual_seed(seed + start)
            extra["noise"] = lambda i: torch.randn(x.shape, generator=gen).to(device)
        out = spec.fn(Predictor(network, plan, denoiser.prediction_type), x, plan, **solver.options, **extra)
        results.append(out.float().cpu())
    return torch.cat(results)
