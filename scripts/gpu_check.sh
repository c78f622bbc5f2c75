#!/usr/bin/env bash
# gpu_check.sh -- every GPU check of this project in one command that ends inside a time budget.
#
#   BUDGET_S=540 bash scripts/gpu_check.sh            # on the GPU machine: OUT is the folder that comes back
#   OUT=/tmp/gpucheck DRY=1 bash scripts/gpu_check.sh # the same plumbing on a CPU: synthetic data,
#                                                     # resnet8, a few epochs, 1-2 minutes
#
# Stages, each under `timeout` and skipped when too little of the budget is left; a failed stage
# never stops the later ones; each stage's output is kept in results/gpu_check/<stage>.txt:
#   a  environment: nvidia-smi, python / torch / torchvision / CUDA / cuDNN, the device; unpack
#      .gpu/cifar-100-lt-if100.tar.xz (CIFAR-100-LT IF 100 + the test set) to a temporary folder
#   b  the tests that touch the CUDA paths (pytest -k "$PYTEST_K"; not -x: in a one-shot session
#      every failure is worth seeing)
#   c  graphed vs plain (scripts/graph_check.py): ResNet-32 SSE-SAM, 200 steps on the real data
#      (synthetic if the archive is missing). If it fails, every later stage runs WITHOUT --cuda_graph
#   d  scripts/bench.py: ms/step of every optimizer, eager and graphed, and kernel ms (the floor)
#   f1 the full 200-epoch ResNet-32 SSE-SAM run of seed 0 on the real data (--cuda_graph if c
#      passed), as scripts/reproduce.sh lays it out: results/resnet32/ssesam-seed0/
#   e  the four rows of seed 0, E_EPOCHS epochs, once with MODE=processes and once with
#      MODE=threads (scratch folders), timed: which mode runs several trainings faster
#   f2 the four rows of seed 0, 200 epochs, in the faster mode (reproduce.sh skips finished runs and
#      resumes unfinished ones, f1's too): whatever the budget leaves
# f1 comes before e: the SSE-SAM row is the headline number and the longest wait, and nothing of
# this project has trained 200 epochs on a GPU yet; e only decides how the three other rows run,
# and they cannot all finish inside one budget anyway. f1 gets all the time left but what e needs
# (2 x E_CAP_S); an unfinished run keeps its last.pt and continues in f2 or in a later session.
#
# What comes back in $OUT (at most 8 files, each under 16 MiB, no folders):
#   gpu_check.log       everything printed, stage by stage, with the seconds since the start
#   summary.md          one screen: device, versions, each stage's status, time and numbers
#   results.tar.gz      results/gpu_check/ (each stage's output, graph_check.json, bench/, modes/),
#                       results/gpu-bench/ (bench.json and the printed tables, as the results keep them)
#                       and results/<arch>/<row>-seed0/ (train.log, metrics.jsonl, summary.json,
#                       model.pt); unpack in the repository root
#   checkpoints.tar.gz  the last.pt of each unfinished run (resume them later), if any; a second
#                       checkpoints2.tar.gz if they do not fit in one
#   graph_check.json, bench.json   copies, to read without unpacking
# Everything is packed again after every stage, so a run cut short still returns what it measured.
#
# Settings from the environment (defaults in brackets): BUDGET_S [540; DRY 240] seconds for
# everything, packing included; RESERVE_S [25] kept back for packing; E_EPOCHS [5; DRY 2] and
# E_ROWS [the four; DRY "sgd ssesam"] of stage e; E_CAP_S [75; DRY 45] the limit of each half of e;
# PYTEST_K (stage b's selection); DRY [0]. DRY also sets OMP_NUM_THREADS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

: "${OUT:?OUT must name the folder whose files come back}"
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
    BUDGET_S=${BUDGET_S:-240}; E_EPOCHS=${E_EPOCHS:-2}; E_CAP_S=${E_CAP_S:-45}; E_ROWS=${E_ROWS:-"sgd ssesam"}
    PYTEST_K=${PYTEST_K:-"graph_check_compare or gpu_check_sh or mode_or_jobs"}
