"""Chain-of-Experts (Wang et al., "Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models", arXiv 2506.18945): inside one layer, tokens pass through the *same*
experts `iterations` times, re-routed before each pass by that iteration's *own* router, with a
residual between passes:

    x_0 = x
    x_t = x_{t-1} + sum_k g_{t,k} E_{i_{t,k}}(x_{t-1})  [+ shared(x_{t-1})]      t = 1..C
          (g_t, i_t: top-k of router t on x_{t-1}; experts E and shared experts are one set for all
          t)
    output = x_C - x_0            (the layer's update: a transformer block adds x itself, so its
                                   residual stream carries x_C, the paper's y; return_state=True
                                   gives x_C)

Every pass goes through the one MoELayer's transport and experts, so at EP > 1 a token may visit
experts on several ranks across the chain. Compute per token is C x top_k expert FFNs: CoE with C=2,
top_k=k matches a plain MoE layer with top_k=2k.

aux_loss sums each router's load-balancing (and z) loss; tokens_per_expert sums the slots of all
passes. With iterations=1 the layer is exactly a MoELayer.

Legend: T tokens on this rank, H hidden, E experts, C iterations.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer, MoEOutput
from moe_dist.routing import Router


class ChainOfExperts(nn.Module):
    """Drop-in for MoELayer (same call, same MoEOutput) with `iterations` routed passes.

    Parameters: `moe` holds the experts, shared experts, transport and the router of the first pass
    (its initialisation is MoELayer's, so EP-invariant); `routers[t-1]` routes pass t+1, drawn from
    the global RNG after the MoELayer, hence identical on every rank under one seed. Each pass is
    one MoELayer.routed_pass (shared experts and chunking included).
    """

    def __init__(
        self,
        cfg: MoEConfig,
        groups=None,
        iterations: int = 2,
        *,
        return_state: bool = False,
        name: str = "coe",
        device=None,
        dtype=None,
        **layer_options,
    ):
        super().__init__()
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        self.iterations, self.return_state, self.name = iterations, return_state, name
        self.moe = MoELayer(cfg, groups, name=name, device=device, dtype=dtype, **layer_options)
        self.routers = nn.ModuleList(
            Router(cfg, device=device, dtype=dtype) for _ in range(iterations - 1)
        )

    @property
    def cfg(self) -> MoEConfig:
        return self.moe.cfg

    def router_of(self, t: int) -> Router:
        return self.moe.router if t == 0 else self.routers[t - 1]

    def forward(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.cfg
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"input hidden size ({x.shape[-1]}) does not match MoEConfig.hidden_size "
                f"({cfg.hidden_size}) in Chain-of-Experts layer '{self.name}'"
            )
        x_TH = x.reshape(-1, x.shape[-1])
        h_TH, update_TH, aux, counts_E = x_TH, None, None, None
        for t in range(self.iterations):
            # One routed pass of the shared MoELayer (its experts, shared experts, transport and
            # chunking) with router t: finiteness check and load recording included.
            u_TH, plan = self.moe.routed_pass(h_TH, router=self.router_of(t))
            update_TH = u_TH if update_TH is None else update_TH + u_TH
            h_TH = h_TH + u_TH  # the inner residual: pass t+1 routes and computes on x_t
            aux = plan.aux_loss if aux is None else aux + plan.aux_loss
            counts_E = (
                plan.tokens_per_expert_E
                if counts_E is None
                else counts_E + plan.tokens_per_expert_E
            )
        self.moe.finish_step()
        out_TH = h_TH if self.return_state else update_TH
        return MoEOutput(out_TH.view(x.shape), aux, counts_E)

    def check_errors(self) -> None:
        self.moe.check_errors()

    def add_observer(self, fn) -> None:
        self.moe.add_observer(fn)

    def remove_observer(self, fn) -> None:
        self.moe.remove_observer(fn)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, return_state={self.return_state}"


def build_moe_layer(
    cfg: MoEConfig,
    groups=None,
    *,
    iterations: int = 1,
    name: str = "moe",
    device=None,
    dtype=None,
    **layer_options,
) -> nn.Module:
    """What a model or trainer calls to get its MoE FFN: a MoELayer, or a ChainOfExperts when
    iterations > 1. Both take x and return MoEOutput. `layer_options` go to MoELayer (transport,
    transport_options, streams)."""
    if iterations == 1:
        return MoELayer(cfg, groups, name=name, device=device, dtype=dtype, **layer_options)
    return ChainOfExperts(
        cfg, groups, iterations, name=name, device=device, dtype=dtype, **layer_options
    )
