"""Interventions on the ExLlamaV2 backend (GPU only): ablation and clamp in the prefill (module
path), in the graphed decode steps (static buffers: new targets replay the same graph) and in
verify, held to the transformers backend on the dequantised weights within the 4-bit
kernels' arithmetic (as tests/test_exllamav2_parity.py holds plain steering).

Run on a GPU box: ``MAX_JUPYTER_REQUIRE_GPU=1 pytest -m gpu tests/test_interventions_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch

from max_jupyter.engines.intervention import Intervention
from test_exllamav2_parity import (
    QUANT_REL,
    build_model,
    copy_tokenizer,
    load_exl,
    reference,
    tokenizer_folder,  # noqa: F401 (a fixture)
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # skipped without CUDA or exllamav2 (conftest.py)
LAYER = 1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def projection_ratio(h: torch.Tensor, u: torch.Tensor, target: float = 0.0) -> float:
    """max over rows of |h.u - target| / |h|."""
    h = h.float()
    return float(((h @ u.to(h.device)) - target).abs().max() / h.norm(dim=-1).min())


def test_ablation_prefill_graphed_decode_and_verify(tmp_path, tokenizer_folder):
    from max_jupyter.testing import write_gptq_rtn

    model = build_model("LlamaForCausalLM", tmp_path / "fp16", tokenizer_folder)
    write_gptq_rtn(model, tmp_path / "gptq")
    copy_tokenizer(tokenizer_folder, tmp_path / "gptq")
    ref = reference(model, tmp_path / "gptq")
    exl = load_exl(tmp_path / "gptq")
    assert exl.quantised and exl.use_graphs and exl.supports_interventions
    ids = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    mean = exl.prefill(ids, capture=[LAYER]).hidden[LAYER].float().mean(0).cpu()
    u = mean / mean.norm()  # a direction the residual really has

    def ablate(target: float) -> dict:
        return {LAYER: Intervention(ablate=u[None], targets=torch.tensor([target]))}

    out = exl.prefill(ids, ablate(0.0), capture=[LAYER])  # the module path
    want = ref.prefill(ids, ablate(0.0), capture=[LAYER])
    assert projection_ratio(out.hidden[LAYER], u) <= 1e-3
    assert rel(out.logits, want.logits) <= QUANT_REL
    graphs, tokens = None, []
    for step, target in enumerate((0.0, 0.0, 2.5, 0.0, -1.0, 0.0, 2.5, 0.0)):  # the direct path, graphed
        token = int(out.logits.argmax())
        tokens.append(token)
        out = exl.step(token, ablate(target), capture=[LAYER])
        want = ref.step(token, ablate(target), capture=[LAYER])
        assert projection_ratio(out.hidden[LAYER], u, target) <= 1e-3, (step, target)
        assert rel(out.logits, want.logits) <= QUANT_REL, step
        if step == 1:
            graphs = len(exl._graphs)
    assert len(exl._graphs) == graphs  # new targets: the same graph replayed, none captured
    clamp = {LAYER: Intervention(add=0.5 * u.half(), clamp=u[None], low=torch.tensor([-0.5]),
                                 high=torch.tensor([0.5]))}
    out = exl.step(tokens[-1], clamp, capture=[LAYER])
    p = out.hidden[LAYER].float() @ u.to(out.hidden[LAYER].device)
    assert float(p.max()) <= 1.0 + 1e-2 * float(out.hidden[LAYER].float().norm())  # clamped, then +0.5
    same = ablate(0.0)  # one mapping at every step, as the steering loop passes it
    for target in (0.0, 3.0, -2.0):  # written in place between steps: the graph's buffers follow
        same[LAYER].targets.fill_(target)
        out = exl.step(tokens[-1], same, capture=[LAYER])
        assert projection_ratio(out.hidden[LAYER], u, target) <= 1e-3, target
        exl.rewind(1)
    draft = tokens[:4]
    verified = exl.verify(draft, ablate(0.0), capture=[LAYER])  # every fed position
    assert verified.hidden[LAYER].shape[0] == len(draft)
    assert projection_ratio(verified.hidden[LAYER], u) <= 1e-3
    exl.unload()


def test_fused_kernel_equals_torch_ops_and_replays_in_a_graph():
    """``intervention_kernel.apply_`` (one Triton launch) gives ``intervention.apply``'s rows
    within one fp16 rounding, for every combination of parts, also replayed in a CUDA graph
    with new values in its buffers; it is what the decode graphs above run."""
    from max_jupyter.engines.intervention import apply
    from max_jupyter.engines.intervention_kernel import _kernel, apply_

    assert _kernel() is not None, "Triton is missing: the decode graphs fall back to torch ops"
    g = torch.Generator().manual_seed(0)
    hidden = 3584

    def unit(k):
        u = torch.randn(k, hidden, generator=g)
        return (u / u.norm(dim=1, keepdim=True)).cuda()

    ops = [Intervention(ablate=unit(1), targets=torch.zeros(1, device="cuda")),
           Intervention(add=torch.randn(hidden, generator=g).half().cuda(), ablate=unit(2),
                        targets=torch.randn(2, generator=g).cuda(), clamp=unit(1),
                        low=torch.tensor([-1.0], device="cuda"), high=torch.tensor([1.0], device="cuda")),
           Intervention(clamp=unit(2), low=torch.tensor([-float("inf"), -0.5], device="cuda"),
                        high=torch.tensor([0.3, float("inf")], device="cuda"))]
    for op in ops:
        x = (torch.randn(5, hidden, generator=g) * 50).half().cuda()
        expected = apply(x, op).half()
        apply_(x, op)
        assert rel(x, expected) < 1e-3, op.label
    # The order, by projections on one direction u: ablate to 20, clamp to [-5, 5], add 30 u
    # -> 35 (add first: 5; clamp first: 50); two clamps in order: [0, 10] then [-20, -5] -> -5
    u = unit(1)
    x = (torch.randn(5, hidden, generator=g) * 50).half().cuda()
    apply_(x, Intervention(ablate=u, targets=torch.tensor([20.0], device="cuda"), clamp=u,
                           low=torch.tensor([-5.0], device="cuda"), high=torch.tensor([5.0], device="cuda"),
                           add=(30 * u[0]).half()))
    assert torch.allclose(x.float() @ u[0], torch.full((5,), 35.0, device="cuda"), atol=0.5)
    apply_(x, Intervention(clamp=torch.cat([u, u]), low=torch.tensor([0.0, -20.0], device="cuda"),
                           high=torch.tensor([10.0, -5.0], device="cuda")))
    assert torch.allclose(x.float() @ u[0], torch.full((5,), -5.0, device="cuda"), atol=0.5)
    # Directions that are a transposed view (an SVD's rows): the kernel must not read them as rows.
    basis = torch.linalg.qr(torch.randn(hidden, 2, generator=g))[0].cuda()  # [hidden, 2], orthonormal columns
    x = (torch.randn(5, hidden, generator=g) * 50).half().cuda()
    op = Intervention(ablate=basis.T, targets=torch.zeros(2, device="cuda"))
    expected = apply(x, op).half()
    apply_(x, op)
    assert rel(x, expected) < 1e-3 and projection_ratio(x, basis[:, 1]) < 1e-3
    op, x = ops[0], torch.zeros(5, hidden, dtype=torch.float16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_(x, op)
    for _ in range(3):
        x.copy_((torch.randn(5, hidden, generator=g) * 50).half())
        op.ablate.copy_(unit(1))
        expected = apply(x, op).half()
        graph.replay()
        assert rel(x, expected) < 1e-3
        assert projection_ratio(x, op.ablate[0]) < 1e-3
