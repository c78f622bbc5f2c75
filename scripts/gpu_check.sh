#!/usr/bin/env bash
# gpu_check.sh -- the checks that need a CUDA GPU, one after another (a failed one stops none):
#   tests        the tests that need CUDA (pytest -k cuda: their names say so)
#   graph_check  cuda_graph.py --check: graphed against plain step, ResNet-32 SSE-SAM, 200 steps, on
#                CIFAR-100-LT IF 100 from DATA_DIR (without it: the synthetic data set)
#   bench        bench.py: ms per step of each optimizer, eager and graphed, against the official step
# Into one folder: summary.md (device, versions, each check's status and numbers), <check>.txt,
# env.txt, cuda_graph_check.json, bench.json.
#
#   bash scripts/gpu_check.sh [FOLDER]          # default results/gpu_check, or $GPU_CHECK_DIR
#   bash scripts/gpu_check.sh --summary FOLDER  # only make FOLDER/summary.md again
# Environment: PYTHON [python], GPU [0], DATA_DIR. Exit codes: 0 all passed, 1 one failed, 2 no CUDA.
set -uo pipefail
PYTHON=${PYTHON:-python}
GPU=${GPU:-0}
SUMMARY_ONLY=0
if [ "${1:-}" = --summary ]; then SUMMARY_ONLY=1; shift; fi
FOLDER=${1:-${GPU_CHECK_DIR:-}}
# folders given are taken from where the command was started; the default lies in the repository
if [ -n "$FOLDER" ]; then FOLDER=$(realpath -m "$FOLDER"); fi
if [ -n "${DATA_DIR:-}" ]; then DATA_DIR=$(realpath -m "$DATA_DIR"); fi
if [[ $PYTHON == */* ]]; then PYTHON=$(realpath -s "$PYTHON"); fi
cd "$(dirname "$0")/.."
FOLDER=${FOLDER:-results/gpu_check}

check() {  # NAME COMMAND...: run it, its output into $FOLDER/NAME.txt, its exit code into status.tsv
    local name=$1 rc=0
    shift
    echo "== $name: $*"
    "$@" > "$FOLDER/$name.txt" 2>&1 || rc=$?
    printf '%s\t%s\n' "$name" "$rc" >> "$FOLDER/status.tsv"
    echo "== $name: $([ "$rc" = 0 ] && echo passed || echo "failed (exit $rc)")"
}

summary() {  # $FOLDER/summary.md from what the checks left in $FOLDER, written whole or not at all
    local name rc
    {
        printf '# gpu_check: %s\n\n%s\n\n| check | status | its last line |\n|---|---|---|\n' \
            "$(sed -n 's/^device //p' "$FOLDER/env.txt")" \
            "$(grep -E '^(python|torch|torchvision|cuda|cudnn) ' "$FOLDER/env.txt" | paste -sd ';' | sed 's/;/, /g')"
        while IFS=$'\t' read -r name rc; do
            echo "| $name | $([ "$rc" = 0 ] && echo passed || echo "failed (exit $rc)") |" \
                 "$(tail -n 1 "$FOLDER/$name.txt" 2>/dev/null | sed 's/|/\\|/g') |"
        done < "$FOLDER/status.tsv"
        printf '\ncuda_graph.py --check:\n\n'
        sed 's/^/    /' "$FOLDER/graph_check.txt"
        printf '\nbench.py:\n\n'
        grep 'torch threads' "$FOLDER/bench.txt" && echo && grep '^|' "$FOLDER/bench.txt"
    } > "$FOLDER/summary.md.tmp" 2>/dev/null
    mv "$FOLDER/summary.md.tmp" "$FOLDER/summary.md"
}

if [ "$SUMMARY_ONLY" = 1 ]; then summary; exit; fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" > /dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON" >&2
    exit 2
fi
DATA=(--dataset synthetic)
if [ -n "${DATA_DIR:-}" ]; then DATA=(--dataset cifar100 --data_dir "$DATA_DIR" --imb_factor 100); fi
mkdir -p "$FOLDER"
: > "$FOLDER/status.tsv"
{ "$PYTHON" -c 'import sys, torch, torchvision as tv
print("python", sys.version.split()[0]); print("torch", torch.__version__)
print("torchvision", tv.__version__)
print("cuda", torch.version.cuda); print("cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(int(sys.argv[1])))' "$GPU"
  nvidia-smi; } > "$FOLDER/env.txt" 2>&1
check tests "$PYTHON" -m pytest -q -rs -k cuda
check graph_check "$PYTHON" scripts/cuda_graph.py --check --gpu "$GPU" "${DATA[@]}" --out "$FOLDER"
check bench "$PYTHON" scripts/bench.py --gpu "$GPU" --out "$FOLDER"
summary
echo "summary: $FOLDER/summary.md"
! grep -qv $'\t0$' "$FOLDER/status.tsv"  # exit 1 if a check failed
