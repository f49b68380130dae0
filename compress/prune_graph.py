"""What torch-pruning needs to be told about a network it has never seen, found from one traced forward pass.

torch-pruning couples channels by following the autograd graph, and it treats every operation it does
not know as element-wise. On users' own denoisers three things then go wrong:

- ``nn.LayerNorm((C, H, W))`` over a conv map: its pruner cuts the last dim of the normalized shape (W),
  while the producing conv's channels are dim 0 of the LayerNorm's weight. `LayerNormPruner` cuts the
  dim that holds the channel, given the rank the layer was called with (a LayerNorm over (H, W) only
  does not touch channels at all).
- a product of two activations (q^T k, attention weights @ v, scaled_dot_product_attention): it is
  coupled index by index as if element-wise, across axes that are not channels, and a hand-written
  attention that scales by ``1/sqrt(q.shape[1])`` changes its temperature when q narrows. The layers
  producing such operands are kept out of pruning (``contracted``).
- a layer whose output is chunked into k equal parts (FiLM's scale/shift): every part is coupled to
  the same channels, so cutting a share of the layer's outputs cuts up to k times that share of the
  channels. Declaring k channel groups (``split_groups``) makes it cut the same share of each part.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

# Layers torch-pruning has a pruner for: the ends of the walks through the autograd graph.
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
            nn.Embedding, nn.PReLU, nn.MultiheadAttention, nn.LSTM)
CONTRACTIONS = ("BmmBackward", "MmBackward", "MvBackward", "DotBackward", "BaddbmmBackward", "AddbmmBackward",
                "ScaledDotProduct")
SPLITS = ("SplitBackward", "SplitWithSizesBackward")
# Layers whose inner products are their own business (tp prunes them whole): the walk steps over them.
OPAQUE = (nn.MultiheadAttention, nn.LSTM)


@dataclass
class Survey:
    layernorm_dims: dict = field(default_factory=dict)  # LayerNorm -> weight dim holding the channel (None: none does)
    layernorm_channels: dict = field(default_factory=dict)  # LayerNorm -> channels of its input
    mixed_rank: list = field(default_factory=list)  # LayerNorms called on inputs of different ranks
    contracted: dict = field(default_factory=dict)  # layer -> the product its output enters
    split_groups: dict = field(default_factory=dict)  # layer -> equal parts its output is chunked into
    output_layers: set = field(default_factory=set)  # the layers the network's output comes from: their widths are the output's

    def needs_layernorm_pruner(self) -> bool:
        """tp's own pruner is right where the channel is the last dim of every normalized shape."""
        return any(dim is None or dim != len(ln.normalized_shape) - 1 for ln, dim in self.layernorm_dims.items())


