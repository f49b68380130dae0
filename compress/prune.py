"""Structured pruning of diffusion denoisers, with torch-pruning as the engine. One call:

    pruned = prune(load_model("zoo:digits"), PruneConfig(method="taylor", ratio=0.3, finetune_steps=2000))

- ``magnitude``: L2 norm of each channel's weights across its dependency group.
- ``taylor``: |w * dL/dw| with the gradient of the denoising loss accumulated over timesteps
  t = 0, dt, 2dt, ... and stopped once the loss falls below ``taylor_threshold`` x its maximum
  (Diff-Pruning, Fang et al. 2023). The model's own samples stand in for training data.
- ``mask``: learned hard-concrete gates over the whole few-step sampling trajectory
  (`compress.trajectory_mask`, EcoDiff); the gates rank attention heads and resnet / feed-forward
  hidden channels, every other group is ranked by magnitude.

The output conv is kept, attention heads go whole (``num_heads`` is given to the pruner, head
dims stay), and afterwards every module attribute that still describes the old widths
(sampler channels, attention heads, norm channels) is set from the pruned weights, so the model
runs, exports and can be saved as a model folder (`rebuild_module` rebuilds it from JSON).
A recovery fine-tune by distillation from the original model follows when ``finetune_steps`` > 0
(`compress.distill`).

Users' own networks (``python:`` factories) prune the same way: one traced forward pass first tells
torch-pruning what it would get wrong there (`compress.prune_graph`: LayerNorms over (C, H, W), products
of two activations, chunked outputs), and a pruned one is saved as its factory plus the pruned shapes.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compress.denoiser import condition_to
from compress.errors import UserError, unknown_choice
from compress.section_config import SectionConfig
from compress.training import self_samples, training_target

METHODS = ("magnitude", "taylor", "mask")
WRAPPERS = ("diffusers-unet", "class-token-unet", "diffusers-transformer", "sd3-transformer")
# Transformers keep their residual stream whole: only attention heads and feed-forward hidden channels go.
TRANSFORMER_WRAPPERS = ("diffusers-transformer", "sd3-transformer")
# The projections that make an attention's heads (MMDiT's joint attention adds the text stream's own).
HEAD_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
PYTHON_FACTORY = "compress_python_factory"  # the attribute a module rebuilt from a python: factory keeps it in
# Widths that no tensor of a norm records when it has neither affine weights nor running statistics.
TENSORLESS_WIDTHS = ((nn.LayerNorm, "normalized_shape"), (nn.GroupNorm, "num_channels"), (nn.modules.batchnorm._NormBase, "num_features"))


@dataclass
class PruneConfig(SectionConfig):
    """The recipe's ``prune`` section.

    method          magnitude | taylor | mask
    ratio           share of channels removed per group (0 < ratio < 1); params fall by about 1-(1-ratio)^2
    global_pruning  rank channels across layers instead of the same ratio in every layer
    round_to        keep pruned widths multiples of this (None: only what GroupNorm needs)
    prune_heads     remove whole attention heads at the same ratio (head dims are never cut)
    taylor_*        Diff-Pruning's rule: timesteps 0, T/taylor_steps, ... until loss < threshold * max
    taylor_samples  samples (from the model itself) the Taylor gradients are taken on
    mask_*          the trajectory-mask search: solver and steps of the trajectory, optimisation
                    iterations, batch, learning rate, L1 sparsity weight, time-step checkpointing
    finetune_*      the recovery distillation (0 steps: none; finetune_seconds caps its wall-clock time);
                    feature_weight > 0 adds feature matching; data_* the original's own samples it trains on
    """

    section = "prune"

    method: str = "magnitude"
    ratio: float = 0.3
    global_pruning: bool = False
    round_to: int | None = None
    prune_heads: bool = True
    taylor_threshold: float = 0.05
    taylor_steps: int = 100
    taylor_samples: int = 64
    mask_solver: str = "ddim"
    mask_steps: int = 10
    mask_iterations: int = 100
    mask_batch: int = 8
    mask_lr: float = 0.05
    mask_sparsity: float = 0.01
    mask_checkpointing: bool = True
    finetune_steps: int = 0
    finetune_seconds: float | None = None  # stop the fine-tune at this wall-clock budget
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    feature_weight: float = 0.0
    data_samples: int = 512
    data_solver: str = "dpmpp-2m"
    data_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise unknown_choice("pruning method", self.method, METHODS)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise UserError(f"pruning ratio must lie strictly between 0 and 1, got {self.ratio!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise UserError(f"prune round_to must be a positive integer or null, got {self.round_to!r}")
        if not 0 < self.taylor_threshold < 1:
            raise UserError(f"prune taylor_threshold must lie in (0, 1), got {self.taylor_threshold!r}")
        for name in ("taylor_steps", "taylor_samples", "mask_steps", "mask_iterations", "mask_batch", "batch_size", "data_samples", "data_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"prune {name} must be a positive integer, got {value!r}")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            raise UserError(f"prune finetune_steps must be a non-negative integer, got {self.finetune_steps!r}")
        if self.finetune_seconds is not None and not self.finetune_seconds > 0:
            raise UserError(f"prune finetune_seconds must be positive or null, got {self.finetune_seconds!r}")
        if not 0 <= self.ema < 1:
            raise UserError(f"prune ema must lie in [0, 1), got {self.ema!r}")
        for name in ("lr", "mask_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"prune {name} must be positive, got {getattr(self, name)!r}")
        for name in ("mask_sparsity", "feature_weight"):
            if not getattr(self, name) >= 0:
                raise UserError(f"prune {name} must be non-negative, got {getattr(self, name)!r}")
        return self


# ----------------------------------------------------------------------------- the entry point


def prune(denoiser, config: PruneConfig | None = None, progress: Callable[[str], None] | None = None):
    """A pruned (and, with ``finetune_steps``, fine-tuned) copy of ``denoiser``; the input is left untouched."""
    from compress.denoiser import Denoiser

    config = (config or PruneConfig()).validate()
    log = progress or (lambda message: None)
    if not isinstance(denoiser, Denoiser):
        raise UserError(f"prune() takes a Denoiser, got {type(denoiser).__name__}")
    started = time.time()
    teacher = denoiser
    device = teacher.device
    before = _safe_macs(teacher)
    output_shape = _output_shape(teacher)
    student = dataclasses.replace(teacher, module=copy.deepcopy(teacher.module).to(device), extra=dict(teacher.extra))
    module = student.module
    head_dims = attention_head_dims(module)
    gates = None
    if config.method == "taylor":
        used = accumulate_taylor_gradients(student, config, log)
        log(f"taylor: gradients accumulated over {len(used)} timesteps ({used[0]}..{used[-1]})")
    elif config.method == "mask":
        gates = _search_gates(student, config, log)
    importance = _importance(config, gates)
    with torch.enable_grad():  # the dependency graph is traced through autograd
        pruner, names = _make_pruner(student, config, importance, log)
        _step(pruner, names, teacher.name)
    module.zero_grad(set_to_none=True)
    if gates is not None:
        gates.remove()
    sync_attributes(module, head_dims)
    _check_runs(student, output_shape)
    after = _safe_macs(student)
    if after["parameters"] >= before["parameters"]:
        raise UserError(f"pruning ratio {config.ratio} removed nothing from model {teacher.name!r}: its layers are too narrow "
                        "for that ratio (or round_to / norm groups forbid it); use a larger ratio")
    log(f"pruned: {before['macs'] / 1e6:.1f}M -> {after['macs'] / 1e6:.1f}M MACs, {before['parameters'] / 1e6:.3f}M -> {after['parameters'] / 1e6:.3f}M params")
    finetune = None
    if config.finetune_steps > 0:
        from compress.distill import DistillConfig, distill

        finetune = distill(student, teacher, DistillConfig.from_prune(config), log=log)
    student.extra = {
        **{k: v for k, v in teacher.extra.items() if k != "pruning"},
        "pruning": {
            "method": config.method,
            "ratio": config.ratio,
            "config": config.to_dict(),
            "macs_before": before["macs"],
            "macs_after": after["macs"],
            "parameters_before": before["parameters"],
            "parameters_after": after["parameters"],
            "finetune": finetune,
            "seconds": round(time.time() - started, 1),
        },
    }
    student.name = f"{teacher.name}-pruned"
    student.module.eval()
    return student


def _search_gates(student, config: PruneConfig, log):
    from compress.trajectory_mask import gate_sites, search_mask

    if not gate_sites(student.module):
        log(f"mask: model {student.name!r} has no diffusers attention, resnet or feed-forward blocks to gate; "
            "every group is ranked by magnitude")
        return None
    return search_mask(student, config, log)


def _reason(e: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _safe_macs(denoiser) -> dict:
    from compress.stats import count_macs

    try:
        return count_macs(denoiser)
    except Exception as e:  # a model the MAC counter cannot run is a model torch-pruning cannot trace either
        raise UserError(f"cannot trace model {denoiser.name!r} for pruning: {_reason(e)}") from None


def _output_shape(denoiser) -> tuple:
    from compress.stats import example_inputs

    with torch.no_grad():
        return tuple(denoiser.module(*[condition_to(v, denoiser.device) for v in example_inputs(denoiser, 2)]).shape)


def _check_runs(denoiser, expected: tuple) -> None:
    try:
        shape = _output_shape(denoiser)
    except Exception as e:
        raise UserError(f"the pruned model no longer runs ({_reason(e)}); "
                        "its architecture needs an attribute fix that compress.prune does not know") from None
    if shape != expected:
        raise UserError(f"the pruned model's output is {list(shape)} where the original's is {list(expected)}: a layer its output "
                        "comes from was narrowed")


# ----------------------------------------------------------------------------- driving torch-pruning


def _attention_modules(module: nn.Module):
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in module.named_modules() if isinstance(m, Attention)]


def attention_head_dims(module: nn.Module) -> dict[str, int]:
    """{attention module name: head dim}; heads are pruned whole, so head dims never change."""
    return {name: a.inner_dim // a.heads for name, a in _attention_modules(module)}


def _kept_layers(module: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must stay: the output conv of a UNet, the final projections of a DiT,
    and, in a DiT, everything writing the residual stream (its positional embedding is a buffer that
    torch-pruning cannot narrow), so only heads and feed-forward hidden channels are pruned there."""
    kept = []
    for name, m in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("conv_out", "proj_out_2"):
            kept.append(m)
    if _find_inner(module)[0] in TRANSFORMER_WRAPPERS:
        for name, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not _is_transformer_prunable(name):
                kept.append(m)
    return kept


