#!/usr/bin/env bash
# The GPU checks of device.cuda_graphs and the CIFAR-10 reproduction, as ONE command for a device session (one H200,
# at most 10 minutes a command): everything it writes that matters lands in $OUT (8 files, the device tool's
# limit: the log, test_cuda.log, five bench.json, and reproduce_runs.tar.gz with each reproduction's table.md).
#
# Before the session, on the development machine (fills the git-ignored data/):
#   scripts/gpu_check.sh prepare     # data/cifar10-jpg.tar.gz (the JPEGs) and data/pydeps (hydra, omegaconf, antlr4,
#                                    # torch-pruning: the device image has torch but not these pure-Python packages)
# In the session (the device tool's run):
#   command: scripts/gpu_check.sh    carry: ["data/cifar10-jpg.tar.gz", "data/pydeps"]    timeout_s: 600
#
# What it runs, each step under `timeout` within GPU_CHECK_SECONDS (default 560, to end inside one 600 s command):
#   a. pytest tests/test_cuda.py (graphs vs eager metrics for train, kd and a fused group; fp16 + GradScaler captured)
#   b. distill bench resnet32x4 -> resnet8x4, bf16, batch 64, on the CIFAR-10 JPEGs, device.cuda_graphs=true, then false
#   c. distill bench fused=6 (the T x alpha sweep: one job after another vs fused, the students one after another or on
#      their own CUDA streams, vs stacked), cuda_graphs=true
#   d. scripts/reproduce_cifar10.sh at the epoch count the minutes left allow: first the whole of it at 1 epoch (d0),
#      timed, to size it; then the run, its table beside torchdistill's numbers (the table says which count ran)
#   e. distill bench loss=dkd and loss=crd with cuda_graphs=true (DKD reads the epoch; CRD draws inside the graph)
#
# A rehearsal of the plumbing where there is no GPU (every step, every file in $OUT; the figures mean nothing):
#   DEVICE=cpu GRAPHS=auto BENCH_STEPS=2 BENCH_REPEATS=1 EPOCHS=1 SEEDS="0 1" CIFAR10_ROOT=<a small JPEG tree> \
#       GPU_CHECK_SECONDS=1500 scripts/gpu_check.sh
# Settings (environment): STEPS (abced: which steps run, in that order; d last takes the minutes left), DEVICE (cuda), GRAPHS (the bench's device.cuda_graphs,
# true), BENCH_STEPS (30), BENCH_REPEATS (3), EPOCHS (default: what the minutes left allow, timed by step d0),
# CIFAR10_ROOT (default: data/cifar10, unpacked from data/cifar10-jpg.tar.gz), GPU_CHECK_SECONDS, SECONDS_PER_EPOCH
# (step d0's fallback, 10), and SEEDS and SIDE_BY_SIDE for the reproduction (scripts/reproduce_cifar10.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == prepare ]]; then
    set -e
    mkdir -p data/pydeps
    tarball=${CIFAR10_TARBALL:-/work/shared/data/cifar10-jpg.tar.gz}
    [[ -f data/cifar10-jpg.tar.gz ]] || cp "$tarball" data/cifar10-jpg.tar.gz
    site=$("${PYTHON:-python3}" -c 'import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))')
    for package in hydra omegaconf antlr4 torch_pruning; do
        rm -rf "data/pydeps/$package"
        cp -r "$site/$package" data/pydeps/
    done
    find data/pydeps -name __pycache__ -prune -exec rm -rf {} +
    du -sh data/cifar10-jpg.tar.gz data/pydeps
    exit 0
fi

out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
budget=${GPU_CHECK_SECONDS:-560}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
within() {  # seconds for the next step: at most $1, and never past the budget (10 s kept for copying results)
    local room=$(($(left) - 10))
    echo $((room < $1 ? (room > 1 ? room : 1) : $1))
}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/data/pydeps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
distill=("$python" -m distill_cli)

device=${DEVICE:-cuda}
graphs=${GRAPHS:-true}
echo "== machine"
nvidia-smi -L
echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
"$python" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'

echo "== data"
root=${CIFAR10_ROOT:-data/cifar10}
if [[ ! -d $root/train ]]; then
    mkdir -p "$root"
    tar -xzf data/cifar10-jpg.tar.gz -C "$root"
fi
ls "$root"

step_a() {
    echo "== a. tests/test_cuda.py ($(left) s left)"
    timeout "$(within 170)" "$python" -m pytest -q tests/test_cuda.py -p no:cacheprovider --durations=10 > "$out/test_cuda.log" 2>&1
    echo "pytest exit $?"; tail -n 15 "$out/test_cuda.log"
}

