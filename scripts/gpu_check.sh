#!/usr/bin/env bash
# The GPU checks of device.cuda_graphs and the CIFAR-10 reproduction, as ONE command for a device session (one H200,
# at most 10 minutes a command): everything it writes that matters lands in $OUT (at most 8 files, the device tool's
# limit: the log, test_cuda.log, bench.json with every bench's figures by step, reproduce_runs.tar.gz with step d's
# tables, and step r's reproduce_state.tar.gz.part-NN).
#
# Before the session, on the development machine (fills the git-ignored data/):
#   scripts/gpu_check.sh prepare     # data/cifar10-jpg.tar.gz (the JPEGs) and data/pydeps (hydra, omegaconf, antlr4,
#                                    # torch-pruning: the device image has torch but not these pure-Python packages)
# In the session (the device tool's run):
#   command: scripts/gpu_check.sh    carry: ["data/cifar10-jpg.tar.gz", "data/pydeps", "data/reproduce_cifar10"]
#   timeout_s: 600
# After it, on the development machine, when step r ran (the state the next session's step r continues from):
#   scripts/gpu_check.sh restore <the folder its files came back to>
#
# What it runs, each step under `timeout` within GPU_CHECK_SECONDS (default 560, to end inside one 600 s command):
#   a. pytest tests/test_cuda.py (graphs vs eager metrics for train, kd and a fused group; fp16 + GradScaler captured)
#   b. distill bench resnet32x4 -> resnet8x4, bf16, batch 64, on the CIFAR-10 JPEGs, device.cuda_graphs=true, then false
#   c. distill bench fused=6 (the T x alpha sweep: one job after another vs fused, the students one after another or on
#      their own CUDA streams, vs stacked), cuda_graphs=true
#   d. scripts/reproduce_cifar10.sh at the epoch count the minutes left allow: first the whole of it at 1 epoch (d0),
#      timed, to size it; then the run, its table beside torchdistill's numbers (the table says which count ran)
#   e. distill bench loss=dkd and loss=crd with cuda_graphs=true (DKD reads the epoch; CRD draws inside the graph)
#   r. the whole recipe (182 epochs) of scripts/reproduce_cifar10.sh, continued from data/reproduce_cifar10 (carried)
#      for the minutes left, stopped with SIGTERM (every run saves a mid-epoch checkpoint), its state packed into $OUT:
#      the recipe needs more GPU time than one session has (docs/results.md), so it is trained a session at a time.
#      Its runs side by side go through CUDA's Multi-Process Service where the machine has it (MPS=auto; 0: never):
#      without it processes on one GPU take turns, with it their kernels can run at the same time.
#
# A rehearsal of the plumbing where there is no GPU (every step, every file in $OUT; the figures mean nothing):
#   DEVICE=cpu GRAPHS=auto BENCH_STEPS=2 BENCH_REPEATS=1 EPOCHS=1 SEEDS="0 1" CIFAR10_ROOT=<a small JPEG tree> \
#       GPU_CHECK_SECONDS=1500 STEPS=abcder scripts/gpu_check.sh
# (step r cut and continued: EPOCHS=6 SEEDS=0 GPU_CHECK_SECONDS=80 STEPS=r, then restore, then again with more seconds)
# Settings (environment): STEPS (acer: which steps run, in that order; d or r last takes the minutes left; a session
# after the first: STEPS=r), DEVICE (cuda), GRAPHS (the bench's device.cuda_graphs, true), BENCH_STEPS (30),
# BENCH_REPEATS (3), EPOCHS (step d: what the minutes left allow, timed by step d0; step r: 182), MPS (auto),
# REPRODUCE_STATE (step r's OUT_DIR, data/reproduce_cifar10),
# CIFAR10_ROOT (default: data/cifar10, unpacked from data/cifar10-jpg.tar.gz), GPU_CHECK_SECONDS, SECONDS_PER_EPOCH
# (step d0's fallback, 10), and SEEDS and SIDE_BY_SIDE for the reproduction (scripts/reproduce_cifar10.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == restore ]]; then  # step r's state, back from a device session (scripts/reproduce_cifar10.sh --unpack)
    rm -rf "${REPRODUCE_STATE:-data/reproduce_cifar10}"
    OUT_DIR=${REPRODUCE_STATE:-data/reproduce_cifar10} exec scripts/reproduce_cifar10.sh --unpack "${2:?restore DIR}"