else
    BUDGET_S=${BUDGET_S:-540}; E_EPOCHS=${E_EPOCHS:-5}; E_CAP_S=${E_CAP_S:-75}; E_ROWS=${E_ROWS:-"ssesam sgd sam imbsam"}
    PYTEST_K=${PYTEST_K:-"static_buffer or cuda_graph or graph or bench or multi_run or cuda"}
fi
RESERVE_S=${RESERVE_S:-25}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# DRY: one torch thread per process (several processes share few cores; two OpenMP threads on a
# busy core run many times slower than one)
if [ "$DRY" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

# reproduce.sh and the tests call `python`; where only python3 exists (the GPU image), a shim
if ! command -v python > /dev/null 2>&1; then
    mkdir -p "$WORK/bin"
    printf '#!/bin/sh\nexec python3 "$@"\n' > "$WORK/bin/python"
    chmod +x "$WORK/bin/python"
    export PATH="$WORK/bin:$PATH"
fi

# Where the runs go: the repository's results/ on the GPU machine (a copy of the tree, thrown
# away afterwards), a scratch results/ in a DRY run or without CUDA, so that a checkout stays clean
CUDA=$(python -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$DRY" != 1 ] && [ "$CUDA" = 1 ]; then ROOT=$REPO; else ROOT=$WORK; fi
REC=$ROOT/results/gpu_check        # what the stages measured
mkdir -p "$REC"
STATUS=$WORK/status.tsv            # stage, title, status, seconds, limit
: > "$STATUS"
DATA=$WORK/data

if [ "$DRY" = 1 ]; then
    ARCH=resnet8; F_EPOCHS=3
    DATA_FLAGS="--dataset synthetic --imb_factor 100 --eta 20"
    DEV_FLAGS="--device cpu"
else
    ARCH=resnet32; F_EPOCHS=200
    DATA_FLAGS="--dataset cifar100 --data_dir $DATA --imb_factor 100"
    DEV_FLAGS="--gpu 0"
fi

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(date +%s) + START - RESERVE_S )); }
log() { echo "[$(elapsed) s] $*" | tee -a "$LOG"; }

# stage ID TITLE CAP MIN command...: run command with a limit of min(CAP, time left), its output
# into $REC/ID.txt and the log; skipped when less than MIN seconds are left. Returns its status.
stage() {
    local id=$1 title=$2 cap=$3 min=$4 limit rc=0 t0 status
    shift 4
    limit=$(left)
    if [ "$limit" -gt "$cap" ]; then limit=$cap; fi
    if [ "$limit" -lt "$min" ]; then
        log "== $id: $title: skipped, $limit s left of the budget (needs $min)"
        printf '%s\t%s\tskipped (time)\t0\t%s\n' "$id" "$title" "$limit" >> "$STATUS"
        return 125
    fi
    log "== $id: $title (limit $limit s)"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$REC/$id.txt" | sed -u "s/^/  $id| /" >> "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    log "== $id: $status after $(( $(date +%s) - t0 )) s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$title" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$STATUS"
    return $rc
}

# ---------------------------------------------------------------------------------------------
# Packing: $OUT gets at most 8 plain files, none over LIMIT bytes (16 MiB, with a margin)
# ---------------------------------------------------------------------------------------------
LIMIT=${PACK_LIMIT:-16000000}  # PACK_LIMIT: only to try the splitting with small files

tar_within() {  # archive listfile: tar.gz the listed paths (relative to $ROOT), atomically; if it
                # comes out over LIMIT, again without the model.pt files, then without any .pt
    local archive=$1 list=$2 tmp=$1.tmp
    [ -s "$list" ] || { rm -f "$archive"; return 0; }
    for drop in none 'model\.pt$' '\.pt$'; do
        if [ "$drop" = none ]; then cp "$list" "$list.use"; else grep -v -E "$drop" "$list" > "$list.use"; fi
        [ -s "$list.use" ] || break
        rm -f "$tmp"
        tar -czf "$tmp" -C "$ROOT" -T "$list.use" 2>> "$WORK/tar.err"
        if [ -f "$tmp" ] && [ "$(stat -c %s "$tmp")" -le "$LIMIT" ]; then
            mv "$tmp" "$archive"
            [ "$drop" = none ] || log "packing: $(basename "$archive") left out the files matching $drop (size limit)"
            return 0
        fi
    done
    rm -f "$tmp"
    log "packing: $(basename "$archive") does not fit in $LIMIT bytes even without .pt files"
}

