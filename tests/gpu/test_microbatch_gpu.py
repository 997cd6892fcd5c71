"""Two micro-batches on a real GPU: the split call's transport work runs on the comm stream and its
experts on the caller's stream; interleaved split calls equal plain calls (local transport, shared
experts on the side stream, fp32 and bf16); the LM with overlap_microbatches=2 equals the sequential
one (logits, loss, every gradient); and the nvshmem transport with 1 and 2 PEs sharing the GPU
(tests/gpu/microbatch_worker.py under torchrun; time-sliced, so small shapes).

Legend: B batch rows, S sequence, T tokens, H hidden.
"""

import dataclasses

import pytest
import torch

from moe_dist import MoEConfig, MoELayer
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.transport import nvshmem_unavailable_reason

from .torchrun_pes import run_worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = MoEConfig(
    hidden_size=64,
    ffn_hidden_size=128,
    num_experts=16,
    top_k=4,
    num_shared_experts=1,
    router_bias_update_rate=0.0,
    z_loss_coef=1e-3,
)


def close(got, want, label, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")
    else:  # bf16 sums in another order: relative norm error
        rel = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
        assert rel < 1e-2, f"{label}: relative error {rel:.3g}"


@pytest.mark.parametrize(
    "dtype,fused", [(torch.float32, None), (torch.bfloat16, False), (torch.bfloat16, None)]
)
def test_split_calls_equal_plain_calls_and_use_the_comm_stream(dtype, fused):
    """fused=None: the local transport's default (bf16 on CUDA takes the fused path, which makes
    dispatch, experts and combine in run_experts); False: the plain path, dispatch in start."""
    torch.manual_seed(0)
    plain = MoELayer(CFG, device="cuda", dtype=dtype)
    torch.manual_seed(0)
    split = MoELayer(CFG, device="cuda", dtype=dtype)
    plain.transport.fused = split.transport.fused = fused
    one_go = split.transport.use_fused(
        torch.empty(1, 64, device="cuda", dtype=dtype), split.experts
    )
    seen = {}
    dispatch, combine = split.transport.dispatch, split.transport.combine

    def probe(name, fn):
        def wrapped(*a, **kw):
            seen.setdefault(name, set()).add(torch.cuda.current_stream())
            return fn(*a, **kw)

        return wrapped

    split.transport.dispatch = probe("dispatch", dispatch)
    split.transport.combine = probe("combine", combine)
    split.experts.forward = probe("experts", split.experts.forward)
    for step in range(2):  # the second step reuses memory the first freed across streams
        xs = [torch.randn(t, 64, device="cuda", dtype=dtype) for t in (301, 0, 77)]
        gs = [torch.randn(x.shape, device="cuda") for x in xs]
        results = []
        for layer, is_split in ((split, True), (plain, False)):
            layer.zero_grad()
            inputs = [x.clone().requires_grad_(True) for x in xs]
            if is_split:
                calls = [layer.start(x) for x in inputs]
                if one_go:  # nothing travels before run_experts
                    assert all(call.flight is None for call in calls)
                else:
                    assert isinstance(calls[0].flight.dispatched, torch.cuda.Event)
                for call in calls:
                    layer.run_experts(call)
                outs = [layer.finish(call) for call in calls]
            else:
                outs = [layer(x) for x in inputs]
            loss = sum((o.output.float() * g).sum() + o.aux_loss for o, g in zip(outs, gs))
            loss.backward()
            grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
            results.append(([o.output for o in outs], [x.grad for x in inputs], grads))
        (go, gx, gg), (wo, wx, wg) = results
        for i in range(len(xs)):
            close(go[i], wo[i], f"{dtype} step {step} output {i}", dtype)
            close(gx[i], wx[i], f"{dtype} step {step} grad x {i}", dtype)
        for n in wg:
            close(gg[n], wg[n], f"{dtype} step {step} grad {n}", dtype)
    if one_go:  # the fused kernels replace the transport's dispatch, experts and combine
        assert dtype == torch.bfloat16 and fused is None
        assert "dispatch" not in seen, seen
        return
    device = torch.device("cuda", torch.cuda.current_device())
    assert seen["dispatch"] == seen["combine"] == {split.streams.comm(device)}, seen
    assert seen["experts"] == {torch.cuda.current_stream()}, seen


@pytest.mark.parametrize("dtype,batch", [(torch.float32, 5), (torch.bfloat16, 8)])
def test_lm_overlapped_equals_sequential(dtype, batch):
    lm = ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
    runs = []
    for overlap in (1, 2):
        torch.manual_seed(0)
        model = MoETransformer(
            dataclasses.replace(lm, overlap_microbatches=overlap), CFG, device="cuda", dtype=dtype
        )
        tokens = torch.randint(
            0,
            256,
            (batch, lm.max_seq_len + 1),
            device="cuda",
            generator=torch.Generator("cuda").manual_seed(1),
        )
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out, grads))
    (got, gg), (want, wg) = runs[1], runs[0]
    close(got.logits, want.logits, f"{dtype} logits", dtype)
    close(got.loss.reshape(1), want.loss.reshape(1), f"{dtype} loss", dtype)
    assert gg.keys() == wg.keys()
    for n in wg:
        close(gg[n], wg[n], f"{dtype} grad {n}", dtype)


nv_reason = nvshmem_unavailable_reason(
    torch.device("cuda", 0) if torch.cuda.is_available() else None
)


@pytest.mark.skipif(nv_reason is not None, reason=f"nvshmem transport cannot run here: {nv_reason}")
@pytest.mark.parametrize("pes", [1, 2])
def test_nvshmem_split_calls_equal_plain_calls(pes):
    run_worker("microbatch_worker.py", pes, f"MICROBATCH WORKER OK {pes}")
