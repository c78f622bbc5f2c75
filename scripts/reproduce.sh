#!/usr/bin/env bash
# Reproduce the CIFAR-100-LT (IF 100) table: CE with SGD, SAM, ImbSAM and SSE-SAM, for one network
# and several seeds, each run into results/<arch>/<opt>-seed<k>/; then print the table. The same
# command again skips finished runs and resumes unfinished ones (scripts/README.md has the rest).
#
#   scripts/reproduce.sh resnet32 "0 1 2"            # the true ResNet-32 (resnet34: the official code's)
#
# Environment [defaults]: DATA_DIR [./datasets] (holds cifar-100-python/), EPOCHS [200], ROWS ["sgd
# sam imbsam ssesam"], OUT_ROOT [results], GPU [0], EXTRA (more flags for every run), PYTHON [python],
# MODE [processes]: a process per run, JOBS [4] at a time; or threads: JOBS runs per multi_run.py
# process, CUDA_GRAPH [0]: 1 records every step as a CUDA graph (cuda_graph.py), SUFFIX [""]: added to
# each run's folder name, for a control run beside a row (SUFFIX=-fp32 EXTRA=--no-bf16 ROWS=sgd: the
# SGD row again in fp32, into results/<arch>/sgd-seed<k>-fp32/).
# Exit codes: 0, 1 a run failed, 2 bad usage, 130 / 143 interrupted.
set -euo pipefail
if [[ ${PYTHON:-} == */* ]]; then PYTHON=$(realpath -s "$PYTHON"); fi  # a path from here works after the cd
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: scripts/reproduce.sh ARCH [\"SEEDS\"]   (e.g. resnet32 \"0 1 2\")" >&2
    exit 2
fi
ARCH=$1 SEEDS=${2:-0}
PYTHON=${PYTHON:-python} DATA_DIR=${DATA_DIR:-./datasets} EPOCHS=${EPOCHS:-200} JOBS=${JOBS:-4}
MODE=${MODE:-processes} GPU=${GPU:-0} OUT_ROOT=${OUT_ROOT:-results} EXTRA=${EXTRA:-}
ROWS=${ROWS:-"sgd sam imbsam ssesam"} SUFFIX=${SUFFIX:-}
TRAIN=ssesam_minimal.py GRAPH_FLAG=""
if [ "${CUDA_GRAPH:-0}" = 1 ]; then TRAIN=scripts/cuda_graph.py GRAPH_FLAG=--cuda_graph; fi

# The protocol of the official code for every row: CE, batch 64, lr 0.01 cosine, wd 1e-3, and a
# test evaluation every 10 epochs (the 20 evaluations the official code picks its best from).
COMMON="--dataset cifar100 --data_dir $DATA_DIR --imb_factor 100 --loss CE --arch $ARCH --epochs $EPOCHS"
COMMON+=" --print_freq 10 --gpu $GPU"
flags_of() {
    case $1 in
        sgd)    echo "--opt sgd" ;;
        sam)    echo "--opt sam --rho 0.05" ;;
        imbsam) echo "--opt imbsam --rho 0.05 --eta 100 --imbsam_weight group" ;;
        ssesam) echo "--opt ssesam --eta 100 --head_rho 0.05 --tail_rho 0.10 --gamma 0.70" ;;  # the seed's
        *)      echo "unknown row $1 (sgd, sam, imbsam, ssesam)" >&2; exit 2 ;;
    esac
}
out_of() { echo "$OUT_ROOT/$ARCH/$1-seed$2$SUFFIX"; }
resume_of() { if [ -f "$1/last.pt" ]; then echo --resume; fi; }

run_one() {  # opt seed: one process
    local out
    out=$(out_of "$1" "$2")
    mkdir -p "$out"
    echo "start: $out"
    # shellcheck disable=SC2046,SC2086
    "$PYTHON" $TRAIN $COMMON $(flags_of "$1") --seed "$2" --out "$out" $(resume_of "$out") $EXTRA \
        >> "$out/train.log" 2>&1 || { echo "FAILED ($?): $out, see $out/train.log" >&2; return 1; }
    echo "finished: $out ($(tail -n 1 "$out/train.log"))"
}

run_threads() {  # "opt seed" ...: these runs in one multi_run.py process, which reports on each
    local pair row seed out rc=0 runs=()
    for pair in "$@"; do
        read -r row seed <<< "$pair"
        out=$(out_of "$row" "$seed")
        mkdir -p "$out"
        echo "start: $out"
        # one argument per run, split again by multi_run.py as a shell would (hence %q for --out)
        runs+=("$COMMON $(flags_of "$row") --seed $seed --out $(printf %q "$out") $(resume_of "$out")")
        runs[-1]+=" $GRAPH_FLAG $EXTRA"
    done
    "$PYTHON" scripts/multi_run.py "${runs[@]}" || rc=$?
    if [ "$rc" -ge 128 ]; then exit "$rc"; fi  # interrupted: stop the sweep (each last.pt is kept)
}

if ! [[ $MODE =~ ^(processes|threads)$ ]]; then echo "MODE must be processes or threads, got $MODE" >&2; exit 2; fi
if ! [ "$JOBS" -ge 1 ] 2>/dev/null; then echo "JOBS must be a number >= 1, got $JOBS" >&2; exit 2; fi
if ! [[ $SUFFIX =~ ^[A-Za-z0-9._-]*$ ]]; then echo "SUFFIX may hold letters, digits, . _ - only, got $SUFFIX" >&2; exit 2; fi
for row in $ROWS; do flags_of "$row" > /dev/null; done  # reject an unknown row before starting
start=$(date +%s)
pending=()
for seed in $SEEDS; do
    for row in $ROWS; do
        if [ -f "$(out_of "$row" "$seed")/summary.json" ]; then
            echo "done already: $(out_of "$row" "$seed")"
        else
            pending+=("$row $seed")
        fi
    done
done
if [ "$MODE" = processes ]; then
    for pair in "${pending[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
        # shellcheck disable=SC2086
        run_one $pair &
    done
    wait
else
    for (( i = 0; i < ${#pending[@]}; i += JOBS )); do
        run_threads "${pending[@]:i:JOBS}"
    done
fi
echo "all runs: $(( $(date +%s) - start )) s"
failed=0
for pair in "${pending[@]}"; do  # a run has finished when its summary.json exists
    # shellcheck disable=SC2086
    [ -f "$(out_of $pair)/summary.json" ] || failed=1
done
"$PYTHON" scripts/results_table.py "$OUT_ROOT/$ARCH" || true  # no run finished: says so
exit $failed
