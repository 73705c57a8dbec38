#!/usr/bin/env bash
# GPU kit: every GPU check of issue 4 in ONE command on the device machine (one H200, 16 cores, Python 3.12,
# no network). Prepare here with `bash benchmarks/gpu/fetch_wheels.sh`, then run there with
#   run(command="bash benchmarks/gpu/run_gpu.sh", carry=[".whl"], timeout_s=540)
#
# Stages (each under `timeout`, each writing its results into $OUT as soon as it ends, so a later stage that
# fails or runs out of time still leaves the earlier results; the script stops by itself at KIT_DEADLINE_S):
#   setup     install .whl/ to /tmp/site, import everything the stages use, print versions and nvidia-smi
#   bench     synth + `ingest --size 256` of KIT_BENCH_N images, then benchmarks/bench_train.py: SimCLR ResNet18,
#             224 px views, bf16, channels_last, batch 256, 30 steps, once per KIT_BENCH_WORKERS
#             -> $OUT/bench_train_gpu.json (README's command, 4 workers), $OUT/bench_train_gpu_w8.json (8 workers)
#   data      the README's "Few labels" data: 5,000 unlabelled images (synth seed 7, 5 % wrong tags, no OOD) and
#             the 20,000-image evaluation set (seed 8, --ood-rate 0), both ingested at 64 px
#   pretrain  SimCLR ResNet18 on the 5,000 (`xrayops pretrain`, batch 128, lr 1e-3 as the CPU runs): a short
#             calibration run times an epoch, and the epoch count fills what is left of the time budget
#             -> $OUT/pretrain.json
#   few       benchmarks/few_label.py --device cuda on the 20,000 (--supervised-steps 1000 --subset-seeds 5)
#             -> $OUT/few_label.csv, few_label.md, few_label.png
#   always    $OUT/summary.json (stage status and times, versions, knobs, headline figures) and
#             $OUT/logs.tar.gz (every stage's log), rewritten after each stage. At most 8 files in $OUT.
#
# Device selection: `xrayops pretrain` takes its device from XRAYOPS_DEVICE (settings.device; default auto =
# CUDA when present); this script sets it to KIT_DEVICE (cuda). On CUDA pretraining augments on the GPU
# (TwoViews on the batch already moved to the device), autocasts to bf16 (PretrainConfig.amp, where the GPU
# supports bf16) and runs channels_last. Its data loader has no workers (the CLI has no option for them):
# 64 px images from memory are cheap to collate.
#
# Wall-time estimate on the H200 machine, ~6 min in all (basis: this repo's 2-core CPU, one core per process:
# synth 11 ms/image at 160 px and 19 ms at 256 px; ingest 3 ms/image at 64 px, 3.7 at 256 px, of which ~0.3 ms
# is serial in the main process; CPU per-core speed taken as equal there; GPU steps judged from ResNet18's
# ~1.8 GFLOP/image at 224 px and, at 64 px, from kernel-launch overhead (~600 small kernels a step):
#   setup     ~25 s   pip install (~5 s), imports + CUDA init (~15 s)
#   bench     ~60 s   synth 2,048 @256 on 16 processes (~4 s), ingest (~5 s), two bench runs (~25 s each:
#                     start + CUDA init ~10 s, 33 + 33 steps of 256 pairs at 224 px ~0.1-0.2 s a step)
#   data      ~45 s   synth 25,000 @160 px on 16 processes (~20 s), ingest 5,000 + 20,000 with 16 workers
#                     (~25 s, bounded by the main process's ~0.3 ms/image)
#   pretrain  ~150 s  calibration (start ~10 s + 3 epochs) then KIT_PRETRAIN_BUDGET_S (120 s) of epochs,
#                     capped by the deadline less KIT_FEW_RESERVE_S; one epoch (39 steps of 128 pairs at 64 px
#                     plus its end-of-epoch checkpoint) is expected at ~1 s, so ~100-150 epochs
#   few       ~90 s   embeddings (seconds), per fraction 2 x 1,000 fp32 steps of batch 32 at 64 px (~10 s each),
#                     the stage-2-4 logistic probe (13 s at 100 % on one CPU thread), 4 more subsets per fraction
#   The pretraining epoch count is the one knob that absorbs any error here: it is derived from the time left.
#
# CPU dry run (tiny sizes, our .venv, no wheels, no GPU), to exercise every stage here:
#   OMP_NUM_THREADS=1 XRAYOPS_GPU_KIT_DRYRUN=1 bash benchmarks/gpu/run_gpu.sh     # ~1 min on one core
# (results in /tmp/gpukit-dryrun/out; the dry run also checks that the parallel synth below writes the same
# files as `xrayops synth`).
# Every KIT_* knob below can be set in the environment; the dry run has its own tiny defaults.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
DRY="${XRAYOPS_GPU_KIT_DRYRUN:-0}"

