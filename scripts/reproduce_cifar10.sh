#!/usr/bin/env bash
# torchdistill's CIFAR-10 recipe on the CIFAR-10 JPEGs (configs/experiment/cifar10_*.yaml: 182 epochs, SGD lr 0.1,
# momentum 0.9, weight decay 1e-4, batch 64, x0.1 at epochs 91 and 136, crop + flip), on one GPU:
#   1. side by side: resnet56 from scratch (the teacher) and resnet20 from scratch for every seed (the students
#      alone; they land in the teacher cache, where step 2 finds them as its baselines)
#   2. side by side: resnet56 -> resnet20 with loss=kd for every seed, the teacher of step 1, each against the
#      resnet20 of its seed alone (seeds never fuse: each seed is a group of its own for hydra/launcher=fused, which
#      would train them one after another; KD_FUSED=1 runs them so, through the fused launcher, in one process)
#   3. a table of test accuracies (mean and spread over the seeds) beside torchdistill's: $OUT_DIR/table.md
#
#   scripts/reproduce_cifar10.sh                     # the whole recipe
#   EPOCHS=30 scripts/reproduce_cifar10.sh           # a shorter schedule (the milestones scale with it)
#   scripts/reproduce_cifar10.sh --dry-run           # print each command's composed config (--cfg job), train nothing
#   scripts/reproduce_cifar10.sh --table             # only (re)write the table from the runs finished so far
#
# Settings (environment): CIFAR10_ROOT (the JPEG tree, root/{train,test}/<class>/*.jpg; default data/cifar10),
# EPOCHS (182), SEEDS ("0 1 2"), OUT_DIR (outputs/reproduce_cifar10), DISTILL (the command; default distill),
# PYTHON (for the table; default python3), KD_FUSED (0), SIDE_BY_SIDE (1; 0 runs the commands of a step one after
# another: with CUDA graphs a process keeps the GPU busy, and on one H200 resnet56 took 2.8 s an epoch alone, 12.3 s
# beside three resnet20 processes, docs/results.md), and any further overrides for every command as arguments after
# `--`, e.g. `-- device.cuda_graphs=true`.
set -euo pipefail

dry_run=0
table_only=0
extra=()
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --table) table_only=1 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "reproduce_cifar10.sh: unknown argument $1 (--dry-run, --table, or overrides after --)" >&2; exit 2 ;;
    esac
    shift
done

root=${CIFAR10_ROOT:-data/cifar10}
epochs=${EPOCHS:-182}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
out=${OUT_DIR:-outputs/reproduce_cifar10}
read -r -a distill <<< "${DISTILL:-distill}"
common=("dataset.root=$root" "epochs=$epochs" "teacher_cache=$out/teacher_cache" "${extra[@]}")
if ((dry_run)); then
    common+=(--cfg job)
fi

pids=()
failed_here=0
run() {  # one distill command, its output in $out/<name>.log: in the background (SIDE_BY_SIDE=1), else to its end
    local name=$1
    shift
    mkdir -p "$out"
    echo "+ ${distill[*]} $*" | tee "$out/$name.log"
    if [[ ${SIDE_BY_SIDE:-1} == 1 ]]; then
        "${distill[@]}" "$@" >> "$out/$name.log" 2>&1 &
        pids+=($!)
    else
        "${distill[@]}" "$@" >> "$out/$name.log" 2>&1 || failed_here=1
    fi
}
wait_all() {  # wait for every command started; fail when any failed
    local failed=$failed_here
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    pids=()
    failed_here=0
    return $failed
}

train_all() {
# 1. the teacher and the students alone, side by side
run resnet56 train experiment=cifar10_resnet56 seed=0 "hydra.run.dir=$out/resnet56" "${common[@]}"
for seed in "${seeds[@]}"; do
    run "resnet20_seed$seed" train experiment=cifar10_resnet20 "seed=$seed" "hydra.run.dir=$out/resnet20_seed$seed" "${common[@]}"
done
wait_all

# 2. resnet56 -> resnet20 (kd) for every seed, from the teacher of step 1
teacher=("teacher.checkpoint=$out/resnet56/best.pt" "teacher_epochs=$epochs")
if [[ ${KD_FUSED:-0} == 1 ]]; then
    run kd kd -m hydra/launcher=fused experiment=cifar10_resnet56_resnet20 "seed=$(IFS=,; echo "${seeds[*]}")" \
        "hydra.sweep.dir=$out/kd" "${teacher[@]}" "${common[@]}"
else
    for seed in "${seeds[@]}"; do
        run "kd_seed$seed" kd experiment=cifar10_resnet56_resnet20 "seed=$seed" "hydra.run.dir=$out/kd_seed$seed" "${teacher[@]}" "${common[@]}"
    done
fi
wait_all
}
if ((!table_only)); then
    train_all
fi
((dry_run)) && exit 0

# 3. the table
"${PYTHON:-python3}" - "$out" "$epochs" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, epochs = Path(sys.argv[1]), sys.argv[2]
rows = {"resnet56 alone": [], "resnet20 alone": [], "resnet56 -> resnet20 (kd)": []}
published = {}  # torchdistill's test top-1 (%), from the presets' `published` blocks the summaries carry
for summary in sorted(out.rglob("summary.json")):
    result = json.loads(summary.read_text())
    if result.get("status") != "completed":
        continue
    numbers = result.get("published") or {}
    if result["command"] == "train" and summary.parent.parent == out:
        name = "resnet56 alone" if summary.parent.name == "resnet56" else "resnet20 alone"
        rows[name].append(100 * result["teacher"]["test_acc_best"])
        published.setdefault(name, numbers.get("teacher"))
    elif result["command"] == "kd":
        rows["resnet56 -> resnet20 (kd)"].append(100 * result["student"]["test_acc_best"])
        published.setdefault("resnet56 -> resnet20 (kd)", numbers.get("kd"))
lines = [
    f"CIFAR-10 JPEGs, torchdistill's recipe at {epochs} epochs (182 in theirs); test top-1 of best.pt (%)",
    "",
    "| model | runs | mean | spread (min-max) | torchdistill |",
    "| --- | ---: | ---: | --- | ---: |",
]
for name, accuracies in rows.items():
    mean = f"{statistics.mean(accuracies):.2f}" if accuracies else "-"
    spread = f"{min(accuracies):.2f}-{max(accuracies):.2f}" if accuracies else "-"
    reference = f"{published[name]:.2f}" if published.get(name) is not None else "-"
    lines.append(f"| {name} | {len(accuracies)} | {mean} | {spread} | {reference} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
