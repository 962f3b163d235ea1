"""The Session on the GPU: ``Session.load`` picks ExLlamaV2 for a GPTQ folder, plans memory
for both models, generates with the small model mirroring, and ``close()`` gives the GPU
memory back. Run with the GPU suite (``bash bench/gpu_session.sh tests``)."""
from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # skipped without CUDA or exllamav2 (conftest.py)
MiB = 1024 ** 2


def gptq_folder(folder: Path) -> Path:
    """A random 4-layer Llama as a 4-bit GPTQ folder with the tokenizer of
    ``$MAX_JUPYTER_TOKENIZER`` (or the embedded model's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from max_jupyter.testing import write_gptq_rtn

    config = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=2048, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).half().cuda().eval()
    write_gptq_rtn(model, folder)
    copy_tokenizer(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def copy_tokenizer(folder: Path) -> None:
    """The tokenizer files of ``$MAX_JUPYTER_TOKENIZER`` (or the embedded model's) into ``folder``."""
    from max_jupyter.models import resolve_hf_folder

    tokenizer = Path(os.environ.get("MAX_JUPYTER_TOKENIZER") or resolve_hf_folder())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, folder / name)


def load_generate_close(folder: Path) -> tuple[int, int, int]:
    """One session: load both models, generate steered with the small one mirroring, close.
    Returns torch's allocated bytes while loaded and after close, and the free bytes after."""
    from max_jupyter import Session
    from max_jupyter.engines.exllamav2 import ExLlamaV2Engine
    from max_jupyter.errors import SessionClosedError
    from max_jupyter.steering import SteeringVector

    s = Session.load(folder, small="same", max_vram_gb=8, cache_tokens=1024, store=None,
                     progress=False)
    assert isinstance(s.big, ExLlamaV2Engine) and isinstance(s.small, ExLlamaV2Engine)
    assert s.plan is not None and s.plan.total <= 8 * 1024 ** 3
    s.mix.set("random", SteeringVector({2: torch.randn(512)}, s.big.identity, "random"), 4.0)
    r = s.generate("Hello there.", max_new_tokens=16, ignore_eos=True)
    assert len(r.token_ids) == 16 and r.small_ids[-16:] == r.token_ids
    assert r.steps[-1].live_coefs == {"random": 4.0}
    loaded = torch.cuda.memory_allocated()
    s.close()
    with pytest.raises(SessionClosedError):
        s.generate("again")
    torch.cuda.synchronize()
    return loaded, torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]


def test_session_on_exllamav2_and_close_gives_memory_back(tmp_path):
    folder = gptq_folder(tmp_path / "gptq")
    torch.cuda.synchronize()
    allocated0 = torch.cuda.memory_allocated()
    loaded, allocated1, free1 = load_generate_close(folder)
    # A second session: the CUDA context now holds every kernel both needed, so whatever
    # the first close gave back, the second must give back too, to the byte of free memory.
    _, allocated2, free2 = load_generate_close(folder)
    print(f"allocated: {allocated0 / MiB:.0f} MiB before, {loaded / MiB:.0f} loaded, "
          f"{allocated1 / MiB:.0f} / {allocated2 / MiB:.0f} after each close; "
          f"free after each close {free1 / MiB:.0f} / {free2 / MiB:.0f} MiB")
    assert loaded - allocated0 > 64 * MiB  # the models and caches were really on the GPU
    assert allocated1 - allocated0 < 16 * MiB and allocated2 - allocated0 < 16 * MiB
    assert free2 >= free1 - 16 * MiB


def test_devices_place_each_model_where_asked(tmp_path):
    """``Session.load(devices=...)`` on the transformers backend (an fp16 folder): with
    ``("cuda:0", "cuda:0")`` two engines, each with its weights, logits and captures on that
    GPU; with ``("cuda:0", "cpu")`` the small one on the CPU (which the default, CUDA where
    present, would not do); both generate steered with the small one mirroring, the tokens
    of ``device="cuda:0"``. (On two GPUs, ``("cuda:0", "cuda:1")`` splits them.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from max_jupyter import Session
    from max_jupyter.steering import SteeringVector

    folder = tmp_path / "fp16"
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).half().save_pretrained(folder)
    copy_tokenizer(folder)
    vector = torch.randn(256, generator=torch.Generator().manual_seed(1))

    def run(**placement) -> tuple[list[int], list[str]]:
        with Session.load(folder, small="same", store=None, progress=False, **placement) as s:
            assert s.big is not s.small
            s.mix.set("random", SteeringVector({2: vector}, s.big.identity, "random"), 0.5)
            r = s.generate("Hello there.", max_new_tokens=12, ignore_eos=True)
            assert r.small_ids[-12:] == r.token_ids  # the small model mirrored every token
            small_out = s.small.step(r.token_ids[-1], capture=[1])
            where = [str(p.device) for p in (next(s.big.model.parameters()), next(s.small.model.parameters()),
                                             small_out.logits, small_out.hidden[1])]
            return r.token_ids, where

    placed, where = run(devices=("cuda:0", "cuda:0"))
    assert where == ["cuda:0"] * 4, where
    split, where = run(devices=("cuda:0", "cpu"))
    assert where == ["cuda:0", "cpu", "cpu", "cpu"], where
    same, _ = run(device="cuda:0")
    assert placed == same == split  # the small model only mirrors: the big one's tokens
