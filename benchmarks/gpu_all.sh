#!/usr/bin/env bash
# Every GPU measurement in one run (<= 10 minutes on one lent GPU: the step limits add up to 600 s), CSVs with GPU name, versions and commit:
#   make bench-gpu                               # = benchmarks/gpu_all.sh
#   benchmarks/gpu_all.sh [--wheels DIR] [--out DIR]
#   benchmarks/gpu_all.sh --dry-run --out /tmp/b   # CPU, tiny shapes, no speed claims: CI keeps it from rotting
#
# Steps (each under its own time limit, so one slow step cannot eat the budget):
#   1. the gpu-marked tests (pytest -m gpu; dry run: collected only)
#   2. benchmarks/kernels.py     RMSNorm, rotary, SwiGLU, FlashAttention fwd/bwd vs eager, torch.compile,
#                                F.rms_norm, SDPA, Liger if installed
#   3. benchmarks/throughput.py  LLaMA-7B layer stack: tokens/s and MFU, our kernels vs SDPA (+ compile)
#   4. benchmarks/generation.py  generation tokens/s (KV cache vs Hugging Face vs no cache)
#   5. benchmarks/attention_spills.py  n_regs / n_spills of every FlashAttention config (head_dim 64, 128)
#   6. benchmarks/layer_traffic.py     per-op launches and bytes of a decoder layer under bf16 autocast
#                                      (docs/kernels.md "First GPU run" lists what to compare)
# Python packages missing on the GPU machine are installed offline from the wheels that
# ../shared/tools/gpu-wheels.sh fetched into DIR (default .gpu-wheels; carry it to the device run).
# No GPU, or a missing package without its wheel: stop at once with what to do.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
WHEELS=${WHEELS:-.gpu-wheels}
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
fail() { echo "gpu_all.sh: $*" >&2; exit 2; }
step() { echo; echo "== [$(date +%H:%M:%S)] $*"; }

# The pip packages whose modules are not importable here (one interpreter start, no heavy imports).
read -r -a missing <<< "$("$PYTHON" -c '
import importlib.util as u
need = {"yaml": "pyyaml", "sentencepiece": "sentencepiece", "safetensors": "safetensors", "pynvml": "nvidia-ml-py",
        "tqdm": "tqdm", "megatron.core": "megatron-core"}
def found(m):
    try:
        return u.find_spec(m) is not None
    except ImportError:
        return False
print(" ".join(pkg for mod, pkg in need.items() if not found(mod)))
')"

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  [[ ${#missing[@]} -eq 0 ]] || fail "missing Python packages: ${missing[*]} (pip install -e '.[dev]')"
  DEVICE_NOTE="dry run on CPU: tiny shapes, no speed claims"
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || fail "no CUDA GPU is visible to torch (torch.cuda.is_available() is False); use --dry-run on a CPU machine"  # device-ok
  if [[ ${#missing[@]} -gt 0 ]]; then
    [[ -d $WHEELS ]] || fail "missing Python packages: ${missing[*]} and no wheel folder $WHEELS; on a machine with internet run ../shared/tools/gpu-wheels.sh $WHEELS and carry that folder here (or pass --wheels DIR)"
    step "installing ${missing[*]} from $WHEELS (offline)"
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}" \
      || fail "could not install ${missing[*]} from $WHEELS: fetch them again with ../shared/tools/gpu-wheels.sh $WHEELS ${missing[*]}"
  fi
  "$PYTHON" -c "import megatron_jinpan" 2>/dev/null || "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation \
    || fail "could not install this repository (pip install -e . --no-deps)"
  DEVICE_NOTE=$("$PYTHON" -c "from megatron_jinpan.perf.metadata import hardware; print(hardware())")
fi
echo "gpu_all.sh: $DEVICE_NOTE; CSVs -> $OUT"

status=0
run() {  # run LIMIT_S NAME CMD...: a failing or overrunning step is reported, the others still run
  local limit=$1 name=$2; shift 2
  step "$name"
  if ! timeout "$limit" "$@"; then
    echo "gpu_all.sh: step '$name' failed or ran past ${limit}s" >&2
    status=1
  fi
}

if [[ $DRY == 1 ]]; then
  mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
  run 120 "gpu tests (collected)" "$PYTHON" -m pytest -q -m gpu --collect-only -p no:cacheprovider "${gpu_tests[@]}"
  run 120 "kernels" "$PYTHON" benchmarks/kernels.py --smoke --ops rmsnorm --out "$OUT"
  run 120 "throughput" "$PYTHON" benchmarks/throughput.py --smoke --variants eager_sdpa --iters 1 --warmup 0 --out "$OUT"
  run 120 "generation" "$PYTHON" benchmarks/generation.py --model debug --batch 1 --new-tokens 4 --repeats 1 \
    --out "$OUT/generation_dry_run.csv"
  run 120 "layer traffic" "$PYTHON" benchmarks/layer_traffic.py --model debug --backends torch --label dry_run \
    --out "$OUT/layer_traffic_dry_run.csv"
else
  run 150 "gpu tests" env JINPAN_GPU_TESTS=1 "$PYTHON" -m pytest -q -m gpu tests
  run 150 "kernels" "$PYTHON" benchmarks/kernels.py --out "$OUT"
  run 120 "throughput" "$PYTHON" benchmarks/throughput.py --out "$OUT"
  run 60 "generation" "$PYTHON" benchmarks/generation.py --model small --dtype bf16 --batch 8 --new-tokens 256 \
    --device auto --out "$OUT/generation_gpu.csv"
  run 60 "attention spills" "$PYTHON" benchmarks/attention_spills.py --out "$OUT/attention_spills_gpu.csv"
  run 60 "layer traffic" "$PYTHON" benchmarks/layer_traffic.py --device cuda --label gpu --out "$OUT/layer_traffic_gpu.csv"
fi
step "done (status $status); CSVs in $OUT"
ls -1 "$OUT"/*.csv 2>/dev/null | sed 's/^/  /'
exit $status