knob() {  # knob NAME DEVICE_DEFAULT DRYRUN_DEFAULT: keep NAME if set, else the default for this mode
  local name=$1
  if [[ -z "${!name:-}" ]]; then
    if [[ "$DRY" == 1 ]]; then printf -v "$name" '%s' "$3"; else printf -v "$name" '%s' "$2"; fi
  fi
  export "$name"
}

knob KIT_WORK /tmp/gpukit /tmp/gpukit-dryrun                   # scratch: data sets, checkpoints
knob OUT "$ROOT/outputs/gpu_kit" /tmp/gpukit-dryrun/out         # set by the device tool; results come back from it
knob KIT_PY python3 "$ROOT/.venv/bin/python"                   # the device's python3 holds torch
knob KIT_SITE /tmp/site ""                                     # where .whl/ is installed ("" = install nothing)
knob KIT_DEVICE cuda cpu
knob KIT_PROCS "$(nproc)" 1                                    # synth processes and ingest workers
knob KIT_DEADLINE_S 450 900                                    # the script ends its last stage by then
knob KIT_STAGES "bench data pretrain few" "bench data pretrain few"
# bench (benchmarks/README.md, Training)
knob KIT_BENCH_N 2048 40
knob KIT_BENCH_SYNTH_SIZE 256 160
knob KIT_BENCH_STORED 256 64                                   # `xrayops ingest --size`
knob KIT_BENCH_SIZE 224 48                                     # side of the views (crops of the stored images)
knob KIT_BENCH_BATCH 256 8
knob KIT_BENCH_STEPS 30 2
knob KIT_BENCH_WARMUP 3 1
knob KIT_BENCH_AMP bf16 bf16
knob KIT_BENCH_WORKERS "4 8" "0"                               # one run each (at most 2: 8 files come back)
# data (README.md, "Few labels")
knob KIT_DATA_SIZE 64 64
knob KIT_PRE_N 5000 60
knob KIT_PRE_SEED 7 7
knob KIT_EVAL_N 20000 200
knob KIT_EVAL_SEED 8 8
# pretrain
knob KIT_PRETRAIN_BATCH 128 16
knob KIT_PRETRAIN_LR 1e-3 1e-3
knob KIT_PRETRAIN_CALIB_EPOCHS 3 2
knob KIT_PRETRAIN_BUDGET_S 120 15                              # seconds of epochs after calibration
knob KIT_PRETRAIN_EPOCHS "" ""                                 # set: this many epochs, no calibration
knob KIT_PRETRAIN_MIN_EPOCHS 10 1
knob KIT_PRETRAIN_MAX_EPOCHS 1000 2
knob KIT_FEW_RESERVE_S 150 240                                 # kept for the few-label stage
# few (README.md, "Few labels")
knob KIT_FEW_FRACTIONS "0.01 0.1 1.0" "0.1 1.0"
knob KIT_FEW_SUP_STEPS 1000 3
knob KIT_FEW_LINEAR_STEPS 1500 5
knob KIT_FEW_SUBSET_SEEDS 5 2
knob KIT_FEW_EXTRA "" ""                                       # more few_label.py arguments, e.g. --spread-scratch

