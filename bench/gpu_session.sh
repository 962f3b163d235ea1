#!/usr/bin/env bash
# One call on a lent GPU box: install the carried wheels, load the prebuilt exllamav2
# extension (skips its ~2 min JIT build), run the GPU tests and/or the decode benchmark
# (or the speculative-decoding benchmark, which is not part of all).
# The GPU tests run gated (MAX_JUPYTER_REQUIRE_GPU=1): a missing CUDA, exllamav2 or
# tokenizer fails them instead of skipping them. Logs and gpu_decode.json go to $OUT (the
# device tool brings that folder back).
#   bash bench/gpu_session.sh tests|bench|all|speculative|batch|interventions|exl3|exl3-tests|exl3-bench|pool [more pytest args, e.g. extra test files]
# Carry: .gpu/whl (exllamav2 + missing deps), .gpu/ext (exllamav2_ext.so.xz), .gpu/tokenizer;
# for exl3 (the ExLlamaV3 tests, marker exl3, then bench/gpu_exl3.py) also .gpu/x3whl (exllamav3
# and its missing deps) and .gpu/ext3 (exllamav3_ext.so.xz); for pool (bench/pool_scaling.py on
# the box's CPUs: SessionPool on Ray) .gpu/ray (ray.tar.xz: Ray's wheel unpacked without its
# Java jars, RLlib and dashboard front end, under the 64 MiB carry; deps/: its dependencies'
# wheels) and .gpu/smollm2cfg (the embedded model's config and tokenizer: random weights).
# MAX_JUPYTER_COMMIT stamps the benchmark's JSON; default: git describe (the .git copied to the
# box can be stale: pass it from here).
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/max_jupyter_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 MAX_JUPYTER_REQUIRE_GPU=1
export MAX_JUPYTER_COMMIT=${MAX_JUPYTER_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl \
  $( [ "${what%-*}" = exl3 ] && echo .gpu/x3whl/*.whl ) || exit 1
mkdir -p /tmp/ext
[ -f .gpu/ext/exllamav2_ext.so.xz ] && xz -dc .gpu/ext/exllamav2_ext.so.xz > /tmp/ext/exllamav2_ext.so
[ "${what%-*}" = exl3 ] && xz -dc .gpu/ext3/exllamav3_ext.so.xz > /tmp/ext/exllamav3_ext.so
export PYTHONPATH=/tmp/ext:/tmp/site:$PWD
export MAX_JUPYTER_TOKENIZER=${MAX_JUPYTER_TOKENIZER:-$PWD/.gpu/tokenizer}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_exllamav2_parity.py tests/test_engine_contract.py tests/test_session_gpu.py tests/test_speculative_gpu.py tests/test_batch_gpu.py tests/test_interventions_gpu.py "$@" 2>&1 | tee "$OUT/tests.log" || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 bench/gpu_decode.py 2>&1 | tee "$OUT/bench.log" || rc=1
fi
if [ "${what%-*}" = exl3 ]; then  # exl3: tests then bench; exl3-tests or exl3-bench: one of them
  if [ "$what" != exl3-bench ]; then
    python3 -m pytest -s -q -p no:cacheprovider -k exllamav3 tests/test_exllamav3_gpu.py tests/test_exllamav3_plan.py tests/test_engine_contract.py "$@" 2>&1 | tee "$OUT/tests_exl3.log" || rc=1
  fi
  if [ "$what" != exl3-tests ]; then
    python3 bench/gpu_exl3.py 2>&1 | tee "$OUT/bench_exl3.log" || rc=1
  fi
fi
if [ "$what" = batch ]; then  # batched decode: its GPU tests and bench/gpu_batch.py (docs/batching.md)
  python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_batch_gpu.py "$@" 2>&1 | tee "$OUT/tests.log" || rc=1
  python3 bench/gpu_batch.py 2>&1 | tee "$OUT/batch.log" || rc=1
fi
if [ "$what" = interventions ]; then  # bench/gpu_interventions.py (docs/steering.md)
  python3 bench/gpu_interventions.py 2>&1 | tee "$OUT/interventions.log" || rc=1
fi
if [ "$what" = pool ]; then  # Ray and a random-weight SmolLM2-135M (fp32), then the scaling bench
  tar -C /tmp/site -xJf .gpu/ray/ray.tar.xz || exit 1
  missing=$(python3 -c "import importlib.util as u; print(' '.join(p for p, m in [('msgpack', 'msgpack'), ('click', 'click'), ('filelock', 'filelock'), ('jsonschema', 'jsonschema'), ('protobuf', 'google.protobuf'), ('pyyaml', 'yaml'), ('requests', 'requests'), ('packaging', 'packaging')] if u.find_spec(m) is None))")
  [ -z "$missing" ] || python3 -m pip install -q --no-index --find-links .gpu/ray/deps --target /tmp/site $missing || exit 1
  python3 -c "
import torch, transformers
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained('.gpu/smollm2cfg')
transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained('/tmp/smollm2')
transformers.AutoTokenizer.from_pretrained('.gpu/smollm2cfg').save_pretrained('/tmp/smollm2')" || exit 1
  python3 bench/pool_scaling.py --big /tmp/smollm2 --actors 1,2,4,8 "$@" 2>&1 | tee "$OUT/pool.log" || rc=1
fi
if [ "$what" = speculative ]; then
  python3 bench/gpu_speculative.py 2>&1 | tee "$OUT/speculative.log" || rc=1
fi
exit $rc