def _is_transformer_prunable(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in HEAD_PROJECTIONS or name.endswith(("ff.net.0.proj", "ff_context.net.0.proj"))


def _make_pruner(denoiser, config: PruneConfig, importance, log):
    """The torch-pruning pruner for ``denoiser`` and {module: name}; what the survey found is logged."""
    import torch_pruning as tp

    from compress.prune_graph import LayerNormPruner, survey
    from compress.stats import example_inputs

    module = denoiser.module
    inputs = tuple(condition_to(v, denoiser.device) for v in example_inputs(denoiser))
    num_heads = {}
    for _, a in _attention_modules(module):
        for projection in HEAD_PROJECTIONS:
            if getattr(a, projection, None) is not None:
                num_heads[getattr(a, projection)] = a.heads
    # torch-pruning follows the autograd graph from the output back to the weights: without one there is nothing to follow.
    for p in module.parameters():  # our own copy: a frozen source model must still be traceable
        p.requires_grad_(True)
    module.eval()  # tp traces in eval mode too; a BatchNorm in train mode would learn from the zero inputs
    out, found = survey(module, inputs, exempt=frozenset(m for _, a in _attention_modules(module) for m in a.modules()))
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        raise UserError(f"torch-pruning cannot trace model {denoiser.name!r}: its output is not on the autograd graph "
                        "(does its forward run under torch.no_grad or return a non-tensor?)")
    del out
    names = {m: n for n, m in module.named_modules()}
    _log_survey(found, names, log)
    try:
        pruner = tp.pruner.BasePruner(
            module,
            inputs,
            GuardedImportance(importance, names),
            global_pruning=config.global_pruning,
            pruning_ratio=config.ratio,
            ignored_layers=_kept_layers(module) + list(found.output_layers) + list(found.contracted) + found.mixed_rank,
            round_to=config.round_to,
            # Fresh dicts: tp's defaults are shared between pruners and fill up with every model's layers.
            in_channel_groups={},
            out_channel_groups=dict(found.split_groups),
            num_heads=num_heads,
            prune_num_heads=config.prune_heads and bool(num_heads),
            prune_head_dims=False,
            head_pruning_ratio=config.ratio if config.prune_heads else 0.0,
            customized_pruners={nn.LayerNorm: LayerNormPruner(found)} if found.needs_layernorm_pruner() else None,
        )
    except Exception as e:
        raise UserError(f"torch-pruning cannot trace model {denoiser.name!r}: {_reason(e)}") from None
    return pruner, names


def _describe(layer, names: dict) -> str:
    name = names.get(layer)
    return f"{name} ({type(layer).__name__})" if name is not None else repr(layer)


def _log_survey(found, names: dict, log) -> None:
    order = {m: i for i, m in enumerate(names)}  # the module's own order, not the graph walk's
    if found.contracted:
        ops = ", ".join(sorted(set(found.contracted.values())))
        layers = sorted(found.contracted, key=lambda m: order.get(m, len(order)))
        log(f"kept out of pruning: {', '.join(_describe(m, names) for m in layers)}: their outputs are multiplied "
            f"with each other ({ops}), which torch-pruning would couple index by index as if element-wise")
    if found.mixed_rank:
        log(f"kept out of pruning: {', '.join(_describe(m, names) for m in found.mixed_rank)}: called on inputs of different ranks")
    if found.needs_layernorm_pruner():
        odd = [ln for ln, dim in found.layernorm_dims.items() if dim != len(ln.normalized_shape) - 1]
        log(f"LayerNorm cut along its channel dim, not its last: {', '.join(_describe(m, names) for m in odd)}")
    if found.split_groups:
        split = sorted(found.split_groups.items(), key=lambda item: order.get(item[0], len(order)))
        log(f"pruned in equal parts (their outputs are chunked): {', '.join(f'{_describe(m, names)} x{k}' for m, k in split)}")


def _step(pruner, names: dict, model: str) -> None:
    """``pruner.step()``, with whatever torch-pruning raises turned into one line naming the layer."""
    try:
        for group in pruner.step(interactive=True):
            try:
                group.prune()
            except Exception as e:
                root = group[0].dep.target.module
                raise UserError(f"torch-pruning failed to prune {_describe(root, names)} in model {model!r}: {_reason(e)}") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"torch-pruning failed on model {model!r}: {_reason(e)}") from None


