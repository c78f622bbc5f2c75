#!/usr/bin/env bash
# Reproduce the CIFAR-100-LT (IF 100) table: CE with SGD, SAM, ImbSAM and SSE-SAM, for one network
# and several seeds, on one GPU. Each run writes results/<arch>/<opt>-seed<k>/ (train.log,
# metrics.jsonl, summary.json, model.pt; git keeps last.pt and all but ResNet-32's model.pt out),
# then the table is printed.
#
#   scripts/reproduce.sh resnet32 "0 1 2"            # the true ResNet-32
#   scripts/reproduce.sh resnet34 "0 1 2"            # the official code's backbone
#
# Settings from the environment (defaults in brackets):
#   DATA_DIR [./datasets]  folder holding cifar-100-python/     EPOCHS [200]
#   MODE [processes]  processes: one `python ssesam_minimal.py` per run, JOBS at a time;
#                     threads: the runs in `python scripts/multi_run.py` processes, JOBS runs per
#                     process (one thread and one CUDA stream each), one process after another
#   JOBS [4]   runs at once on the device (small networks leave a GPU mostly idle: 4 at once
#              finish sooner than 4 in a row)                   GPU [0]: CUDA device index
#   OUT_ROOT [results]     ROWS ["sgd sam imbsam ssesam"]       EXTRA: more flags for every run
# An interrupted sweep continues where it stopped: finished runs are skipped, unfinished ones resume
# (in either mode, whichever mode ran them before).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: scripts/reproduce.sh ARCH [\"SEEDS\"]   (e.g. resnet32 \"0 1 2\")" >&2
    exit 2
fi
ARCH=$1
SEEDS=${2:-0}
DATA_DIR=${DATA_DIR:-./datasets}
EPOCHS=${EPOCHS:-200}
JOBS=${JOBS:-4}
MODE=${MODE:-processes}
GPU=${GPU:-0}
OUT_ROOT=${OUT_ROOT:-results}
ROWS=${ROWS:-"sgd sam imbsam ssesam"}
EXTRA=${EXTRA:-}

# The protocol of the official code for every row: CE, batch 64, lr 0.01 cosine, wd 1e-3, and a
# test evaluation every 10 epochs (the 20 evaluations the official code picks its best from).
COMMON="--dataset cifar100 --data_dir $DATA_DIR --imb_factor 100 --loss CE --arch $ARCH --epochs $EPOCHS --print_freq 10 --gpu $GPU"
flags_of() {
    case $1 in
        sgd)    echo "--opt sgd" ;;
        sam)    echo "--opt sam --rho 0.05" ;;
        imbsam) echo "--opt imbsam --rho 0.05 --eta 100 --imbsam_weight group" ;;
        ssesam) echo "--opt ssesam --eta 100 --head_rho 0.05 --tail_rho 0.10 --gamma 0.70" ;;  # the seed command
        *)      echo "unknown row $1 (sgd, sam, imbsam, ssesam)" >&2; exit 2 ;;
    esac
}

run_one() {  # opt seed
    local out="$OUT_ROOT/$ARCH/$1-seed$2" resume=""
    if [ -f "$out/summary.json" ]; then echo "done already: $out"; return 0; fi
    if [ -f "$out/last.pt" ]; then resume="--resume"; fi
    mkdir -p "$out"
    echo "start: $out"
    # shellcheck disable=SC2046,SC2086
    python ssesam_minimal.py $COMMON $(flags_of "$1") --seed "$2" --out "$out" $resume $EXTRA \
        >> "$out/train.log" 2>&1 || { echo "FAILED ($?): $out, see $out/train.log" >&2; return 1; }
    echo "finished: $out ($(tail -n 1 "$out/train.log"))"
}

run_threads() {  # "opt seed" ...: these runs in one multi_run.py process; it writes each train.log
    local pair row seed out resume rc=0 runs=() outs=()
    for pair in "$@"; do
        read -r row seed <<< "$pair"
        out="$OUT_ROOT/$ARCH/$row-seed$seed"
        resume=""
        if [ -f "$out/last.pt" ]; then resume="--resume"; fi
        # one argument per run, split again by multi_run.py as a shell would (hence %q for --out)
        runs+=("$COMMON $(flags_of "$row") --seed $seed --out $(printf %q "$out") $resume $EXTRA")
        outs+=("$out")
        mkdir -p "$out"
        echo "start: $out"
    done
    python scripts/multi_run.py "${runs[@]}" || rc=$?
    if [ "$rc" -ge 128 ]; then exit "$rc"; fi  # interrupted: stop the sweep (each last.pt is kept)
    for out in "${outs[@]}"; do
        if [ -f "$out/summary.json" ]; then
            echo "finished: $out ($(tail -n 1 "$out/train.log"))"
        else
            echo "FAILED ($rc): $out, see $out/train.log" >&2
            rc=1
        fi
    done
    return $(( rc != 0 ))
}

case $MODE in
    processes|threads) ;;
    *) echo "MODE must be processes or threads, got $MODE" >&2; exit 2 ;;
esac
if ! [ "$JOBS" -ge 1 ] 2>/dev/null; then echo "JOBS must be a number >= 1, got $JOBS" >&2; exit 2; fi
for row in $ROWS; do flags_of "$row" > /dev/null; done  # reject an unknown row before starting
start=$(date +%s)
failed=0
if [ "$MODE" = processes ]; then
    for seed in $SEEDS; do
        for row in $ROWS; do
            while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done
            run_one "$row" "$seed" &
        done
    done
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
else
    pending=()
    for seed in $SEEDS; do
        for row in $ROWS; do
            if [ -f "$OUT_ROOT/$ARCH/$row-seed$seed/summary.json" ]; then
                echo "done already: $OUT_ROOT/$ARCH/$row-seed$seed"
            else
                pending+=("$row $seed")
            fi
        done
    done
    for (( i = 0; i < ${#pending[@]}; i += JOBS )); do
        run_threads "${pending[@]:i:JOBS}" || failed=1
    done
fi
echo "all runs: $(( $(date +%s) - start )) s"
python scripts/results_table.py "$OUT_ROOT/$ARCH"
exit $failed