summary() {  # $OUT/summary.md from the status table and the stages' files
    python - "$STATUS" "$REC" "$ROOT/results/$ARCH" "$BUDGET_S" "$(elapsed)" "$DRY" "${GRAPH_FLAG:-}" <<'PY'
import glob, json, os, re, sys
status, rec, runs, budget, used, dry, graph = sys.argv[1:8]
def read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""
def load(path):
    try:
        return json.loads(read(path))
    except ValueError:
        return None
env = dict(re.findall(r"^(python|torch|torchvision|cuda|cudnn|device|data) (.*)$", read(f"{rec}/a.txt"), re.M))
out = [f"# gpu_check{' (DRY: the plumbing on a CPU, synthetic data)' if dry == '1' else ''}: "
       f"{env.get('device', '?')}", "",
       f"python {env.get('python', '?')}, torch {env.get('torch', '?')}, torchvision "
       f"{env.get('torchvision', '?')}, CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}; "
       f"budget {budget} s, used {used} s; later stages {'with' if graph else 'without'} --cuda_graph", "",
       "| stage | status | s | limit | measured |", "|---|---|---|---|---|"]
notes = {"a": f"data: {env.get('data', '?')}"}
b = re.findall(r"^=* ?(\d+ (?:passed|failed).*?) ?=*$", read(f"{rec}/b.txt"), re.M)
notes["b"] = b[-1] if b else ""
gc = load(f"{rec}/graph_check.json")
if gc:
    ms = gc["ms_per_step"]
    notes["c"] = (f"{'PASSED' if gc['passed'] else 'FAILED ' + gc['why']}; max rel diff {gc['max_rel_diff_1_step']:.2g} "
                  f"after 1 step ({gc['diff_over_step_1']:.2g} of the step), {gc['max_rel_diff']:.2g} after {gc['steps']} "
                  f"(moved {gc['weights_moved']:.2g}); ms/step "
                  + ", ".join(f"{s}: plain {ms['plain'][s]:.1f} graphed {ms['graphed'].get(s, float('nan')):.1f}"
                              for s in ms["plain"]))
bench = load(f"{rec}/bench/bench.json")
if bench:
    rows = bench["rows"]
    notes["d"] = "; ".join(
        f"{k} {r['median_ms']:.1f}" + (f"/{rows[k + ', graphed']['median_ms']:.1f}" if k + ", graphed" in rows else "")
        + (f" (kernels {r['kernel_ms']:.1f})" if r.get("kernel_ms") else "")
        for k, r in rows.items() if "forwards" in r and k in ("sgd", "ssesam before the switch", "ssesam after the switch")
    ) + " ms/step eager/graphed"
modes = load(f"{rec}/modes/compare.json")
if modes and not any(v["wall_s"] for v in modes["modes"].values()):
    notes["e-threads"] = "not measured"
elif modes:
    notes["e-threads"] = "; ".join(
        f"{m}: {v['wall_s']} s wall" + (f", {v['epoch_s']} s/epoch (median of epochs 2..{v['epochs'] - 1})"
                                        if v["epoch_s"] else "") + f", {v['finished']} finished"
        for m, v in modes["modes"].items()) + f" -> {modes['faster']} (by {modes['compared']})"
def run_notes(pattern):
    parts = []
    for d in sorted(glob.glob(f"{runs}/{pattern}")):
        s = load(f"{d}/summary.json")
        if s:
            parts.append(f"{os.path.basename(d)} final avg {s['final']['avg']:.2f} (best {s['best']['avg']:.2f}), "
                         f"{s['seconds'] / 60:.1f} min")
        else:
            done = re.findall(r"^epoch +(\d+)/(\d+)", read(f"{d}/train.log"), re.M)
            parts.append(f"{os.path.basename(d)} stopped at epoch {done[-1][0] if done else 0}/"
                         f"{done[-1][1] if done else '?'} (last.pt kept)")
    return "; ".join(parts)
notes["f1"], notes["f2"] = run_notes("ssesam-seed*"), run_notes("*-seed*")
for line in read(status).splitlines():
    sid, title, st, secs, limit = line.split("\t")
    out.append(f"| {sid} {title} | {st} | {secs} | {limit} | {notes.get(sid, '')} |")
table = []
for line in read(f"{rec}/d.txt").splitlines():  # the first table: the steps
    if line.startswith("|"):
        table.append(line)
    elif table:
        break
if table:
    out += ["", "bench.py (ms/step, median of 5 rounds):", ""] + table
print("\n".join(out))
PY
}