class GuardedImportance:
    """An importance whose failures name the group's root layer instead of ending in a traceback."""

    def __init__(self, importance, names: dict):
        self.importance, self.names = importance, names

    def __call__(self, group):
        try:
            return self.importance(group)
        except Exception as e:
            root = group[0].dep.target.module
            raise UserError(f"torch-pruning cannot score the channels of {_describe(root, self.names)}: {_reason(e)}") from None


def _importance(config: PruneConfig, gates):
    import torch_pruning as tp

    if config.method == "taylor":
        return tp.importance.GroupTaylorImportance()
    magnitude = tp.importance.GroupMagnitudeImportance(p=2)
    if config.method == "mask":
        return GateImportance(gates, magnitude)
    return magnitude


class GateImportance:
    """Importance from learned gates where a group holds a gated layer, magnitude elsewhere.

    Within a gated group the gate order decides which channels go (magnitude only breaks ties); with
    global pruning, gate scores (in [0, 1]) and mean-normalised magnitudes (about 1) are on similar scales.
    """

    def __init__(self, gates, fallback):
        self.by_layer = gates.scores_by_layer() if gates is not None else {}
        self.fallback = fallback

    @torch.no_grad()
    def __call__(self, group):
        import torch_pruning as tp

        base = self.fallback(group)
        for i, (dep, idxs) in enumerate(group):
            scores = self.by_layer.get(dep.layer)
            if scores is None or dep.pruning_fn not in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs) or base is None:
                continue
            out = torch.zeros_like(base)
            out[torch.as_tensor(root_idxs)] = scores.to(out)[torch.as_tensor(idxs)]
            # Keep magnitude as a tie breaker among equally (un)gated channels.
            return out + 1e-6 * base / (base.max() + 1e-12)
        return base


