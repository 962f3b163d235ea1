"""Batched decode on the ExLlamaV2 backend (GPU only): a ``DirectBatch`` of rows of
different lengths (one crossing the 256-position bucket), each with its own deltas and
captures, against transformers stepping each row alone on the same dequantised weights and
against the engine's own batch-1 steps; graphed after the first step of each shape; rows
leaving; ``Session.generate_batch`` on it. Random 4-layer GPTQ Llama of the parity tests.
Run with the GPU suite (``bash bench/gpu_session.sh tests tests/test_batch_gpu.py``).
"""
from __future__ import annotations

import pytest
import torch

from test_exllamav2_parity import (
    QUANT_REL,
    QUANT_TOP1,
    Parity,
    build_model,
    copy_tokenizer,
    load_exl,
    reference,
    tokenizer_folder,  # noqa: F401 (a fixture)
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # skipped without CUDA or exllamav2 (conftest.py)
HIDDEN, VOCAB = 512, 49152
LENGTHS = (3, 40, 250, 17, 1)  # prompt lengths; row 2 crosses the 256-position bucket


@pytest.fixture(scope="module")
def gptq(tmp_path_factory, tokenizer_folder):
    """(the ExLlamaV2 engine, the transformers reference on the dequantised weights)."""
    from max_jupyter.testing import write_gptq_rtn

    tmp = tmp_path_factory.mktemp("batch-gptq")
    model = build_model("LlamaForCausalLM", tmp / "fp16", tokenizer_folder)
    write_gptq_rtn(model, tmp / "gptq")
    copy_tokenizer(tokenizer_folder, tmp / "gptq")
    return load_exl(tmp / "gptq"), reference(model, tmp / "gptq")


def test_batch_rows_match_transformers_and_batch_1(gptq):
    exl, ref = gptq
    assert exl.supports_batch
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    deltas = [None if r % 2 else {1: (torch.randn(HIDDEN, generator=g) * 0.5).half().cuda()}
              for r in range(len(prompts))]
    deltas[2] = {1: deltas[0][1], 3: (torch.randn(HIDDEN, generator=g) * 0.3).half().cuda()}
    tokens = {r: torch.randint(0, VOCAB, (12,), generator=g).tolist() for r in range(len(prompts))}
    batch = {r: [o] for r, o in exl.prefill_batch(prompts, deltas, (1, 3), reserve=12).items()}
    for k in range(12):
        if k == 5:
            exl.drop_rows([1, 4])
        live = sorted(exl.batch_lengths)
        for r, o in exl.step_batch({r: tokens[r][k] for r in live}, {r: deltas[r] for r in live},
                                   (1, 3)).items():
            batch[r].append(o)
    assert sorted(exl.batch_lengths) == [0, 2, 3]
    assert any(key[0] == 512 for key in exl._batch.graphs), exl._batch.graphs.keys()  # row 2 crossed
    versus_ref, versus_single = Parity(), Parity()
    for r, prompt in enumerate(prompts):
        outs = batch[r]
        refs = [ref.prefill(prompt, deltas[r] and {l: d.float().cpu() for l, d in deltas[r].items()}, (1, 3))]
        singles = [exl.prefill(prompt, deltas[r], (1, 3))]
        for t in tokens[r][:len(outs) - 1]:
            refs.append(ref.step(t, deltas[r] and {l: d.float().cpu() for l, d in deltas[r].items()}, (1, 3)))
            singles.append(exl.step(t, deltas[r], (1, 3)))
        for out, want, single in zip(outs, refs, singles):
            versus_ref.add(_cpu(out), _cpu(want))
            versus_single.add(_cpu(out), _cpu(single))
    versus_ref.check("gptq batch rows vs transformers alone", QUANT_REL, QUANT_TOP1)
    versus_single.check("gptq batch rows vs the engine's batch-1 steps", QUANT_REL, QUANT_TOP1)
    exl.reset_batch()


def _cpu(out):
    return type(out)(out.logits.float().cpu(), {l: h.float().cpu() for l, h in out.hidden.items()})


def test_session_generate_batch_on_the_gpu(gptq):
    """Greedy rows as one batch against ``generate`` one by one: the same prefill (token 0
    always agrees); later tokens agree where the 4-bit kernels' low bits do not flip a
    near-tie of the random model (the share is printed)."""
    from max_jupyter.session import Session

    exl, _ = gptq
    session = Session(exl, vectors={})
    try:
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 30, 12, 60)]
        batch = session.generate_batch(prompts, max_new_tokens=16, ignore_eos=True, progress=False)
        alone = [session.generate(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
        same = sum(a == b for x, y in zip(batch, alone) for a, b in zip(x.token_ids, y.token_ids))
        print(f"\ngenerate_batch vs generate on the GPU: {same}/{16 * len(prompts)} tokens equal")
        assert all(x.token_ids[0] == y.token_ids[0] for x, y in zip(batch, alone))
        assert same >= 0.75 * 16 * len(prompts)
        assert exl.batch_lengths == {}
    finally:
        session.close()
