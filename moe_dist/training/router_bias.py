"""The aux-loss-free router bias (DeepSeek-V3), updated once per optimizer step, outside the model.

The forward of a sigmoid router only reads `expert_bias` and adds its slots per expert to the
router's device buffer `load_E` (not during an activation-checkpoint recompute, so the count is
exact). Here, once per optimizer step: the loads of every such router are summed over the ranks that
share the routers (the data-parallel group: every rank holds the same routers, whatever its EP
rank), each bias moves by rate * sign(mean load - load), and the buffers are cleared. Under gradient
accumulation the load is that of all micro-batches since the last step. torchtitan runs the same
update in an optimizer-step pre-hook, so the model's forward (and its recompute) stays pure.

    bias = RouterBiasUpdater(model, groups)
    bias.attach(optimizer)    # torch optimizers: runs before every optimizer.step()
    ...or bias.step()         # an explicit call (the DeepSpeed engine built by training.deepspeed
                              # makes it at each gradient-accumulation boundary)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.parallel.groups import all_reduce_sum
from moe_dist.routing import Router


class RouterBiasUpdater:
    """The bias update of every learning router in `model` (router="sigmoid" with a nonzero
    router_bias_update_rate; others are left alone). `groups`: the ParallelGroups the model was
    built with; the load is summed over groups.dp_group. None: one process, no reduction (or pass
    the `group` to sum over)."""

    def __init__(self, model: nn.Module, groups=None, *, group: dist.ProcessGroup | None = None):
        self.routers = [m for m in model.modules() if isinstance(m, Router) and m.updates_bias]
        self.group = group if group is not None else (None if groups is None else groups.dp_group)
        self._hook = None

    @torch.no_grad()
    def step(self) -> None:
        """One bias update from the load recorded since the last one (collective over the group:
        every rank calls it at the same step). One all_reduce for all routers."""
        if not self.routers:
            return
        loads = [r.load_E for r in self.routers]
        total = all_reduce_sum(torch.cat(loads), self.group)
        for router, load_E in zip(self.routers, total.split([t.numel() for t in loads])):
            router.update_bias(load_E)

    def attach(self, optimizer: torch.optim.Optimizer) -> "RouterBiasUpdater":
        """Runs `step()` before every `optimizer.step()` (a step pre-hook). Returns self."""
        if self._hook is not None:
            raise RuntimeError("this RouterBiasUpdater is already attached to an optimizer")
        self._hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
