"""End-to-end trajectory mask (EcoDiff, "Effortless Efficiency", 2024) with time-step gradient checkpointing.

One learnable hard-concrete gate per attention head, per feed-forward hidden neuron and per resnet
hidden channel (the input channels of each resnet's second conv); the same gates act at every
timestep. The loss is the MSE between the final samples of the gated model and of the original
from the same noise over the whole few-step trajectory, plus ``sparsity`` x the mean open
probability of the gates (an L1 term on non-negative values).

Time-step gradient checkpointing: the solver is a straight-line program over the noise and the
network outputs (`compress.solvers.SolverTable`, the same table the exported sampler bakes). The
trajectory runs without autograd, keeping only its latent-sized values; then the table is walked
backwards, re-running one network call at a time with autograd on, and the gradient of its input
is passed on to the earlier values it was combined from. Peak memory is one network evaluation's
activations, whatever the number of steps; the gradients equal those of plain backpropagation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from compress.denoiser import condition_to, guided
from compress.solvers import SolverConfig, SolverTable, combine_values, run_table
from compress.training import seeded_conditions

# Hard-concrete constants (Louizos et al. 2018), as EcoDiff uses them.
BETA, ZETA, GAMMA = 0.83, 1.1, -0.1
INIT_LOG_ALPHA = 3.0  # gates start (almost surely) open: the gated model starts as the original


class HardConcreteGates(nn.Module):
    """Gates on the inputs of chosen layers (forward pre-hooks); ``enabled`` False turns them off."""

    def __init__(self, sites: dict[str, tuple[tuple[nn.Module, ...], int, int]]):
        """sites: {name: (layers whose inputs share these gates, number of gates, channels per gate)}"""
        super().__init__()
        self.layers = {name: layers for name, (layers, _, _) in sites.items()}
        self.repeat = {name: rep for name, (_, _, rep) in sites.items()}
        self.log_alpha = nn.ParameterDict({_key(name): nn.Parameter(torch.full((n,), INIT_LOG_ALPHA)) for name, (_, n, _) in sites.items()})
        self.uniform: dict[str, torch.Tensor] | None = None  # the current stochastic sample; None: deterministic
        self.enabled = True
        self.handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layers in self.layers.items() for layer in layers]

    def _hook(self, name: str):
        def hook(layer, args):
            if not self.enabled:
                return None
            x = args[0]
            z = self.value(name).repeat_interleave(self.repeat[name]).to(x.dtype)
            shape = [1] * x.dim()
            shape[1 if isinstance(layer, nn.Conv2d) else -1] = -1
            return (x * z.view(shape),) + tuple(args[1:])

        return hook

    def resample(self, generator: torch.Generator | None) -> None:
        """Draws the stochastic relaxation once; it stays fixed (the same at every timestep) until the next call."""
        if generator is None:
            self.uniform = None
            return
        self.uniform = {name: torch.rand(p.shape, generator=generator).clamp(1e-6, 1 - 1e-6) for name, p in self.log_alpha.items()}

    def value(self, name: str) -> torch.Tensor:
        log_alpha = self.log_alpha[_key(name)]
        if self.uniform is None:
            s = torch.sigmoid(log_alpha)
        else:
            u = self.uniform[_key(name)].to(log_alpha.device)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        """P(gate != 0) per gate, all sites concatenated: the expected L0 norm's terms."""
        return torch.cat([torch.sigmoid(p - BETA * math.log(-GAMMA / ZETA)) for p in self.log_alpha.values()])

    def scores_by_layer(self) -> dict[nn.Module, torch.Tensor]:
        """Per input channel of each gated layer: its gate's keep score (sigmoid of log alpha)."""
        return {layer: torch.sigmoid(self.log_alpha[_key(name)].detach()).repeat_interleave(self.repeat[name]).cpu()
                for name, layers in self.layers.items() for layer in layers}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _key(name: str) -> str:
    return name.replace(".", "__")


def gate_sites(module: nn.Module) -> dict[str, tuple[tuple[nn.Module, ...], int, int]]:
    """Where the gates go: attention heads (input of to_out, and of to_add_out in joint attention, whose
    image and text tokens share the heads), resnet hidden channels (input of conv2), feed-forward
    hidden neurons (input of the feed-forward's output layer)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    sites = {}
    for name, m in module.named_modules():
        if isinstance(m, Attention):
            out = m.to_out[0]
            context_out = getattr(m, "to_add_out", None)
            sites[f"{name}.heads"] = ((out,) + ((context_out,) if context_out is not None else ()), m.heads, out.in_features // m.heads)
        elif isinstance(m, ResnetBlock2D):
            sites[f"{name}.hidden"] = ((m.conv2,), m.conv2.in_channels, 1)
        elif isinstance(m, FeedForward):
            last = [layer for layer in m.net if isinstance(layer, nn.Linear)][-1]
            sites[f"{name}.hidden"] = ((last,), last.in_features, 1)
    return sites


# ----------------------------------------------------------------------------- the trajectory


def _table_rows(table: SolverTable):
    """(row weights, network timestep or None) per row before the last, in program order."""
    timesteps = iter(table.timesteps)
    return [(row, float(next(timesteps)) if call else None) for row, call in zip(table.weights[:-1], table.calls)]


def run_trajectory(table: SolverTable, network, noise: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The final sample and every value of the program (noise, combinations, network outputs), without autograd.

    Values are combined exactly as `run_table` combines them, so the stored trajectory is the sampler's own."""
    values = [noise]
    with torch.no_grad():
        for row, t in _table_rows(table):
            values.append(combine_values(row, values))
            if t is not None:
                values.append(network(values[-1], t))
        final = combine_values(table.weights[-1], values)
    return final, values