# ----------------------------------------------------------------------------- Taylor (Diff-Pruning)


def diff_pruning_timesteps(loss_at: Callable[[int], float], timesteps, threshold: float) -> list[int]:
    """Diff-Pruning's rule: visit t = timesteps[0], timesteps[1], ... (from 0 upward), keep each one,
    and stop after the first whose loss falls below ``threshold`` x the largest loss seen so far.
    ``loss_at(t)`` computes the loss (and accumulates its gradient) for timestep t."""
    used, largest = [], 0.0
    for t in timesteps:
        loss = float(loss_at(int(t)))
        used.append(int(t))
        largest = max(largest, loss)
        if loss < threshold * largest:
            break
    return used


def accumulate_taylor_gradients(denoiser, config: PruneConfig, log=lambda m: None) -> list[int]:
    """Accumulates dL/dw in ``.grad`` over Diff-Pruning's timesteps; returns the timesteps used."""
    module = denoiser.module
    device = denoiser.device
    x0, cond = self_samples(denoiser, config.taylor_samples, config.seed, config.data_solver, config.data_steps)
    T = denoiser.schedule.num_train_timesteps
    stride = max(1, T // config.taylor_steps)
    generator = torch.Generator().manual_seed(config.seed + 2)
    eps = torch.randn(x0.shape, generator=generator)
    module.zero_grad(set_to_none=True)
    module.eval()

    def loss_at(t: int) -> float:
        ts = torch.full((x0.shape[0],), t, dtype=torch.long)
        xt, target = training_target(denoiser, x0, eps, ts)
        with torch.enable_grad():
            out = module(xt.to(device), ts.float().to(device), condition_to(cond, device))
            loss = torch.nn.functional.mse_loss(out, target.to(device))
            loss.backward()
        return loss.item()

    return diff_pruning_timesteps(loss_at, range(0, T, stride), config.taylor_threshold)


# ----------------------------------------------------------------------------- stale attributes


def sync_attributes(module: nn.Module, head_dims: dict[str, int]) -> None:
    """Sets every width-describing attribute from the (pruned) weights, so forward passes and exports agree."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for name, m in module.named_modules():
        _sync_standard(name, m)
    for name, m in module.named_modules():
        if isinstance(m, (Downsample2D, Upsample2D)):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, nn.modules.conv._ConvNd):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
            elif isinstance(getattr(m, "norm", None), nn.LayerNorm):
                m.channels = m.out_channels = m.norm.normalized_shape[0]
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            head_dim = head_dims[name]
            m.heads = m.to_q.out_features // head_dim
            m.sliceable_head_dim = m.heads
            m.inner_dim = m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features
            m.query_dim = m.to_q.in_features
            m.out_dim = m.to_out[0].out_features
            if m.heads < 1:
                raise UserError(f"pruning removed every head of {name}")


def _sync_standard(name: str, m: nn.Module) -> None:
    """The widths of a torch module, read from its weights (or, for a norm without them, its statistics)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm and InstanceNorm
        source = m.weight if m.weight is not None else m.running_mean
        if source is not None:
            m.num_features = source.shape[0]
    elif isinstance(m, nn.GroupNorm) and m.weight is not None:
        m.num_channels = m.weight.shape[0]
        if m.num_channels % m.num_groups:
            raise UserError(f"pruning left {name} with {m.num_channels} channels, not divisible into its {m.num_groups} groups")
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)  # (C, H, W) as well as (C,)
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()