bench=(bench teacher=resnet32x4 student=resnet8x4 dataset=imagefolder "dataset.root=$root" "device=$device" device.precision=bf16
    batch_size=64 reference_workers=8 "steps=${BENCH_STEPS:-30}" "repeats=${BENCH_REPEATS:-3}")
bench_step() {  # $1: the step's line; one distill bench with the overrides after $4, for at most $3 s, into
    # outputs/gpu_bench_$2, its bench.json copied to $OUT/$4
    local label=$1 dir=outputs/gpu_bench_$2 seconds=$3 json=$4
    shift 4
    echo "== $label ($(left) s left)"
    timeout "$(within "$seconds")" "${distill[@]}" "${bench[@]}" "$@" "hydra.run.dir=$dir"
    echo "exit $?"
    cp "$dir/bench.json" "$out/$json"
}
step_b() {
    for setting in "$graphs" false; do
        bench_step "b. distill bench, cuda_graphs=$setting" "$setting" 80 "bench_graphs_$setting.json" "device.cuda_graphs=$setting"
    done
}
step_c() {
    bench_step "c. distill bench fused=6, cuda_graphs=$graphs" fused6 150 bench_fused6.json fused=6 "device.cuda_graphs=$graphs"
}
step_e() {  # the captured kd step of two more methods: DKD reads the epoch, CRD draws negatives inside the graph
    for loss in dkd crd; do
        bench_step "e. distill bench loss=$loss, cuda_graphs=$graphs" "$loss" 60 "bench_$loss.json" "loss=$loss" "device.cuda_graphs=$graphs"
    done
}

reproduce() {  # reproduce_cifar10.sh into outputs/$1 at $2 epochs, for at most $3 seconds; its table into the log
    rm -rf "outputs/$1"
    EPOCHS=$2 CIFAR10_ROOT=$root OUT_DIR=outputs/$1 DISTILL="$python -m distill_cli" PYTHON="$python" \
        timeout "$3" scripts/reproduce_cifar10.sh -- "device=$device"
    echo "exit $?"
    EPOCHS=$2 OUT_DIR=outputs/$1 PYTHON="$python" scripts/reproduce_cifar10.sh --table  # the runs that finished (to the log)
}
step_d() {
    local epochs=${EPOCHS:-}
    if [[ -z $epochs ]]; then
        # The whole reproduction at 1 epoch: its wall time less each step's epoch (the slowest run's where the runs go
        # side by side, all of them added up with SIDE_BY_SIDE=0) is what starting the runs costs; what is left, over
        # both steps' epochs (+20% for evaluation), sets the epoch count.
        echo "== d0. scripts/reproduce_cifar10.sh at 1 epoch, to time an epoch ($(left) s left)"
        probe_start=$(date +%s)
        reproduce reproduce_probe 1 "$(within 240)"
        probe=$(($(date +%s) - probe_start))
        per_epoch=$("$python" - outputs/reproduce_probe "${SIDE_BY_SIDE:-1}" <<'EOF'
import json, sys
from pathlib import Path

out, side_by_side = Path(sys.argv[1]), sys.argv[2] == "1"
def step(pattern):  # one epoch of a step (s): the slowest run's when they run side by side, else all of theirs
    seconds = [json.loads(line)["seconds"] for path in out.glob(pattern) for line in path.read_text().splitlines()]
    return max(seconds, default=0) if side_by_side else sum(seconds)
print(round(step("resnet*/metrics.jsonl") + step("kd*/metrics.jsonl")))
EOF
)
        per_epoch=$((per_epoch > 0 ? per_epoch : 2 * ${SECONDS_PER_EPOCH:-10}))
        epochs=$(( ($(left) - 30 - (probe - per_epoch)) * 10 / (12 * per_epoch) ))
        epochs=$((epochs < 1 ? 1 : epochs))
        echo "probe: $probe s in all, the two steps' epochs $per_epoch s: $epochs epochs fit"
    fi
    echo "== d. scripts/reproduce_cifar10.sh at $epochs epochs ($(left) s left)"
    reproduce reproduce_cifar10 "$epochs" "$(within $(($(left) - 20)))"
    tar -czf "$out/reproduce_runs.tar.gz" --exclude='*.pt' --exclude=teacher_cache outputs/reproduce_cifar10 outputs/reproduce_probe 2>/dev/null
}

for step in $(grep -o '[abcde]' <<< "${STEPS:-abced}"); do  # in the order STEPS gives them
    "step_$step"
done
echo "== done in $(($(date +%s) - start)) s"