pack() {
    if summary > "$WORK/summary.md" 2> "$WORK/summary.err"; then
        cp "$WORK/summary.md" "$OUT/summary.md"
        cp "$WORK/summary.md" "$REC/summary.md"
    else
        log "summary.md not made: $(tail -n 1 "$WORK/summary.err")"
    fi
    cp "$LOG" "$REC/gpu_check.log"
    [ -f "$REC/graph_check.json" ] && cp "$REC/graph_check.json" "$OUT/graph_check.json"
    [ -f "$REC/bench/bench.json" ] && cp "$REC/bench/bench.json" "$OUT/bench.json"
    (cd "$ROOT" && {
        find results/gpu_check -type f ! -name '*.pt'
        find results/gpu-bench -type f 2>/dev/null
        for d in results/"$ARCH"/*-seed*; do
            [ -d "$d" ] || continue
            for f in train.log metrics.jsonl summary.json model.pt; do [ -f "$d/$f" ] && echo "$d/$f"; done
        done
    }) > "$WORK/results.list" 2>/dev/null
    (cd "$ROOT" && for d in results/"$ARCH"/*-seed*; do
        [ -f "$d/last.pt" ] && [ ! -f "$d/summary.json" ] && echo "$d/last.pt"
    done) > "$WORK/checkpoints.list" 2>/dev/null
    tar_within "$OUT/results.tar.gz" "$WORK/results.list"
    # the last.pt files (3.9 MB each for ResNet-32) in up to two archives of at most LIMIT bytes
    local f size=0 n=1 name
    : > "$WORK/ck1.list"; : > "$WORK/ck2.list"
    while read -r f; do
        [ -n "$f" ] || continue
        if [ $(( size + $(stat -c %s "$ROOT/$f") )) -gt "$LIMIT" ] && [ -s "$WORK/ck$n.list" ]; then
            n=$(( n + 1 )); size=0
        fi
        if [ "$n" -gt 2 ]; then log "packing: $f left out (more than two archives of checkpoints)"; continue; fi
        echo "$f" >> "$WORK/ck$n.list"
        size=$(( size + $(stat -c %s "$ROOT/$f") ))
    done < "$WORK/checkpoints.list"
    for n in 1 2; do
        name=$OUT/checkpoints$([ "$n" = 2 ] && echo 2).tar.gz
        tar_within "$name" "$WORK/ck$n.list"
    done
    true
}

# ---------------------------------------------------------------------------------------------
# a. environment and data
# ---------------------------------------------------------------------------------------------
env_stage() {
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host $(uname -srm), $(nproc --all) cores"
    nvidia-smi || echo "nvidia-smi: not available"
    python - <<'PY'
import sys, torch, torchvision
print("python", sys.version.split()[0])
print("torch", torch.__version__)
print("torchvision", torchvision.__version__)
print("cuda", torch.version.cuda if torch.cuda.is_available() else "none")
print("cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else "none")
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
    if [ -f .gpu/cifar-100-lt-if100.tar.xz ]; then
        mkdir -p "$DATA"
        tar -xJf .gpu/cifar-100-lt-if100.tar.xz -C "$DATA" && ls -l "$DATA/cifar-100-python" \
            && echo "data CIFAR-100-LT IF 100 unpacked"
    else
        echo "data none (no .gpu/cifar-100-lt-if100.tar.xz)"
    fi
}
export -f env_stage
export DATA
stage a "environment, data" 90 10 bash -c env_stage
HAVE_DATA=0
[ -f "$DATA/cifar-100-python/train" ] && HAVE_DATA=1
log "CUDA: $CUDA, real data: $HAVE_DATA, DRY: $DRY"
pack
if [ "$DRY" != 1 ] && [ "$CUDA" != 1 ]; then
    log "no CUDA on this machine: nothing more to check (DRY=1 runs the plumbing on a CPU)"
fi
GPU_OK=$([ "$DRY" = 1 ] || [ "$CUDA" = 1 ] && echo 1 || echo 0)

# ---------------------------------------------------------------------------------------------
# b. tests
# ---------------------------------------------------------------------------------------------
if [ "$GPU_OK" = 1 ]; then
    stage b "tests: -k \"$PYTEST_K\"" 120 30 python -m pytest -q -p no:cacheprovider -k "$PYTEST_K"
    pack
fi

# ---------------------------------------------------------------------------------------------
# c. graphed vs plain
# ---------------------------------------------------------------------------------------------
GRAPH_FLAG=""
if [ "$GPU_OK" = 1 ]; then
    if [ "$DRY" = 1 ]; then
        C_FLAGS="$DEV_FLAGS $DATA_FLAGS --arch resnet8 --steps 8 --epochs 4 --gamma 0.5 --batch_size 16"
    elif [ "$HAVE_DATA" = 1 ]; then
        C_FLAGS="$DEV_FLAGS $DATA_FLAGS --eta 100"
    else
        C_FLAGS="$DEV_FLAGS --dataset synthetic"
    fi
    # shellcheck disable=SC2086
    if stage c "graphed vs plain step" 120 30 python scripts/graph_check.py $C_FLAGS --out "$REC"; then
        GRAPH_FLAG="--cuda_graph"
    else
        log "graph check failed or did not finish: the later stages run without --cuda_graph"
    fi
    pack
fi

# ---------------------------------------------------------------------------------------------
# d. bench
# ---------------------------------------------------------------------------------------------
if [ "$GPU_OK" = 1 ]; then
    if [ "$DRY" = 1 ]; then
        D_FLAGS="$DEV_FLAGS --arch resnet8 --batch_size 4 --dataset synthetic"
    else
        D_FLAGS="$DEV_FLAGS --arch resnet32"
    fi
    # shellcheck disable=SC2086
    stage d "bench.py $ARCH" 120 30 python scripts/bench.py $D_FLAGS --out "$REC/bench"
    mkdir -p "$ROOT/results/gpu-bench"  # where the results keep it: the JSON and the printed tables
    [ -f "$REC/bench/bench.json" ] && cp "$REC/bench/bench.json" "$ROOT/results/gpu-bench/bench.json"
    [ -f "$REC/d.txt" ] && cp "$REC/d.txt" "$ROOT/results/gpu-bench/table.md"
    pack
fi

# ---------------------------------------------------------------------------------------------
# f1, e, f2: training runs through scripts/reproduce.sh
# ---------------------------------------------------------------------------------------------
sweep() {  # MODE ROWS EPOCHS OUT_ROOT: reproduce.sh for seed 0 with this check's settings
    MODE=$1 ROWS=$2 EPOCHS=$3 OUT_ROOT=$4 JOBS=4 GPU=0 DATA_DIR=$DATA \
        EXTRA="$EXTRA_FLAGS" bash scripts/reproduce.sh "$ARCH" 0
}
export -f sweep
RUNS_OK=$GPU_OK
if [ "$DRY" != 1 ] && [ "$HAVE_DATA" != 1 ]; then
    RUNS_OK=0
    log "no real data: no training runs (place the archive in .gpu/ and carry it)"
fi
if [ "$DRY" = 1 ]; then EXTRA_FLAGS="$DATA_FLAGS $DEV_FLAGS $GRAPH_FLAG"; else EXTRA_FLAGS="$GRAPH_FLAG"; fi
export ARCH DATA EXTRA_FLAGS
ALL_ROWS="ssesam sgd sam imbsam"

if [ "$RUNS_OK" = 1 ]; then
    # f1: SSE-SAM, all the time left but what e needs
    F1_CAP=$(( $(left) - 2 * E_CAP_S ))
    F1_MIN=30
    [ "$DRY" = 1 ] && F1_CAP=10 F1_MIN=5  # DRY: short on purpose, so that f2 usually exercises the resume
    stage f1 "ssesam seed 0, $F_EPOCHS epochs" "$F1_CAP" "$F1_MIN" \
        bash -c 'sweep "$@"' sweep processes ssesam "$F_EPOCHS" "$ROOT/results"
    pack

    # e: processes against threads, the four rows, E_EPOCHS epochs each, into scratch folders
    for mode in processes threads; do
        rm -rf "$REC/modes/$mode"
        stage "e-$mode" "rows $E_ROWS, $E_EPOCHS epochs, MODE=$mode" "$E_CAP_S" 20 \
            bash -c 'sweep "$@"' sweep "$mode" "$E_ROWS" "$E_EPOCHS" "$REC/modes/$mode"
        find "$REC/modes/$mode" -name '*.pt' -delete 2>/dev/null
    done
    python - "$REC" "$E_EPOCHS" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, os, re, statistics, sys
rec, epochs = sys.argv[1], int(sys.argv[2])
modes = {}
for mode in ("processes", "threads"):
    wall = re.findall(r"^all runs: (\d+) s$", open(f"{rec}/e-{mode}.txt").read(), re.M) \
        if os.path.exists(f"{rec}/e-{mode}.txt") else []
    secs, finished = [], 0
    for log in glob.glob(f"{rec}/modes/{mode}/*/*/train.log"):
        rows = re.findall(r"^epoch +(\d+)/\d+ .*\| ([\d.]+)s eta", open(log).read(), re.M)
        secs += [float(s) for e, s in rows if 2 <= int(e) < epochs]  # no start-up, no evaluation
        finished += os.path.exists(os.path.join(os.path.dirname(log), "summary.json"))
    modes[mode] = {"wall_s": int(wall[-1]) if wall else None, "finished": finished, "epochs": epochs,
                   "epoch_s": round(statistics.median(secs), 2) if secs else None}
p, t = modes["processes"], modes["threads"]
key = "epoch_s" if p["epoch_s"] and t["epoch_s"] else "wall_s"
faster = "threads" if (t[key] is not None and (p[key] is None or t[key] < p[key])
                       and t["finished"] >= p["finished"]) else "processes"
os.makedirs(f"{rec}/modes", exist_ok=True)
json.dump({"modes": modes, "compared": key, "faster": faster}, open(f"{rec}/modes/compare.json", "w"), indent=2)
print(f"e: faster mode {faster} (by {key}): {modes}")
PY
    FASTER=$(python -c "import json; print(json.load(open('$REC/modes/compare.json'))['faster'])" 2>/dev/null \
             || echo processes)
    log "e: the faster mode: $FASTER"
    pack

    # f2: the four rows of seed 0, 200 epochs, in the faster mode, with whatever is left
    stage f2 "4 rows seed 0, $F_EPOCHS epochs, MODE=$FASTER" 100000 30 \
        bash -c 'sweep "$@"' sweep "$FASTER" "$ALL_ROWS" "$F_EPOCHS" "$ROOT/results"
fi

log "done: $(elapsed) s of $BUDGET_S"
pack
cat "$OUT/summary.md"
ls -l "$OUT" | tee -a "$LOG"
rm -rf "$WORK"
