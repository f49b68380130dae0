"""`compress prune`: structured pruning (magnitude, Taylor over timesteps, trajectory mask) into a model folder."""
from __future__ import annotations

from pathlib import Path

import click

from compress.commands.common import load_from_flags, model_options
from compress.errors import UserError


@click.command()
@click.argument("model")
@click.option("--method", default="magnitude", show_default=True, help="magnitude, taylor (Diff-Pruning) or mask (trajectory mask, EcoDiff).")
@click.option("--ratio", type=float, required=True, help="Share of channels removed per layer, strictly between 0 and 1.")
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across layers instead of the same ratio in each.")
@click.option("--round-to", type=int, default=None, help="Keep pruned widths multiples of this.")
@click.option("--finetune-steps", type=int, default=0, show_default=True, help="Recovery distillation steps from the original model.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Fine-tune batch size.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Fine-tune learning rate.")
@click.option("--ema", type=float, default=0.999, show_default=True, help="EMA decay of the fine-tuned weights (0: none).")
@click.option("--feature-weight", type=float, default=0.0, show_default=True, help="Weight of feature matching in the fine-tune.")
@click.option("--taylor-threshold", type=float, default=0.05, show_default=True, help="taylor: stop accumulating once loss < this x max.")
@click.option("--mask-solver", default="ddim", show_default=True, help="mask: the solver of the trajectory.")
@click.option("--mask-steps", type=int, default=10, show_default=True, help="mask: steps of the trajectory.")
@click.option("--mask-iterations", type=int, default=100, show_default=True, help="mask: optimisation iterations.")
@click.option("--mask-sparsity", type=float, default=0.01, show_default=True, help="mask: weight of the L1 sparsity term.")
@click.option("--no-checkpointing", is_flag=True, help="mask: plain backpropagation through the trajectory (memory grows with steps).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Model folder to write (replaced atomically).")
@model_options
def prune(model, method, ratio, global_pruning, round_to, finetune_steps, batch_size, lr, ema, feature_weight, taylor_threshold,
          mask_solver, mask_steps, mask_iterations, mask_sparsity, no_checkpointing, seed, device, out, **kw):
    """Prune MODEL's channels and heads with torch-pruning; write a model folder that other commands accept as MODEL."""
    from compress.outputs import Manifest, staged_folder
    from compress.prune import PruneConfig, prune as run_prune, save_pruned

    config = PruneConfig(method=method, ratio=ratio, global_pruning=global_pruning, round_to=round_to, finetune_steps=finetune_steps,
                         batch_size=batch_size, lr=lr, ema=ema, feature_weight=feature_weight, taylor_threshold=taylor_threshold,
                         mask_solver=mask_solver, mask_steps=mask_steps, mask_iterations=mask_iterations, mask_sparsity=mask_sparsity,
                         mask_checkpointing=not no_checkpointing, seed=seed)
    if ":" not in model and not Path(model).exists():
        raise UserError(f"{model} does not exist (expected a model folder, zoo:NAME, diffusers:PATH or python:module:factory)")
    if mask_solver:
        from compress.solvers import SolverConfig

        SolverConfig(mask_solver, mask_steps).validate()  # before any long work
    denoiser = load_from_flags(model, kw).to(device)
    pruned = run_prune(denoiser, config, progress=lambda m: click.echo(m, err=True))
    with staged_folder(Path(out)) as root:
        save_pruned(pruned.to("cpu"), root)
        manifest = Manifest(root, "prune")
        for name, fmt in (("model.safetensors", "safetensors"), ("model.json", "json")):
            manifest.add(root / name, fmt, "prune", config.to_dict())
        manifest.write()
    info = pruned.extra["pruning"]
    click.echo(f"wrote {out} ({method}, ratio {ratio}: MACs {info['macs_before'] / 1e6:.1f}M -> {info['macs_after'] / 1e6:.1f}M "
               f"({1 - info['macs_after'] / info['macs_before']:.0%} fewer), params {info['parameters_before'] / 1e6:.3f}M -> "
               f"{info['parameters_after'] / 1e6:.3f}M)")
