#!/usr/bin/env bash
# torchdistill's CIFAR-10 recipe on the CIFAR-10 JPEGs (configs/experiment/cifar10_*.yaml: 182 epochs, SGD lr 0.1,
# momentum 0.9, weight decay 1e-4, batch 64, x0.1 at epochs 91 and 136, crop + flip), on one GPU:
#   1. side by side: resnet56 from scratch (the teacher) and resnet20 from scratch for every seed (the students
#      alone; they land in the teacher cache, where step 2 finds them as its baselines)
#   2. side by side: resnet56 -> resnet20 with loss=kd for every seed, the teacher of step 1, each against the
#      resnet20 of its seed alone (seeds never fuse: each seed is a group of its own for hydra/launcher=fused, which
#      would train them one after another; KD_FUSED=1 runs them so, through the fused launcher, in one process)
#   3. a table of test accuracies (mean and spread over the seeds) beside torchdistill's: $OUT_DIR/table.md
# It continues where it stopped: a run that completed is not run again, every other one runs with resume=true (from
# its last.pt when it has one, exactly: docs/resume.md). So the recipe can be trained in pieces, on one machine or on
# several, one after another (a device session's minutes at a time: scripts/gpu_check.sh, step r): --pack puts what
# the next piece needs into files of at most 15 MiB, --unpack puts them back under the same OUT_DIR (keep it
# relative, and CIFAR10_ROOT too: the runs' configs hold both paths, and a resume needs the same config).
# SIGTERM or Ctrl-C stops every run at its next step with a mid-epoch checkpoint; the script waits for them.
#
#   scripts/reproduce_cifar10.sh                     # the whole recipe (or what is left of it)
#   EPOCHS=30 scripts/reproduce_cifar10.sh           # a shorter schedule (the milestones scale with it)
#   scripts/reproduce_cifar10.sh --dry-run           # print each command's composed config (--cfg job), train nothing
#   scripts/reproduce_cifar10.sh --table             # only (re)write the table from the runs finished so far
#   scripts/reproduce_cifar10.sh --pack DIR          # the state to continue from, as DIR/reproduce_state.tar.gz.part-NN
#   scripts/reproduce_cifar10.sh --unpack DIR        # ... back into OUT_DIR
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
pack_into=
unpack_from=
extra=()
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --table) table_only=1 ;;
        --pack) pack_into=${2:?--pack DIR}; shift ;;
        --unpack) unpack_from=${2:?--unpack DIR}; shift ;;
        --) shift; extra=("$@"); break ;;
        *) echo "reproduce_cifar10.sh: unknown argument $1 (--dry-run, --table, --pack DIR, --unpack DIR, or overrides after --)" >&2; exit 2 ;;
    esac
    shift
done

root=${CIFAR10_ROOT:-data/cifar10}
epochs=${EPOCHS:-182}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
out=${OUT_DIR:-outputs/reproduce_cifar10}
read -r -a distill <<< "${DISTILL:-distill}"
common=("dataset.root=$root" "epochs=$epochs" "teacher_cache=$out/teacher_cache" resume=true "${extra[@]}")
if ((dry_run)); then
    common+=(--cfg job)
fi

completed() {  # whether the run folder $1 holds a completed run's summary
    [[ -f $1/summary.json ]] && grep -q '"status": "completed"' "$1/summary.json"
}

if [[ -n $pack_into ]]; then  # $out less what a continuation does not read: last.prev.pt, a completed run's last.pt
    excluded=(--exclude=last.prev.pt '--exclude=*.lock')
    while IFS= read -r summary; do
        run_dir=$(dirname "${summary#"$out"/}")
        if completed "$out/$run_dir"; then excluded+=("--exclude=./$run_dir/last.pt"); fi
    done < <(find "$out" -name summary.json)
    mkdir -p "$pack_into"
    rm -f "$pack_into"/reproduce_state.tar.gz.part-*
    tar -C "$out" "${excluded[@]}" -czf - . | split -b "${PART_BYTES:-15M}" -d - "$pack_into/reproduce_state.tar.gz.part-"
    ls -l "$pack_into"/reproduce_state.tar.gz.part-*
    exit 0
fi
if [[ -n $unpack_from ]]; then
    mkdir -p "$out"
    cat "$unpack_from"/reproduce_state.tar.gz.part-* | tar -C "$out" -xzf -
    exit 0
fi

pids=()
failed_here=0
# SIGTERM (`timeout`) or Ctrl-C reaches every run of the process group, each of which saves a mid-epoch checkpoint at
# its next step: wait for them before leaving (a second signal would make them stop without it)
trap 'wait; exit 143' TERM
trap 'wait; exit 130' INT
run() {  # one distill command, its output in $out/<name>.log: in the background (SIDE_BY_SIDE=1), else to its end;
    # not at all when it completed before
    local name=$1
    shift
    mkdir -p "$out"
    if ((!dry_run)) && completed "$out/$name"; then
        echo "$name: completed before, not run again" | tee -a "$out/$name.log"
        return
    fi
    echo "+ ${distill[*]} $*" | tee -a "$out/$name.log"
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
seconds = {name: [] for name in rows}  # each run's training time: its epochs' seconds, added up over the pieces
published = {}  # torchdistill's test top-1 (%), from the presets' `published` blocks the summaries carry
unfinished = []
def epochs_seconds(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return len(lines), sum(json.loads(line)["seconds"] for line in lines)
def kind(run_dir):  # the row of a run folder of this script, by its place; None for any other folder
    if run_dir.parent == out and run_dir.name == "resnet56":
        return "resnet56 alone", "teacher"
    if run_dir.parent == out and run_dir.name.startswith("resnet20_seed"):
        return "resnet20 alone", "teacher"
    if run_dir.parent == out and run_dir.name.startswith("kd_seed") or run_dir.parent == out / "kd":
        return "resnet56 -> resnet20 (kd)", "kd"
    return None
run_dirs = {path.parent for pattern in ("summary.json", "metrics.jsonl") for path in out.rglob(pattern)}
for run_dir in sorted(filter(kind, run_dirs)):
    (name, key), done, spent = kind(run_dir), *epochs_seconds(run_dir)
    result = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    if result.get("status") != "completed":
        unfinished.append(f"{run_dir.relative_to(out)} {done}/{epochs} epochs ({result.get('status', 'running or killed')})")
        continue
    rows[name].append(100 * result["student" if key == "kd" else "teacher"]["test_acc_best"])
    seconds[name].append(spent)
    published.setdefault(name, (result.get("published") or {}).get(key))
lines = [
    f"CIFAR-10 JPEGs, torchdistill's recipe at {epochs} epochs (182 in theirs); test top-1 of best.pt (%); training time: "
    "a run's epochs, added up over the pieces it was trained in",
    "",
    "| model | runs | mean | spread (min-max) | torchdistill | training time per run (min) |",
    "| --- | ---: | ---: | --- | ---: | ---: |",
]
for name, accuracies in rows.items():
    mean = f"{statistics.mean(accuracies):.2f}" if accuracies else "-"
    spread = f"{min(accuracies):.2f}-{max(accuracies):.2f}" if accuracies else "-"
    reference = f"{published[name]:.2f}" if published.get(name) is not None else "-"
    minutes = f"{statistics.mean(seconds[name]) / 60:.1f}" if seconds[name] else "-"
    lines.append(f"| {name} | {len(accuracies)} | {mean} | {spread} | {reference} | {minutes} |")
if unfinished:
    lines += ["", "Not finished yet: " + "; ".join(unfinished)]
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