# ----------------------------------------------------------------------------- saving and rebuilding


def _find_inner(module: nn.Module):
    from compress.denoiser import ClassTokenUNet, DiffusersTransformer, DiffusersUNet, SD3Transformer

    if isinstance(module, ClassTokenUNet):
        return "class-token-unet", module.unet
    if isinstance(module, SD3Transformer):
        return "sd3-transformer", module.transformer
    if isinstance(module, DiffusersUNet):
        return "diffusers-unet", module.unet
    if isinstance(module, DiffusersTransformer):
        return "diffusers-transformer", module.transformer
    return None, None


def _plain_config(config) -> dict:
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dict(config).items() if not k.startswith("_")}


def builder_args(pruned_module: nn.Module, source: str | None = None, sample_shape=None) -> dict:
    """JSON that `rebuild_module` turns back into the pruned architecture (random weights). A module that is
    not a diffusers wrapper is rebuilt by the ``python:`` factory it came from (``source``)."""
    wrapper, inner = _find_inner(pruned_module)
    if wrapper is None:
        return _python_builder_args(pruned_module, source, sample_shape)
    reference = _build(wrapper, inner.__class__.__name__, _plain_config(inner.config), getattr(pruned_module, "num_classes", None))
    original = reference.state_dict()
    shapes = {k: list(v.shape) for k, v in pruned_module.state_dict().items() if k in original and tuple(original[k].shape) != tuple(v.shape)}
    heads = {name: a.heads for name, a in _attention_modules(pruned_module)}
    return {
        "wrapper": wrapper,
        "class_name": inner.__class__.__name__,
        "config": _plain_config(inner.config),
        "num_classes": getattr(pruned_module, "num_classes", None),
        "shapes": shapes,
        "heads": heads,
    }


