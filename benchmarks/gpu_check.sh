#!/usr/bin/env bash
# The GPU check (issue 17): on one GPU, in about 8 minutes, writes gpu-check/report.json with
#   1. the tests marked `gpu` (pytest -m gpu),
#   2. a short bf16 training of the R-50 recipe (1 GPU, nccl; synthetic data, backbone weights none),
#   3. inference latency (batch 1) and throughput (batch 8) at 800x1333: eager fp32, bf16/fp16
#      autocast, channels_last, torch.compile, plus ONNX Runtime CUDA and TensorRT when installed
#      (benchmarks/gpu_check.py; each skipped with its reason when not).
# On a machine without a CUDA GPU it says so, runs what can run without one (nothing of the
# above needs less than a GPU, so only the environment report), and exits 0.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]        (PYTHON=... to choose the interpreter)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
step() { echo "== $*"; }

step "environment"
"$PY" - "$OUT/environment.json" <<'PYEOF'
import json, sys, platform
info = {"python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                nccl=torch.distributed.is_nccl_available())
except ImportError as err:
    info["torch"] = f"not installed: {err}"
for name in ("onnxruntime", "tensorrt"):
    try:
        module = __import__(name)
        info[name] = getattr(module, "__version__", "installed")
        if name == "onnxruntime":
            info["onnxruntime_providers"] = module.get_available_providers()
    except ImportError as err:
        info[name] = f"not installed ({err})"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PYEOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: this check needs a CUDA GPU and there is none here (torch.cuda.is_available() is False)."
    echo "gpu_check: skipped: gpu tests, R-50 bf16 training, GPU inference latency. Environment in $OUT/environment.json."
    "$PY" benchmarks/gpu_check.py --output "$OUT/inference.json" >/dev/null
    exit 0
fi

step "1/3 tests marked gpu"
timeout 150 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "pytest -m gpu exit code $? (log: $OUT/gpu-tests.log)"; tail -3 "$OUT/gpu-tests.log"

step "2/3 R-50 bf16 training, 1 GPU, nccl (synthetic data, 40 iterations)"
"$PY" -m training make-synthetic "$OUT/synthetic" --train 32 --val 8 --size 512 > /dev/null
timeout 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m training train \
    --config configs/coco-r50-1x.yaml --data "$OUT/synthetic" --output "$OUT/train-r50" --device cuda --no-eval --no-progress \
    model.backbone.weights=none model.num_classes=3 solver.amp=bf16 solver.batch_size=4 solver.max_iter=40 \
    solver.warmup_iters=10 "solver.steps=[30]" train.log_period=10 train.checkpoint_period=40 train.eval_period=1000 \
    > "$OUT/train.log" 2>&1
echo "training exit code $? (log: $OUT/train.log)"; tail -3 "$OUT/train.log"

step "3/3 inference latency and throughput at 800x1333"
timeout 240 "$PY" benchmarks/gpu_check.py --output "$OUT/inference.json"
echo "inference exit code $?"

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = {p.stem: json.loads(p.read_text()) for p in (out / "environment.json", out / "inference.json") if p.is_file()}
for name in ("gpu-tests.log", "train.log"):
    p = out / name
    report[name] = p.read_text().splitlines()[-5:] if p.is_file() else None
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out / 'report.json'}")
PYEOF
