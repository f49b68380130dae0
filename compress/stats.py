"""Size and cost of a denoiser: parameters and multiply-accumulates of one network evaluation."""
from __future__ import annotations

import torch

from compress.denoiser import map_condition


def example_inputs(denoiser, batch: int = 1) -> tuple:
    """(sample, timestep, cond) for one evaluation of ``denoiser.module``; cond is the null condition."""
    x = torch.zeros((batch, *denoiser.sample_shape))
    t = torch.full((batch,), denoiser.schedule.num_train_timesteps // 2, dtype=torch.float32)
    cond = denoiser.null_condition(batch)
    if denoiser.guidance_embedded:  # FLUX-dev's network takes the guidance value beside the text
        cond = {**cond, "guidance": torch.ones(batch)}
    return (x, t, cond)


def count_macs(denoiser) -> dict:
    """MACs per sample of one denoiser call (torch-pruning's counter) and the parameter count."""
    import torch_pruning as tp

    module = denoiser.module
    device = next(module.parameters()).device
    inputs = tuple(map_condition(lambda v: v.to(device), v) for v in example_inputs(denoiser))
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, example_inputs=inputs)
    return {"macs": int(macs), "parameters": int(params)}