def _build(wrapper: str, class_name: str, config: dict, num_classes) -> nn.Module:
    import diffusers

    from compress.denoiser import ClassTokenUNet, DiffusersTransformer, DiffusersUNet, SD3Transformer

    supported = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel", "SD3Transformer2DModel")
    if class_name not in supported or wrapper not in WRAPPERS:
        raise UserError(f"pruned model folder names an unsupported architecture {wrapper}/{class_name!r}")
    inner = getattr(diffusers, class_name).from_config(config)
    if wrapper == "class-token-unet":
        return ClassTokenUNet(inner, int(num_classes))
    if wrapper == "diffusers-unet":
        return DiffusersUNet(inner)
    if wrapper == "sd3-transformer":
        return SD3Transformer(inner)
    return DiffusersTransformer(inner)


def _python_builder_args(module: nn.Module, source: str | None, sample_shape) -> dict:
    # A module rebuilt from a pruned folder remembers its factory: its Denoiser's source is then the folder.
    factory = source if isinstance(source, str) and source.startswith("python:") else getattr(module, PYTHON_FACTORY, None)
    if not factory:
        raise UserError(f"a pruned {type(module).__name__} cannot be saved as a model folder: it did not come from a "
                        f"python:module:factory reference (its source is {source!r}), and without one (or a diffusers "
                        "UNet/DiT config) nothing can rebuild it without pickles")
    original = _factory_module(factory, sample_shape)
    reference, pruned = original.state_dict(), module.state_dict()
    if set(reference) != set(pruned):
        odd = sorted(set(reference) ^ set(pruned))[0]
        raise UserError(f"a pruned {type(module).__name__} cannot be saved as a model folder: {factory} now builds a model whose "
                        f"tensors differ from it (first: {odd!r})")
    return {
        "wrapper": "python",
        "factory": factory,
        "sample_shape": list(sample_shape) if sample_shape else None,
        "shapes": {k: list(v.shape) for k, v in pruned.items() if tuple(reference[k].shape) != tuple(v.shape)},
        "attributes": _tensorless_widths(module, original),
    }