def survey(module: nn.Module, inputs: tuple, exempt=frozenset()) -> tuple[torch.Tensor, Survey]:
    """Runs ``module(*inputs)`` with grad and reads its autograd graph; returns the output and the findings.
    Layers in ``exempt`` (attention projections handled through ``num_heads``) are never kept out."""
    result = Survey()
    outputs, opaque = {}, {}
    hooks = [m.register_forward_hook(_recorder(outputs, opaque, result)) for m in module.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.enable_grad():
            out = module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(out, torch.Tensor) and out.grad_fn is not None:
        _read_graph(out.grad_fn, outputs, opaque, result, exempt)
        result.output_layers = producers(out.grad_fn, outputs)
    return out, result


def _recorder(outputs: dict, opaque: dict, result: Survey):
    def record(m, args, out):
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            outputs[out.grad_fn] = m
            if isinstance(m, OPAQUE):
                opaque[out.grad_fn] = [a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None]
        if isinstance(m, nn.LayerNorm) and args and isinstance(args[0], torch.Tensor):
            _record_layernorm(m, args[0], result)

    return record


def _record_layernorm(ln: nn.LayerNorm, x: torch.Tensor, result: Survey) -> None:
    # Conv maps carry channels at dim 1; token sequences (and flat features) at the last dim.
    axis = 1 if x.dim() >= 4 else x.dim() - 1
    dim = axis - (x.dim() - len(ln.normalized_shape))
    dim = dim if dim >= 0 else None
    if ln in result.layernorm_dims and result.layernorm_dims[ln] != dim and ln not in result.mixed_rank:
        result.mixed_rank.append(ln)
    result.layernorm_dims.setdefault(ln, dim)
    result.layernorm_channels.setdefault(ln, int(x.shape[axis]))


def _read_graph(root, outputs: dict, opaque: dict, result: Survey, exempt) -> None:
    stack, seen = [root], set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        name = fn.name()
        if fn not in outputs and name.startswith(CONTRACTIONS):
            _read_contraction(fn, name, outputs, result, exempt)
        elif name.startswith(SPLITS):
            _read_split(fn, outputs, result)
        if fn in opaque:
            stack.extend(opaque[fn])
        else:
            stack.extend(f for f, _ in fn.next_functions if f is not None)


def _read_contraction(fn, name: str, outputs: dict, result: Survey, exempt) -> None:
    operands = [producers(f, outputs) for f, _ in fn.next_functions if f is not None]
    activations = [p for p in operands if p]
    if len(activations) < 2:  # a weight times an activation: an ordinary layer
        return
    for layers in activations:
        for layer in layers - exempt:
            result.contracted.setdefault(layer, name.removesuffix("0"))


def _read_split(fn, outputs: dict, result: Survey) -> None:
    sizes = tuple(getattr(fn, "_saved_self_sym_sizes", ()) or ())
    dim = getattr(fn, "_saved_dim", None)
    if not sizes or dim is None:
        return
    dim = dim - 2**64 if dim >= 2**63 else dim  # a negative dim comes back as unsigned
    dim %= len(sizes)
    parts = getattr(fn, "_saved_split_sizes", None) or [getattr(fn, "_saved_split_size", 0)]
    if len(set(parts)) != 1 or not parts[0] or sizes[dim] % parts[0] or sizes[dim] // parts[0] < 2:
        return
    source = producers(fn.next_functions[0][0], outputs)
    if len(source) != 1:
        return
    (layer,) = source
    if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and _out_width(layer) == sizes[dim]:
        k = sizes[dim] // parts[0]
        result.split_groups[layer] = max(k, result.split_groups.get(layer, 1))


def _out_width(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def producers(fn, outputs: dict) -> set:
    """The layers whose outputs reach ``fn`` without passing another layer (parameters are not producers)."""
    found, stack, seen = set(), [fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if f in outputs:
            found.add(outputs[f])
            continue
        stack.extend(g for g, _ in f.next_functions)
    return found


class LayerNormPruner(tp.pruner.function.BasePruningFunc):
    """Cuts a LayerNorm along the dim of its weight that holds the producing layer's channels."""

    TARGET_MODULES = (nn.LayerNorm,)

    def __init__(self, found: Survey):
        super().__init__()
        self.dims = found.layernorm_dims
        self.channels = dict(found.layernorm_channels)

    def _dim(self, layer):
        return self.dims.get(layer, len(layer.normalized_shape) - 1)  # never called: tp's own convention

    def prune_out_channels(self, layer: nn.LayerNorm, idxs) -> nn.LayerNorm:
        dim = self._dim(layer)
        if dim is None:  # normalizes each channel on its own: nothing of it belongs to a channel
            self.channels[layer] -= len(idxs)
            return layer
        keep = sorted(set(range(layer.normalized_shape[dim])) - set(int(i) for i in idxs))
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, dim))
        shape = list(layer.normalized_shape)
        shape[dim] = len(keep)
        layer.normalized_shape = tuple(shape)
        return layer

    prune_in_channels = prune_out_channels  # a LayerNorm passes its channels through

    def get_out_channels(self, layer: nn.LayerNorm) -> int:
        dim = self._dim(layer)
        return self.channels[layer] if dim is None else layer.normalized_shape[dim]

    get_in_channels = get_out_channels