def checkpointed_backward(table: SolverTable, network, values: list[torch.Tensor], grad_final: torch.Tensor) -> torch.Tensor:
    """Accumulates d(loss)/d(parameters) of every network call, given d(loss)/d(final sample).

    Walks the program backwards: a combination row passes its gradient to the values it was made
    of; a network call is re-run on its stored input with autograd on, its output's gradient is
    backpropagated through that one call, and its input gradient joins the row that made the input.
    Returns d(loss)/d(noise).
    """
    grads: list[torch.Tensor | None] = [None] * len(values)

    def add(k: int, g: torch.Tensor) -> None:
        grads[k] = g if grads[k] is None else grads[k] + g

    for k, w in enumerate(table.weights[-1]):
        if w != 0.0:
            add(k, float(w) * grad_final)
    # Index of each row's combination value in `values` (a call's output follows its input).
    index, rows = 1, []
    for row, t in _table_rows(table):
        rows.append((row, t, index))
        index += 2 if t is not None else 1
    for row, t, k in reversed(rows):
        if t is not None and grads[k + 1] is not None:
            x = values[k].detach().requires_grad_(True)
            with torch.enable_grad():
                out = network(x, t)
            torch.autograd.backward(out, grads[k + 1])
            add(k, x.grad)
            grads[k + 1] = None
        if grads[k] is not None:
            for j, w in enumerate(row[:k]):
                if w != 0.0:
                    add(j, float(w) * grads[k])
            grads[k] = None
    return grads[0]


def trajectory_loss_backward(table, network, noise, reference, checkpointing: bool) -> float:
    """MSE(final gated sample, reference) and its gradient in the parameters, with or without checkpointing."""
    if checkpointing:
        final, values = run_trajectory(table, network, noise)
        final = final.detach().requires_grad_(True)
        loss = torch.nn.functional.mse_loss(final, reference)
        loss.backward()
        checkpointed_backward(table, network, values, final.grad)
        return loss.item()
    with torch.enable_grad():
        final = run_table(table, network, noise)
        loss = torch.nn.functional.mse_loss(final, reference)
        loss.backward()
    return loss.item()


def make_network(denoiser, cond, guidance_scale):
    module = denoiser.module
    null = denoiser.null_condition(cond.shape[0], cond.device) if cond is not None and guidance_scale is not None else None

    def network(x, t):
        return guided(module, x, t, cond, null, guidance_scale)

    return network


def search_mask(denoiser, config, log=lambda m: None) -> HardConcreteGates:
    """Learns the gates on ``denoiser`` (whose weights stay frozen); returns them with their hooks removed."""
    module = denoiser.module
    device = denoiser.device
    sites = gate_sites(module)
    if not sites:
        from compress.errors import UserError

        raise UserError(f"model {denoiser.name!r} has no attention heads, resnet or feed-forward blocks to gate for the mask method")
    table = SolverConfig(config.mask_solver, config.mask_steps).table(denoiser.schedule, denoiser.prediction_type)
    gates = HardConcreteGates(sites).to(device)
    requires = {p: p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    optimizer = torch.optim.Adam(gates.parameters(), lr=config.mask_lr)
    generator = torch.Generator().manual_seed(config.seed)
    try:
        for it in range(config.mask_iterations):
            noise = torch.randn((config.mask_batch, *denoiser.sample_shape), generator=generator).to(device)
            cond = seeded_conditions(denoiser, config.mask_batch, config.seed + 1000 + it)
            cond = condition_to(cond, device)
            network = make_network(denoiser, cond, None)
            gates.enabled = False
            with torch.no_grad():
                reference = run_table(table, network, noise)
            gates.enabled = True
            gates.resample(generator)
            optimizer.zero_grad(set_to_none=True)
            mse = trajectory_loss_backward(table, network, noise, reference, config.mask_checkpointing)
            sparsity = gates.open_probability().mean()
            (config.mask_sparsity * sparsity).backward()
            optimizer.step()
            if it % max(1, config.mask_iterations // 10) == 0 or it == config.mask_iterations - 1:
                log(f"mask {it + 1}/{config.mask_iterations}: trajectory mse {mse:.4g}, open {sparsity.item():.3f}")
    finally:
        gates.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
    return gates
