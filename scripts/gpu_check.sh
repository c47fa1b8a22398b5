#!/usr/bin/env bash
# The project's GPU check, in one call on a machine with one CUDA GPU:
#
#   bash scripts/gpu_check.sh OUT [PART ...]      (PARTs: tests plain launched bench; default all)
#
#   tests     the tests that run on CUDA when it is there (tests/test_cuda.py, the precision and
#             one-launched-process tests)
#   plain     `make compare-quick`'s experiment in one process with model.dtype bfloat16, timed
#   launched  each stage once more through the FSDP2 launch path with one process
#             (launch.always_launch: NCCL, wrap, shard, gather), run beside `tests`: sft, pairs,
#             reward, one DPO and one PPO run, each shortened (compare always runs in one process)
#   bench     `python -m benchmarks.run`: the GPU plan (89M and 308M GPT-2 shapes, bf16), ours
#             against TRL and our sampler against `generate`
#
# Every part has a time limit inside one overall deadline (GPU_CHECK_SECONDS, default 520), so a
# part that hangs leaves time for the rest (GPU_CHECK_DTYPE=float32 rehearses it on a CPU, where
# bf16 is emulated and slow); OUT/gpu-check.tar.gz holds every log and report, and is
# rewritten after each part. Runs from the repository root with the python that has torch
# (PYTHON, default python3); the project need not be installed. Where that python lacks datasets,
# vaderSentiment or trl, the wheels in `.whl/` are installed first, as the lent machines need.
set -u
OUT=${1:?usage: scripts/gpu_check.sh OUT [PART ...]}
shift
PARTS=${*:-tests plain launched bench}
PY=${PYTHON:-python3}
REPO=$PWD
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
LOGS=$WORK/logs
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-520}))
rm -rf "$WORK" && mkdir -p "$LOGS" "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if ! $PY -c "import datasets, vaderSentiment, trl" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    wheels=$(ls .whl/*.whl | grep -v pyarrow)
    # datasets needs pyarrow >= 24; the machine's own is kept when it is new enough
    $PY -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
        || wheels="$wheels $(ls .whl/pyarrow-*.whl 2>/dev/null)"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

collect() {
    tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
        --exclude='fixtures' --exclude='checkpoints' . 2>/dev/null
}

limit() {  # seconds a part may take: its cap, or what is left before the deadline
    local left=$((DEADLINE - SECONDS - 10))
    echo $((left < $1 ? (left > 0 ? left : 1) : $1))
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY - <<'EOF'
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("transformers", "accelerate", "datasets", "trl", "tokenizers", "pyarrow", "fsspec"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
EOF
} >"$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

# An experiment folder of its own (configs name runs/quick/...), every stage in bf16; EXTRA are
# --set overrides for every stage, KEEP the steps to run (all if empty), SHORT=short cuts each
# stage to a few steps.
experiment() {
    local name=$1 extra=$2 keep=$3 dir=$WORK/$1
    mkdir -p "$dir" && cp -r "$REPO/configs" "$dir/"
    $PY - "$dir/configs/experiment-quick.yaml" "$extra" "$keep" "$5" <<'EOF'
import os, sys, yaml
path, extra, keep = sys.argv[1], [s for s in sys.argv[2].split(",") if s], [s for s in sys.argv[3].split(",") if s]
short = {
    "sft": ["train.max_steps=40"],
    "pairs": ["num_train_prompts=128", "num_eval_prompts=32"],
    "reward": ["train.max_steps=10"],
    "dpo": ["train.max_steps=10", "train.save_every=5"],
    "ppo": ["train.max_steps=2", "train.save_every=1"],
} if sys.argv[4] == "short" else {}
config = yaml.safe_load(open(path))
config["steps"] = [step for step in config["steps"] if not keep or step["name"] in keep]
for step in config["steps"]:
    if step["stage"] != "compare":
        dtype = os.environ.get("GPU_CHECK_DTYPE", "bfloat16")
        step["set"] = [*step.get("set", []), f"model.dtype={dtype}", *extra, *short.get(step["stage"], [])]
yaml.safe_dump(config, open(path, "w"), sort_keys=False)
EOF
    local start=$SECONDS
    (cd "$dir" && timeout "$4" $PY -m pipeline.cli experiment configs/experiment-quick.yaml) >"$LOGS/$name.log" 2>&1
    local code=$?
    echo "$name: exit $code in $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
    cp "$dir/runs/quick/compare/report.md" "$LOGS/$name-report.md" 2>/dev/null
    for run in "$dir"/runs/quick/*/; do
        [ -f "$run/cost.json" ] && cp "$run/cost.json" "$LOGS/$name-$(basename "$run")-cost.json"
    done
    return $code
}

run_tests() {
    local start=$SECONDS
    timeout "$1" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_precision.py \
        tests/test_launch.py -k "not two_processes" >"$LOGS/tests.log" 2>&1
    echo "tests: exit $? in $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
}

for part in $PARTS; do
    case $part in
    plain) experiment plain "" "" "$(limit 180)" full ;;
    launched)  # beside the tests: neither is timed
        [[ " $PARTS " == *" tests "* ]] && run_tests "$(limit 150)" &
        experiment launched "launch.always_launch=true,launch.main_process_port=29611" "sft,pairs,reward,dpo-b0.1,ppo-kl0.05" "$(limit 150)" short
        wait
        ;;
    tests) [[ " $PARTS " == *" launched "* ]] || run_tests "$(limit 150)" ;;
    bench)
        start=$SECONDS
        timeout "$(limit 300)" $PY -m benchmarks.run --out "$WORK/bench" --fresh >"$LOGS/bench.log" 2>&1
        echo "bench: exit $? in $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
        ;;
    *) echo "unknown part: $part" >&2 ;;
    esac
    collect
done
nvidia-smi --query-gpu=memory.used --format=csv >>"$LOGS/env.txt" 2>&1
collect
cat "$LOGS/summary.txt"
tail -n 40 "$LOGS/bench.log" 2>/dev/null