fi
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
    timeout "$(within 200)" "$python" -m pytest -q tests/test_cuda.py -p no:cacheprovider --durations=10 > "$out/test_cuda.log" 2>&1
    echo "pytest exit $?"; tail -n 15 "$out/test_cuda.log"
}

bench=(bench teacher=resnet32x4 student=resnet8x4 dataset=imagefolder "dataset.root=$root" "device=$device" device.precision=bf16
    batch_size=64 reference_workers=8 "steps=${BENCH_STEPS:-30}" "repeats=${BENCH_REPEATS:-3}")
bench_step() {  # $1: the step's line; one distill bench with the overrides after $4, for at most $3 s, into
    # outputs/gpu_bench_$2, its bench.json added to $OUT/bench.json under the key $4
    local label=$1 dir=outputs/gpu_bench_$2 seconds=$3 key=$4
    shift 4
    echo "== $label ($(left) s left)"
    timeout "$(within "$seconds")" "${distill[@]}" "${bench[@]}" "$@" "hydra.run.dir=$dir"
    echo "exit $?"
    "$python" - "$dir/bench.json" "$out/bench.json" "$key" <<'EOF'
import json, sys
from pathlib import Path

bench, into, key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
every = json.loads(into.read_text()) if into.exists() else {}
every[key] = json.loads(bench.read_text()) if bench.exists() else None  # None: the bench did not finish
into.write_text(json.dumps(every, indent=1))
EOF
}
step_b() {
    for setting in "$graphs" false; do
        bench_step "b. distill bench, cuda_graphs=$setting" "$setting" 80 "graphs_$setting" "device.cuda_graphs=$setting"
    done
}
step_c() {
    bench_step "c. distill bench fused=6, cuda_graphs=$graphs" fused6 150 fused6 fused=6 "device.cuda_graphs=$graphs"
}
step_e() {  # the captured kd step of two more methods: DKD reads the epoch, CRD draws negatives inside the graph
    for loss in dkd crd; do
        bench_step "e. distill bench loss=$loss, cuda_graphs=$graphs" "$loss" 60 "$loss" "loss=$loss" "device.cuda_graphs=$graphs"
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

state=${REPRODUCE_STATE:-data/reproduce_cifar10}  # step r's runs (relative: their configs hold the path)
mps_on() {  # start CUDA's Multi-Process Service and check that a CUDA process starts under it; stop it if not
    [[ ${MPS:-auto} != 0 ]] && command -v nvidia-cuda-mps-control > /dev/null || return 1
    nvidia-cuda-mps-control -d || return 1
    if timeout 60 "$python" -c 'import torch; torch.ones(1, device="cuda").sum().item()'; then
        return 0
    fi
    echo quit | nvidia-cuda-mps-control
    return 1
}
step_r() {
    echo "== r. scripts/reproduce_cifar10.sh, the whole recipe, continued from $state ($(left) s left)"
    local epochs=${EPOCHS:-182}
    if [[ -d $state ]]; then EPOCHS=$epochs OUT_DIR=$state PYTHON="$python" scripts/reproduce_cifar10.sh --table; fi
    local mps=0
    if mps_on; then mps=1; fi
    echo "MPS: $mps"
    # 40 s kept: the runs save their checkpoints after SIGTERM, then the state is packed and copied back
    CIFAR10_ROOT=$root EPOCHS=$epochs OUT_DIR=$state DISTILL="$python -m distill_cli" PYTHON="$python" \
        timeout "$(within $(($(left) - 40)))" scripts/reproduce_cifar10.sh -- "device=$device"
    echo "exit $?"
    if ((mps)); then echo quit | nvidia-cuda-mps-control; fi
    EPOCHS=$epochs OUT_DIR=$state PYTHON="$python" scripts/reproduce_cifar10.sh --table
    OUT_DIR=$state scripts/reproduce_cifar10.sh --pack "$out"
}

for step in $(grep -o '[abcder]' <<< "${STEPS:-acer}"); do  # in the order STEPS gives them
    "step_$step"
done
echo "== done in $(($(date +%s) - start)) s"