export PYTHONUNBUFFERED=1 XRAYOPS_PROGRESS=0 XRAYOPS_DEVICE="$KIT_DEVICE" XRAYOPS_LOG_LEVEL=INFO
export KIT_T0="$T0" KIT_ROOT="$ROOT" DRY
LOGS="$KIT_WORK/logs"; STATUS="$KIT_WORK/status.tsv"
export LOGS STATUS
case "$KIT_WORK" in /|/tmp|"$ROOT"|"$HOME") echo "refusing KIT_WORK=$KIT_WORK (it is wiped)"; exit 2 ;; esac
rm -rf "$KIT_WORK"; mkdir -p "$KIT_WORK" "$LOGS" "$OUT"
: >"$STATUS"

banner() { printf '\n==== %s  +%ss  %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - KIT_T0 ))" "$*"; }
left() { echo $(( KIT_DEADLINE_S - ($(date +%s) - KIT_T0) )); }
export -f banner left

# --- helpers run by the stages ------------------------------------------------------------------------------
xr() { "$KIT_PY" -m xrayops.cli "$@"; }
synth_ingest() {  # synth_ingest NAME N SEED SYNTH_SIZE STORED_SIZE [synth args...]: $KIT_WORK/NAME/{synth,data}
  local name=$1 n=$2 seed=$3 size=$4 stored=$5; shift 5
  local dir="$KIT_WORK/$name"
  echo "-- $name: synth $n images (seed $seed, ${size} px) on $KIT_PROCS processes $*"
  # synth --workers writes the same files as one process (tests/test_synth.py), so the 5k and 20k sets
  # are the images of the README's CPU tables.
  mkdir -p "$dir"
  OMP_NUM_THREADS=1 xr synth "$dir/synth" --n "$n" --seed "$seed" --size "$size" --workers "$KIT_PROCS" "$@" \
    >"$dir/synth.json" || return 1
  echo "-- $name: ingest at $stored px, $KIT_PROCS workers"
  local t=$(date +%s)
  OMP_NUM_THREADS=1 xr ingest "$dir/synth/dicom" --data-dir "$dir/data" --size "$stored" --workers "$KIT_PROCS" \
    >"$dir/ingest.json" || return 1
  "$KIT_PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print('ingest:', {k: s[k] for k in ('n_ok','n_quarantined','splits') if k in s}, '$(( $(date +%s) - t )) s')" "$dir/ingest.json"
}
export -f xr synth_ingest

# --- stages -------------------------------------------------------------------------------------------------
stage_bench() {
  synth_ingest bench "$KIT_BENCH_N" 0 "$KIT_BENCH_SYNTH_SIZE" "$KIT_BENCH_STORED" --ood-rate 0 || return 1
  local rc=0 w first=1 out
  for w in $KIT_BENCH_WORKERS; do
    if [[ $first == 1 ]]; then out="$OUT/bench_train_gpu.json"; else out="$OUT/bench_train_gpu_w$w.json"; fi
    echo "-- bench_train: $KIT_BENCH_WORKERS workers list, now $w -> $(basename "$out")"
    "$KIT_PY" benchmarks/bench_train.py --data-dir "$KIT_WORK/bench/data" --method simclr --device "$KIT_DEVICE" \
      --size "$KIT_BENCH_SIZE" --amp "$KIT_BENCH_AMP" --batch-size "$KIT_BENCH_BATCH" --steps "$KIT_BENCH_STEPS" \
      --warmup "$KIT_BENCH_WARMUP" --workers "$w" --out "$out" || rc=1
    first=0
  done
  return $rc
}

stage_data() {
  synth_ingest pre "$KIT_PRE_N" "$KIT_PRE_SEED" 160 "$KIT_DATA_SIZE" --mislabel-rate 0.05 --ood-rate 0 || return 1
  synth_ingest eval "$KIT_EVAL_N" "$KIT_EVAL_SEED" 160 "$KIT_DATA_SIZE" --ood-rate 0 || return 1
}

pretrain_run() {  # pretrain_run OUTDIR EPOCHS [more args]
  local out=$1 epochs=$2; shift 2
  xr pretrain --data-dir "$KIT_WORK/pre/data" --out "$out" --epochs "$epochs" --method simclr --arch resnet18 \
    --batch-size "$KIT_PRETRAIN_BATCH" --lr "$KIT_PRETRAIN_LR" --seed 0 --checkpoint-every 1000000 "$@"
}
export -f pretrain_run

stage_pretrain() {
  local epochs="$KIT_PRETRAIN_EPOCHS" epoch_s="" budget
  if [[ -z "$epochs" ]]; then
    echo "-- calibration: $KIT_PRETRAIN_CALIB_EPOCHS epochs"
    XRAYOPS_LOG_JSON=1 pretrain_run "$KIT_WORK/pretrain_calib" "$KIT_PRETRAIN_CALIB_EPOCHS" \
      >"$KIT_WORK/pretrain_calib.json" 2>"$LOGS/pretrain_calib.jsonl" || { cat "$LOGS/pretrain_calib.jsonl"; return 1; }
    # Seconds per epoch from the epoch-end log times (the first epoch, with start-up and autotuning, left out).
    epoch_s=$("$KIT_PY" - "$LOGS/pretrain_calib.jsonl" "$KIT_WORK/pretrain_calib.json" <<'PY'
import json, sys
from datetime import datetime
times = []
for line in open(sys.argv[1]):  # JSON log lines, among warnings
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if isinstance(record, dict) and record.get("event") == "pretrain.epoch":
        times.append(datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp())
if len(times) >= 2:
    print(round((times[-1] - times[0]) / (len(times) - 1), 3))
else:
    result = json.load(open(sys.argv[2]))
    print(round(result["seconds"] / max(result["epochs_completed"], 1), 3))
PY
) || return 1
    budget=$(( $(left) - KIT_FEW_RESERVE_S - 20 ))
    (( budget > KIT_PRETRAIN_BUDGET_S )) && budget=$KIT_PRETRAIN_BUDGET_S
    epochs=$("$KIT_PY" -c "import sys; e, b, lo, hi = map(float, sys.argv[1:]); print(int(max(lo, min(hi, b // e))))" \
      "$epoch_s" "$budget" "$KIT_PRETRAIN_MIN_EPOCHS" "$KIT_PRETRAIN_MAX_EPOCHS")
    echo "calibration: ${epoch_s} s/epoch; budget ${budget} s -> $epochs epochs"
  fi
  echo "{\"epochs\": $epochs, \"calibration_s_per_epoch\": ${epoch_s:-null}}" >"$KIT_WORK/pretrain_plan.json"
  echo "-- pretrain: $epochs epochs, batch $KIT_PRETRAIN_BATCH, lr $KIT_PRETRAIN_LR, device $KIT_DEVICE"
  # Its own limit: the time left less the few-label reserve, so a slow run still leaves time for few_label.
  local limit=$(( $(left) - KIT_FEW_RESERVE_S + 30 ))
  (( limit < 60 )) && limit=60
  timeout -k 10 "$limit" bash -c 'pretrain_run "$KIT_WORK/pretrain" "$1" >"$KIT_WORK/pretrain.json"' _ "$epochs"
  local rc=$?
  if [[ $rc != 0 || ! -s "$KIT_WORK/pretrain/backbone.pt" ]]; then
    echo "pretrain ended with rc $rc (124: its own limit of ${limit} s): taking the backbone of its last checkpoint"
    rc=2  # partial: few_label still runs, on the backbone of the last completed epoch
    "$KIT_PY" - "$KIT_WORK/pretrain/checkpoint.pt" "$KIT_WORK/pretrain/backbone.pt" "$KIT_WORK/pretrain.json" <<'PY' || return 1
import json, sys, torch
from xrayops.models.backbone import build_backbone, save_backbone
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
cfg = ck["config"]
backbone, _ = build_backbone(cfg.get("arch", "resnet18"))
backbone.load_state_dict({k[len("backbone."):]: v for k, v in ck["model"].items() if k.startswith("backbone.")})
save_backbone(sys.argv[2], backbone, cfg.get("arch", "resnet18"), cfg.get("method", "simclr"))
json.dump({"partial": True, "steps": ck["step"], "epochs_completed": len(ck["losses"]), "losses": ck["losses"],
           "planned_epochs": cfg["epochs"]}, open(sys.argv[3], "w"))
print("backbone from checkpoint: step", ck["step"], "epochs", len(ck["losses"]))
PY
  fi
  "$KIT_PY" - "$KIT_WORK/pretrain.json" "$KIT_WORK/pretrain_plan.json" "$OUT/pretrain.json" <<'PY'
import json, sys
result, plan = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
result.update(plan_epochs=plan["epochs"], calibration_s_per_epoch=plan["calibration_s_per_epoch"])
losses = result.get("losses") or []
if losses:
    print(f"pretrain: {len(losses)} epochs, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {result.get('seconds', 0):.0f} s")
json.dump(result, open(sys.argv[3], "w"), indent=2)
PY
  return $rc
}

stage_few() {
  [[ -s "$KIT_WORK/pretrain/backbone.pt" ]] || { echo "no backbone.pt: pretrain did not produce one"; return 1; }
  # shellcheck disable=SC2086
  "$KIT_PY" benchmarks/few_label.py --data-dir "$KIT_WORK/eval/data" --backbone "$KIT_WORK/pretrain/backbone.pt" \
    --truth "$KIT_WORK/eval/synth/truth.csv" --device "$KIT_DEVICE" --fractions $KIT_FEW_FRACTIONS \
    --supervised-steps "$KIT_FEW_SUP_STEPS" --linear-steps "$KIT_FEW_LINEAR_STEPS" \
    --subset-seeds "$KIT_FEW_SUBSET_SEEDS" $KIT_FEW_EXTRA --out "$KIT_WORK/few_label" || return 1
  cp "$KIT_WORK/few_label/few_label.csv" "$KIT_WORK/few_label/few_label.md" "$KIT_WORK/few_label/few_label.png" "$OUT/"
}
export -f stage_bench stage_data stage_pretrain stage_few

# --- bookkeeping ----------------------------------------------------------------------------------------------
write_summary() {  # $OUT/summary.json and $OUT/logs.tar.gz, after every stage
  tar -czf "$OUT/logs.tar.gz" -C "$KIT_WORK" logs status.tsv 2>/dev/null
  "$KIT_PY" - "$STATUS" "$OUT" "$KIT_WORK" <<'PY' || echo "(summary.json not written)"
import csv, json, os, sys, time
status, out, work = sys.argv[1:]
summary = {"dry_run": os.environ.get("DRY") == "1", "elapsed_s": None, "stages": [],
           "knobs": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KIT_") and k not in ("KIT_T0",)}}
for row in csv.reader(open(status), delimiter="\t"):
    summary["stages"].append({"stage": row[0], "rc": int(row[1]), "seconds": int(row[2]), "note": row[3]})
for name in ("versions.json", "pretrain.json", "bench_train_gpu.json"):
    for folder in (out, work):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            summary[name.removesuffix(".json")] = json.load(open(path))
            break
for name in sorted(os.listdir(out)):
    if name.startswith("bench_train_gpu_") and name.endswith(".json"):
        summary[name.removesuffix(".json")] = json.load(open(os.path.join(out, name)))
if os.path.isfile(os.path.join(out, "few_label.csv")):
    summary["few_label"] = list(csv.DictReader(open(os.path.join(out, "few_label.csv"))))
summary["elapsed_s"] = int(time.time()) - int(os.environ["KIT_T0"])
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
}

run_stage() {  # run_stage NAME LIMIT_S: stage_NAME under timeout (capped by the deadline), logged, recorded
  local name=$1 limit=$2 rem
  rem=$(( $(left) - 5 ))
  (( limit > rem )) && limit=$rem
  if (( limit < 20 )); then
    banner "stage $name: SKIPPED (deadline: $(left) s left)"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped: deadline" >>"$STATUS"; write_summary; return 124
  fi
  banner "stage $name (limit ${limit} s)"
  local t=$(date +%s)
  timeout -k 15 "$limit" bash -c "set -u -o pipefail; stage_$name" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]} note=ok
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit} s"
  (( rc == 2 )) && note="partial (see its log)"
  (( rc != 0 && rc != 2 && rc != 124 && rc != 137 )) && note="failed"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$note" >>"$STATUS"
  banner "stage $name: $note (rc $rc, $(( $(date +%s) - t )) s)"
  write_summary
  return "$rc"
}

