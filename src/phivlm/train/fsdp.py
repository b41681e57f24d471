"""Fully sharded data parallel (torch FSDP2, ``fully_shard``) for language models that do not fit one device.

``--fsdp full`` (ZeRO-3-like): parameters, gradients and optimizer state are sharded over the processes; a
decoder layer's parameters are all-gathered for its forward, freed after it and gathered again for its
backward. ``--fsdp grad-op`` (ZeRO-2-like): the same, but the gathered parameters stay from forward to
backward (less communication, more memory). Every decoder layer is one FSDP group; everything else (the
embeddings, final norm and LM head, the projector, the separator and the feature statistics) forms the root
group around the training step, so their gradients are reduce-scattered like the layers'.

Checkpoints keep the single-process format: the full state is gathered to rank 0 (on the CPU) and written there
by the usual code; the optimizer state is written keyed by parameter name. The model is built whole on the
CPU of every process and then sharded onto the device: CPU memory must hold one copy per process.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from ..models.lm import decoder_layers

log = logging.getLogger(__name__)

# --fsdp mode (config.FSDP_MODES but none; RunConfig.validate refuses what FSDP cannot train) ->
# reshard_after_forward of the decoder layers
RESHARD = {"full": True, "grad-op": False}


def shard(root: nn.Module, lm: nn.Module, mode: str, device: torch.device) -> None:
    """Shard every decoder layer of ``lm`` and then ``root`` (the training step, holding the rest) in place.
    Parameters become DTensors on ``device``: build the optimizer afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reshard = RESHARD[mode]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = decoder_layers(lm, "--fsdp")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    # the root's parameters are needed again as soon as backward starts: FSDP keeps them gathered (None)
    fully_shard(root, mesh=mesh, reshard_after_forward=None if reshard else False)
    log.info("FSDP %s: %d decoder layers and the root sharded over %d processes", mode, len(layers),
             dist.get_world_size())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(root: nn.Module, prefix: str = "vlm.") -> dict[str, torch.Tensor]:
    """The trainable parameters and the buffers, gathered whole to rank 0's CPU (other ranks get ``{}``); keys
    without ``prefix``. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(root, options=_options(cpu_offload=True, ignore_frozen_params=True))
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def full_optimizer_state(root: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state gathered whole to rank 0's CPU, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(root, opt, options=_options(cpu_offload=True))


def _by_name(osd: dict) -> bool:
    return any(isinstance(p, str) for g in osd.get("param_groups", ()) for p in g["params"])


def load_optimizer_state(root: nn.Module, opt: torch.optim.Optimizer, osd: dict, sharded: bool) -> None:
    """Load a saved optimizer state into ``opt`` of a sharded or plain ``root``, whichever way it was saved:
    keyed by parameter name (by FSDP) or by position (``opt.state_dict()``, by DDP or one process)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not _by_name(osd):
        if not sharded:
            opt.load_state_dict(osd)
            return
        name = {id(p): n for n, p in root.named_parameters()}
        names = [name[id(p)] for g in opt.param_groups for p in g["params"]]
        osd = {"state": {names[i]: s for i, s in osd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(root, opt, osd, options=_options())
