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

from compress.denoiser import NEGATIVE_PREFIX, SHARED_CONDITION_KEYS, Denoiser, condition_batch, guided, map_condition
from compress.errors import UserError
from compress.solvers import SolverConfig, SolverTable, compile_solver, run_table

# Name of the condition input per conditioning kind (the artifact contract).
CONDITION_INPUTS = {"class": "class_labels", "text": "encoder_hidden_states"}
NEGATIVE = NEGATIVE_PREFIX


def condition_input(denoiser: Denoiser) -> str | None:
    return CONDITION_INPUTS.get(denoiser.conditioning)


def condition_names(denoiser: Denoiser) -> list[str]:
    """The graph inputs that make up the condition (SDXL: hidden states, text_embeds, time_ids)."""
    if denoiser.conditioning == "text":
        return list(denoiser.condition_shapes())
    name = condition_input(denoiser)
    return [name] if name else []


def assemble_condition(denoiser: Denoiser, named: dict):
    """Graph inputs -> the condition the denoiser module takes (a tensor, or SDXL's dict)."""
    names = condition_names(denoiser)
    if not names:
        return None
    if denoiser.added_cond_shapes:
        return {n: named[n] for n in names}
    return named[names[0]]


def example_condition(denoiser: Denoiser, batch: int, seed: int, names: list[str] | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if denoiser.conditioning == "class":
        return [torch.arange(batch, dtype=torch.int64) % denoiser.num_classes] if names is None or names else []
    if denoiser.conditioning != "text":
        return []
    shapes = denoiser.condition_shapes()
    return [torch.randn(batch, *shapes[n], generator=gen) for n in (names if names is not None else shapes)]


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

    # SDXL's add_time_proj embeds the time ids, not the timestep: only a module named time_proj.
    found = [m for name, m in module.named_modules() if name.split(".")[-1] == "time_proj" and isinstance(m, Timesteps)]
    return found[0] if len(found) == 1 else None


class Scope(nn.Module):
    """Calls ``fn(*args)``; exists only so a traced graph names that region after this module ("steps.3/...")."""

    def forward(self, fn, *args):
        return fn(*args)


class SamplerGraph(nn.Module):
    """noise [B,C,H,W] (+ condition inputs) (+ negative condition inputs) (+ guidance_scale [1]) -> sample or image.

    ``decoder`` (a pipeline's VAE decoder) is applied to the final latents, and the output is
    then ``image`` in [0, 1]. ``negative_inputs`` takes the unconditional branch's condition as
    inputs (the encoded negative prompt); without them the model's own null condition is baked in.
    """

    def __init__(self, denoiser: Denoiser, solver: SolverConfig, guidance: bool | None = None, fold_time_embedding: bool = True,
                 decoder: nn.Module | None = None, negative_inputs: bool = False):
        super().__init__()
        check_exportable(denoiser)
        self.denoiser = denoiser
        self.network = denoiser.module.eval()
        self.decoder = decoder.eval() if decoder is not None else None
        self.solver = solver
        self.guidance = resolve_guidance(denoiser, solver, guidance)
        self.conditional = denoiser.conditioning != "none"
        self.condition_names = condition_names(denoiser)
        # A guidance embedding (FLUX-dev) takes the scale as an input: no unconditional branch, no negative inputs.
        self.classifier_free = self.guidance and not denoiser.guidance_embedded
        self.negative_names = [NEGATIVE + n for n in self.condition_names if n not in SHARED_CONDITION_KEYS] if negative_inputs and self.classifier_free else []
        self.plan = solver.plan(denoiser.schedule)
        self.table: SolverTable = compile_solver(solver.name, self.plan, denoiser.prediction_type, **solver.options)
        # The null condition of batch 1, broadcast to the batch inside the graph.
        self.null_condition = denoiser.null_condition(1)
        self.steps = nn.ModuleList(Scope() for _ in range(self.table.evaluations))
        self.time_features = self._fold_time_embedding() if fold_time_embedding else None

    @property
    def output_names(self) -> list[str]:
        return ["image" if self.decoder is not None else "sample"]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the output."""
        shape = tuple(self.denoiser.sample_shape)
        return self.decoder.output_shape(shape) if self.decoder is not None else shape

    @property
    def default_guidance_scale(self) -> float | None:
        """The solver's scale, else 1 (plain conditional sampling); None when the graph has no guidance."""
        if not self.guidance:
            return None
        return 1.0 if self.solver.guidance_scale is None else float(self.solver.guidance_scale)

    @property
    def input_names(self) -> list[str]:
        return ["noise", *self.condition_names, *self.negative_names] + (["guidance_scale"] if self.guidance else [])

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        d = self.denoiser
        inputs = [torch.randn(batch, *d.sample_shape, generator=torch.Generator().manual_seed(0))]
        inputs += example_condition(d, batch, seed=1)
        inputs += example_condition(d, batch, seed=2, names=[n.removeprefix(NEGATIVE) for n in self.negative_names])
        if self.guidance:
            inputs.append(torch.tensor([self.default_guidance_scale], dtype=torch.float32))
        return tuple(inputs)

    def forward(self, noise: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names[1:], inputs))
        if self.conditional and not all(n in named for n in self.condition_names):
            raise UserError(f"model {self.denoiser.name!r} is conditional: the sampler needs {', '.join(self.condition_names)}")
        condition = assemble_condition(self.denoiser, named)
        guidance_scale = named.get("guidance_scale")
        if self.guidance and guidance_scale is None:
            guidance_scale = torch.tensor([self.default_guidance_scale], device=noise.device)
        null = self._null_for(condition, named)
        folding = self.time_features or contextlib.nullcontext()
        evaluations = iter(self.steps)

        def network(x: torch.Tensor, t: float) -> torch.Tensor:
            if self.time_features is not None:
                self.time_features.current = t
            return next(evaluations)(self._evaluate, x, t, condition, null, guidance_scale)

        with folding:
            latents = run_table(self.table, network, noise)
        return self.decoder(latents) if self.decoder is not None else latents

    def _evaluate(self, x, t: float, condition, null, guidance_scale) -> torch.Tensor:
        if self.guidance:
            return guided(self.network, x, t, condition, null, guidance_scale)
        return self.network(x, t, condition)

    def _null_for(self, condition, named: dict):
        """The unconditional branch: the negative inputs, else the baked null condition broadcast to the batch."""
        if condition is None or not self.classifier_free:
            return None
        if self.negative_names:
            given = {n.removeprefix(NEGATIVE): named[n] for n in self.negative_names}
            given.update({k: condition[k] for k in SHARED_CONDITION_KEYS if isinstance(condition, dict) and k in condition})
            return assemble_condition(self.denoiser, given)
        batch = condition_batch(condition)

        def broadcast(null, like):
            return null.to(like.device).expand(batch, *null.shape[1:])

        null = map_condition(broadcast, self.null_condition, condition)
        if isinstance(condition, dict):
            null.update({k: condition[k] for k in SHARED_CONDITION_KEYS if k in condition})
        return null

    def _fold_time_embedding(self) -> ConstantTimeFeatures | None:
        """Constant time features, where a probe with batch 2 shows they leave the output unchanged."""
        time_proj = _find_time_proj(self.network)
        if time_proj is None or not getattr(self.network, "time_features_foldable", True):
            return None
        features = ConstantTimeFeatures(time_proj, self.table.timesteps)
        device = next(self.network.parameters()).device
        probe = [x.to(device) for x in self.example_inputs(batch=2)]
        t = float(self.table.timesteps[0])
        cond = assemble_condition(self.denoiser, dict(zip(self.input_names[1:], probe[1:])))
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
    """sample [B,C,H,W], timestep [B] float32 (+ condition inputs) -> raw prediction."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        check_exportable(denoiser)
        self.denoiser = denoiser
        self.network = denoiser.module.eval()
        self.conditional = denoiser.conditioning != "none"

    @property
    def input_names(self) -> list[str]:
        # A guidance embedding's input (FLUX-dev): the guidance scale per sample.
        return ["sample", "timestep", *condition_names(self.denoiser)] + (["guidance"] if self.denoiser.guidance_embedded else [])

    output_names = ["prediction"]

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        d = self.denoiser
        inputs = [
            torch.randn(batch, *d.sample_shape, generator=torch.Generator().manual_seed(0)),
            torch.linspace(d.schedule.num_train_timesteps - 1, 0, batch, dtype=torch.float32),
        ]
        inputs += example_condition(d, batch, seed=1)
        if d.guidance_embedded:
            inputs.append(torch.full((batch,), 3.5))
        return tuple(inputs)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names[2:], condition))
        cond = assemble_condition(self.denoiser, named)
        if self.denoiser.guidance_embedded:
            cond = {**cond, "guidance": named["guidance"]}
        return self.network(sample, timestep, cond)