# --- setup ----------------------------------------------------------------------------------------------------
banner "GPU kit: setup (dry run: $DRY; device $KIT_DEVICE; work $KIT_WORK; out $OUT; deadline ${KIT_DEADLINE_S} s)"
t=$(date +%s)
{
  if [[ -n "$KIT_SITE" ]]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "ERROR: no .whl/*.whl: run 'bash benchmarks/gpu/fetch_wheels.sh' here and pass carry=[\".whl\"]"
      exit 1
    fi
    echo "installing $(ls .whl/*.whl | wc -l) wheels into $KIT_SITE"
    timeout 120 "$KIT_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$KIT_SITE" .whl/*.whl >"$KIT_WORK/pip.log" 2>&1
    prc=$?
    grep -v "Running pip as the 'root' user" "$KIT_WORK/pip.log"
    exit $prc
  fi
} 2>&1 | tee "$LOGS/setup.log"
[[ ${PIPESTATUS[0]} == 0 ]] || { printf 'setup\t1\t0\tno wheels\n' >>"$STATUS"; write_summary; exit 1; }
export PYTHONPATH="${KIT_SITE:+$KIT_SITE:}$ROOT${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "python: $KIT_PY; PYTHONPATH=$PYTHONPATH; cores $(nproc); $(free -g 2>/dev/null | awk '/Mem:/{print "memory " $2 " GiB"}')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw --format=csv
  else echo "(no nvidia-smi)"; fi
  timeout 180 "$KIT_PY" - "$KIT_WORK/versions.json" <<'PY'
import importlib, importlib.util, json, platform, sys, time
t = time.perf_counter()
# Everything the stages import, so a missing module fails here in seconds, not minutes in.
for name in ("xrayops.cli", "xrayops.data.synth", "xrayops.ingest", "xrayops.train.pretrain", "xrayops.models.ssl",
             "xrayops.train.finetune", "xrayops.monitor.label_audit", "xrayops.data.truth", "sklearn.linear_model",
             "sklearn.pipeline", "sklearn.preprocessing", "matplotlib.figure", "pyarrow.parquet", "openjpeg", "rle"):
    importlib.import_module(name)
for script in ("benchmarks/bench_train.py", "benchmarks/few_label.py"):  # their imports, not their main()
    spec = importlib.util.spec_from_file_location(script.split("/")[-1][:-3], script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
from pydicom.pixels import get_decoder
from pydicom.pixels.encoders import JPEG2000LosslessEncoder, RLELosslessEncoder
from pydicom.uid import JPEG2000Lossless, RLELossless
plugins = {"encode_j2k": JPEG2000LosslessEncoder.available_plugins, "encode_rle": RLELosslessEncoder.available_plugins,
           "decode_j2k": get_decoder(JPEG2000Lossless).available_plugins,
           "decode_rle": get_decoder(RLELossless).available_plugins}
assert "pylibjpeg" in plugins["encode_j2k"] and "pylibjpeg" in plugins["encode_rle"], plugins
import torch
from importlib.metadata import version
versions = {"python": platform.python_version()}
for dist in ("torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "pyarrow", "pillow",
             "pydicom", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pydantic", "pydantic-core", "pydantic-settings",
             "typing-extensions", "typer", "click", "rich", "structlog", "lightly", "pyyaml"):
    try:
        versions[dist] = version(dist)
    except Exception as exc:  # report, do not stop: the stage that needs it will
        versions[dist] = f"MISSING ({exc})"
versions["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    versions["gpu"] = torch.cuda.get_device_name(0)
    versions["bf16"] = torch.cuda.is_bf16_supported()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize(); s = time.perf_counter(); (x @ x).sum().item()
    versions["first_matmul_s"] = round(time.perf_counter() - s, 3)
versions["pydicom_plugins"] = plugins
versions["import_check_s"] = round(time.perf_counter() - t, 1)
print(json.dumps(versions, indent=1))
json.dump(versions, open(sys.argv[1], "w"), indent=1)
PY
} 2>&1 | tee -a "$LOGS/setup.log"
rc=${PIPESTATUS[0]}
if [[ "$KIT_DEVICE" == cuda ]] && ! grep -q '"cuda_available": true' "$KIT_WORK/versions.json" 2>/dev/null; then
  echo "ERROR: KIT_DEVICE=cuda but torch sees no CUDA device"; rc=1
fi
printf 'setup\t%s\t%s\t%s\n' "$rc" "$(( $(date +%s) - t ))" "$([[ $rc == 0 ]] && echo ok || echo failed)" >>"$STATUS"
write_summary
if [[ $rc != 0 ]]; then banner "setup FAILED: nothing else can run"; exit 1; fi
banner "setup ok"

# --- stages ---------------------------------------------------------------------------------------------------
for stage in $KIT_STAGES; do
  case $stage in
    bench)    run_stage bench 200 ;;
    data)     run_stage data 240 ;;
    pretrain) if grep -q "^data	0" "$STATUS" || [[ " $KIT_STAGES " != *" data "* ]]; then
                run_stage pretrain $(( $(left) - 30 ))
              else banner "stage pretrain: SKIPPED (no data)"; printf 'pretrain\t1\t0\tskipped: no data\n' >>"$STATUS"; fi ;;
    few)      run_stage few $(( $(left) - 5 )) ;;
    *)        echo "unknown stage $stage" ;;
  esac
done

# --- summary --------------------------------------------------------------------------------------------------
write_summary
banner "GPU kit: done in $(( $(date +%s) - T0 )) s"
column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
for f in "$OUT"/bench_train_gpu*.json; do
  [[ -f $f ]] && "$KIT_PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: r[k] for k in ('device','precision','image_size','batch_size','workers','model_only_images_per_s','end_to_end_images_per_s','ratio')})" "$f"
done
[[ -f "$OUT/pretrain.json" ]] && "$KIT_PY" -c "import json; r=json.load(open('$OUT/pretrain.json')); l=r.get('losses') or [0]; print('pretrain:', r.get('epochs_completed'), 'epochs of', r.get('plan_epochs'), '| loss', round(l[0],3), '->', round(l[-1],3), '|', round(r.get('seconds',0)), 's | calib s/epoch', r.get('calibration_s_per_epoch'))"
[[ -f "$OUT/few_label.md" ]] && cat "$OUT/few_label.md"
echo "files in \$OUT ($OUT):"; ls -l "$OUT"
awk -F'\t' '$2 != 0 {bad = 1} END {exit bad}' "$STATUS"   # rc 0 only when every stage passed
