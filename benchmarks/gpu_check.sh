#!/usr/bin/env bash
# One-call check on a CUDA machine (no install: uses its python3 with torch + src/ on the path).
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # STAGE=core: fits one 10-minute call
#   OUT=/tmp/gpu STAGE=compile bash benchmarks/gpu_check.sh   # eager vs torch.compile rows
# core: 1) the CUDA cases of the test suite (gated BN vs float64, autocast fp16/bf16, fast ==
# dual path and device subsets, the Triton kernels vs eager, recompute_pretrained, torchrun with
# two ranks on the GPU; 150 s); 2) benchmarks/speed.py on the GPU: memory, training (each row
# also with the kernels off) and CUDA-graph rows in that order (200 s), and eval (80 s), as two
# calls, rows saved as they finish; 3) launches per training step (launch_count.py, 40 s); 4) the eval rows with the
# Triton kernels off (80 s). 550 s in all. Logs and result files go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/adafilter-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
status=0
if [ "${STAGE:-core}" = compile ]; then
  # eager vs torch.compile (default and reduce-overhead = CUDA graphs), graph breaks (issue 14)
  timeout 540 python3 benchmarks/speed.py --device cuda --only compile --reps "${REPS:-20}" \
    > "$OUT/speed-compile.log" 2>&1 || status=1
  tail -5 "$OUT/speed-compile.log"
  cp benchmarks/results/speed-cuda-compile.json "$OUT/" 2>/dev/null
  exit $status
fi
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_devices.py \
  "tests/integration/test_distributed.py::test_torchrun_two_processes[cuda]" \
  tests/unit/test_kernels.py::test_kernels_match_eager_on_cuda tests/unit/test_recompute.py 2>&1 | tee "$OUT/pytest.log" | tail -15 || status=1
# speed.py in two calls, each with its own file: a timeout in one keeps the other's figures
timeout 200 python3 benchmarks/speed.py --device cuda --only train,graphs,memory \
  --reps "${REPS:-15}" > "$OUT/speed.log" 2>&1 || status=1
tail -3 "$OUT/speed.log"
timeout 80 python3 benchmarks/speed.py --device cuda --only eval1,eval32 --reps "${REPS:-15}" \
  --out speed-cuda-eval.json > "$OUT/speed-eval.log" 2>&1 || status=1
timeout 40 python3 benchmarks/launch_count.py --device cuda --out "$OUT/launch-count-cuda.json" \
  > "$OUT/launch-count.log" 2>&1 || status=1
# the eval rows again with the Triton kernels off: A/B of the gated-BN and gate-step kernels
ADAFILTER_TRITON=0 timeout 80 python3 benchmarks/speed.py --device cuda --only eval1,eval32 \
  --reps "${REPS:-15}" --out speed-cuda-no-triton.json > "$OUT/speed-no-triton.log" 2>&1 || status=1
for f in speed-cuda.json speed-cuda-eval.json speed-cuda-no-triton.json; do
  cp "benchmarks/results/$f" "$OUT/" 2>/dev/null
done
python3 - "$OUT/speed-cuda.json" "$OUT/speed-cuda-eval.json" <<'PY' || status=1
import json, sys
r = {}
for path in sys.argv[1:]:
    try:
        part = json.load(open(path))
    except OSError as exc:
        print(f"missing {path}: {exc}")
        continue
    if not part.get("complete"):
        print(f"{path}: cut short (rows written before the time limit)")
    r.update(part)
for t in r.get("train", []):
    rc = f" (recompute {t['ratio_recompute']:.2f}x)" if "ratio_recompute" in t else ""
    nt = f" (kernels off {t['ratio_no_triton']:.2f}x)" if "ratio_no_triton" in t else ""
    if "ratio_eager_gate" in t:
        nt += f" (gate kernels off {t['ratio_eager_gate']:.2f}x)"
    print(f"train {t['arch']}@{t['resolution']} b{t['batch']} {t['autocast']} {t['policy']}: "
          f"{t['ratio']:.2f}x{rc}{nt}")
for t in r.get("train_cuda_graphs", []):
    print(f"cuda graphs {t.get('arch')} {t.get('policy')}: {t.get('ratio', t.get('error'))}")
for m in r.get("memory", []):
    print(f"memory {m['arch']} b{m['batch']}: {m['ratio']:.2f}x "
          f"(recompute {m['ratio_recompute']:.2f}x)")
if "eval_batch1" in r:
    e = r["eval_batch1"]
    print(f"eval b1: fast {e['fast_vs_plain']:.2f}x dual {e['dual_vs_plain']:.2f}x")
for e in r.get("eval_batch32", []):
    sub = e.get("subsets_vs_plain", float("nan"))
    print(f"eval b32 {e['policy']}: fast {e['fast_vs_plain']:.2f}x dual {e['dual_vs_plain']:.2f}x "
          f"subsets {sub:.2f}x")
PY
exit $status
