"""The sampler as one torch module: K solver steps unrolled around the denoiser, ready to trace.

`SamplerGraph` turns (Denoiser, SolverConfig) into ``forward(noise[, condition, guidance_scale])
-> sample``. The solver enters only through its coefficient table (`compile_solver`), applied
with python-float coefficients and python-float timesteps, so a traced graph holds them as
constants and any deterministic solver works unchanged. `DenoiserGraph` is the bare network
with the same input conventions, for runtimes that keep the scheduler on the host.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from compress.denoiser import Denoiser, guided
from compress.errors import UserError
from compress.solvers import SolverConfig, SolverTable, compile_solver, run_table

# Name of the condition input per conditioning kind (the artifact contract).
CONDITION_INPUTS = {"class": "class_labels", "text": "encoder_hidden_states"}


def condition_input(denoiser: Denoiser) -> str | None:
    return CONDITION_INPUTS.get(denoiser.conditioning)


def check_exportable(denoiser: Denoiser) -> None:
    if denoiser.conditioning == "class" and denoiser.num_classes is None:
        raise UserError(f"model {denoiser.name!r} is class-conditional but declares no num_classes")
    if denoiser.conditioning == "text" and not denoiser.cond_shape:
        raise UserError(f"model {denoiser.name!r} is text-conditional but declares no cond_shape (tokens, dim)")


def resolve_guidance(denoiser: Denoiser, solver: SolverConfig, guidance: bool | None) -> bool:
    """Whether the graph applies classifier-free guidance (and so takes a `guidance_scale` input)."""
    if not denoiser.supports_guidance:
        if guidance or solver.guidance_scale is not None:
            raise UserError(f"model {denoiser.name!r} is unconditional: guidance needs a conditional model")
        return False
    if guidance is False and solver.guidance_scale is not None:
        raise UserError(f"guidance_scale {solver.guidance_scale} was set but guidance is turned off for the export")
    return True if guidance is None else bool(guidance)


class ConstantTimeFeatures:
    """Replaces the output of a UNet's `time_proj` by a per-step constant of batch 1.

    diffusers broadcasts the timestep to the batch before embedding it, and with a dynamic
    batch that Expand keeps the whole timestep-embedding chain (time MLP, every resnet's
    time_emb_proj) out of constant folding. Sinusoidal features of one row broadcast
    everywhere downstream, so the chain folds to a few small constants per step. The hook
    lives only inside a `with` block, so the shared denoiser module is left as it was.
    """

    def __init__(self, time_proj: nn.Module, timesteps):
        self.time_proj = time_proj
        with torch.no_grad():
            self.features = {float(t): time_proj(torch.tensor([float(t)])).detach() for t in timesteps}
        self.current: float | None = None
        self.handle = None

    def __enter__(self) -> "ConstantTimeFeatures":
        self.handle = self.time_proj.register_forward_hook(self._replace)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.current = None

    def _replace(self, module, args, output):
        if self.current is None:
            return output
        return self.features[self.current].to(dtype=output.dtype, device=output.device)


def _find_time_proj(module: nn.Module) -> nn.Module | None:
    from diffusers.models.embeddings import Timesteps

    found = [m for name, m in module.named_modules() if name.endswith("time_proj") and isinstance(m, Timesteps)]
    return found[0] if len(found) == 1 else None


class Scope(nn.Module):
    """Calls ``fn(*args)``; exists only so a traced graph names that region after this module ("steps.3/...")."""

    def forward(self, fn, *args):
        return fn(*args)


class SamplerGraph(nn.Module):
    """noise [B,C,H,W] (+ class_labels [B] | encoder_hidden_states [B,S,D]) (+ guidance_scale [1]) -> sample."""

    def __init__(self, denoiser: Denoiser, solver: SolverConfig, guidance: bool | None = None, fold_time_embedding: bool = True):
        super().__init__()
        check_exportable(denoiser)
        self.denoiser = denoiser
        self.network = denoiser.module.eval()
        self.solver = solver
        self.guidance = resolve_guidance(denoiser, solver, guidance)
        self.conditional = denoiser.conditioning != "none"
        self.plan = solver.plan(denoiser.schedule)
        self.table: SolverTable = compile_solver(solver.name, self.plan, denoiser.prediction_type, **solver.options)
        # The null condition of batch 1, broadcast to the batch inside the graph.
        null = denoiser.null_condition(1)
        self.register_buffer("null_condition", null if null is not None else torch.zeros(0), persistent=False)
        self.steps = nn.ModuleList(Scope() for _ in range(self.table.evaluations))
        self.time_features = self._fold_time_embedding() if fold_time_embedding else None

    @property
    def default_guidance_scale(self) -> float | None:
        """The solver's scale, else 1 (plain conditional sampling); None when the graph has no guidance."""
        if not self.guidance:
            return None
        return 1.0 if self.solver.guidance_scale is None else float(self.solver.guidance_scale)

    @property
    def input_names(self) -> list[str]:
        names = ["noise"]
        if self.conditional:
            names.append(condition_input(self.denoiser))
        if self.guidance:
            names.append("guidance_scale")
        return names

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        d = self.denoiser
        inputs = [torch.randn(batch, *d.sample_shape, generator=torch.Generator().manual_seed(0))]
        if d.conditioning == "class":
            inputs.append(torch.arange(batch, dtype=torch.int64) % d.num_classes)
        elif d.conditioning == "text":
            inputs.append(torch.randn(batch, *d.cond_shape, generator=torch.Generator().manual_seed(1)))
        if self.guidance:
            inputs.append(torch.tensor([self.default_guidance_scale], dtype=torch.float32))
        return tuple(inputs)

    def forward(self, noise: torch.Tensor, condition: torch.Tensor | None = None, guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional and condition is None:
            raise UserError(f"model {self.denoiser.name!r} is conditional: the sampler needs {condition_input(self.denoiser)}")
        if self.guidance and guidance_scale is None:
            guidance_scale = torch.tensor([self.default_guidance_scale], device=noise.device)
        null = self._null_like(condition)
        folding = self.time_features or contextlib.nullcontext()
        evaluations = iter(self.steps)

        def network(x: torch.Tensor, t: float) -> torch.Tensor:
            if self.time_features is not None:
                self.time_features.current = t
            return next(evaluations)(self._evaluate, x, t, condition, null, guidance_scale)

        with folding:
            return run_table(self.table, network, noise)

    def _evaluate(self, x, t: float, condition, null, guidance_scale) -> torch.Tensor:
        if self.guidance:
            return guided(self.network, x, t, condition, null, guidance_scale)
        return self.network(x, t, condition)

    def _null_like(self, condition: torch.Tensor | None) -> torch.Tensor | None:
        if condition is None or not self.guidance:
            return None
        return self.null_condition.to(condition.device).expand_as(condition)

    def _fold_time_embedding(self) -> ConstantTimeFeatures | None:
        """Constant time features, where a probe with batch 2 shows they leave the output unchanged."""
        time_proj = _find_time_proj(self.network)
        if time_proj is None:
            return None
        features = ConstantTimeFeatures(time_proj, self.table.timesteps)
        device = next(self.network.parameters()).device
        probe = [x.to(device) for x in self.example_inputs(batch=2)]
        t = float(self.table.timesteps[0])
        cond = probe[1] if self.conditional else None
        try:
            with torch.no_grad(), features:
                reference = self.network(probe[0], t, cond)
                features.current = t
                folded = self.network(probe[0], t, cond)
            same = folded.shape == reference.shape and torch.allclose(folded, reference, rtol=1e-4, atol=1e-5)
        except (RuntimeError, ValueError):
            same = False
        return features if same else None


class DenoiserGraph(nn.Module):
    """sample [B,C,H,W], timestep [B] float32 (+ class_labels | encoder_hidden_states) -> raw prediction."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        check_exportable(denoiser)
        self.denoiser = denoiser
        self.network = denoiser.module.eval()
        self.conditional = denoiser.conditioning != "none"

    @property
    def input_names(self) -> list[str]:
        return ["sample", "timestep"] + ([condition_input(self.denoiser)] if self.conditional else [])

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        d = self.denoiser
        inputs = [
            torch.randn(batch, *d.sample_shape, generator=torch.Generator().manual_seed(0)),
            torch.linspace(d.schedule.num_train_timesteps - 1, 0, batch, dtype=torch.float32),
        ]
        if d.conditioning == "class":
            inputs.append(torch.arange(batch, dtype=torch.int64) % d.num_classes)
        elif d.conditioning == "text":
            inputs.append(torch.randn(batch, *d.cond_shape, generator=torch.Generator().manual_seed(1)))
        return tuple(inputs)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(sample, timestep, condition)