def _tensorless_widths(module: nn.Module, original: nn.Module) -> dict:
    """{module name: {attribute: value}} for the pruned norms whose width no tensor of theirs records."""
    changed, before = {}, dict(original.named_modules())
    for name, m in module.named_modules():
        if any(t is not None for t in (*m._parameters.values(), *m._buffers.values())):
            continue
        for kind, attr in TENSORLESS_WIDTHS:
            if isinstance(m, kind) and getattr(m, attr) != getattr(before.get(name), attr, None):
                value = getattr(m, attr)
                changed[name] = {attr: list(value) if isinstance(value, tuple) else value}
    return changed


def _factory_module(factory: str, sample_shape) -> nn.Module:
    """The module of ``python:module:factory``, loaded as any ``python:`` reference is."""
    from compress.loading import ScheduleFlags, load_model

    if not isinstance(factory, str) or not factory.startswith("python:"):
        raise UserError(f"pruned model description names {factory!r} as its factory; only python:module:factory references rebuild")
    flags = ScheduleFlags(sample_shape=tuple(sample_shape) if sample_shape else None)
    try:
        return load_model(factory, flags).module
    except UserError as e:
        raise UserError(f"cannot rebuild the pruned model from {factory}: {e}") from None
    except Exception as e:  # the user's own code: whatever it raises is about their factory, not ours
        raise UserError(f"cannot rebuild the pruned model from {factory}: its factory raised {_reason(e)}") from None


def _set_shapes(module: nn.Module, shapes: dict) -> None:
    """Replaces each named parameter or buffer by an empty tensor of its pruned shape (same dtype and device)."""
    for key, shape in shapes.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if owner._parameters.get(leaf) is not None:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)
        elif owner._buffers.get(leaf) is not None:
            old = owner._buffers[leaf]
            owner._buffers[leaf] = torch.empty(shape, dtype=old.dtype, device=old.device)
        else:
            raise KeyError(key)


def _set_widths(module: nn.Module, attributes: dict) -> None:
    for name, values in attributes.items():
        m = module.get_submodule(name)
        for attr, value in values.items():
            if not any(isinstance(m, kind) and attr == allowed for kind, allowed in TENSORLESS_WIDTHS):
                raise KeyError(f"{name}.{attr}")
            setattr(m, attr, tuple(value) if isinstance(value, list) else int(value))


def rebuild_module(args: dict) -> nn.Module:
    """The pruned architecture described by `builder_args`, with random weights of the pruned shapes."""
    python = args.get("wrapper") == "python"
    module = _factory_module(args.get("factory"), args.get("sample_shape")) if python else None
    try:
        if module is None:
            module = _build(args["wrapper"], args["class_name"], args["config"], args.get("num_classes"))
        head_dims = attention_head_dims(module)
        _set_shapes(module, args.get("shapes", {}))
        _set_widths(module, args.get("attributes", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"pruned model description is inconsistent: {type(e).__name__}: {e}") from None
    sync_attributes(module, head_dims)
    for name, a in _attention_modules(module):
        if name in args.get("heads", {}) and args["heads"][name] != a.heads:
            raise UserError(f"pruned model description: {name} should have {args['heads'][name]} heads, its weights give {a.heads}")
    if python:
        setattr(module, PYTHON_FACTORY, args["factory"])
    return module.eval()


def rebuild_args(denoiser) -> dict:
    """`builder_args` of a pruned Denoiser: ``save_model_folder(d, folder, "pruned", rebuild_args(d))``."""
    return builder_args(denoiser.module, denoiser.source, denoiser.sample_shape)


def save_pruned(denoiser, folder) -> None:
    from compress.model_folder import save_model_folder

    save_model_folder(denoiser, folder, "pruned", rebuild_args(denoiser))
