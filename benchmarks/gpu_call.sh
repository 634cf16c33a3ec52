#!/usr/bin/env bash
# One device call: unpack the GPU bundle, build the random Llama-3.1-8B, then run
# the benchmark lines of a plan file in order, each in its own process (Unsloth
# patches transformers globally). Lines: `anchor VARIANT` runs ../shared's
# reference (carried in .gpu-bundle/), `train ARGS...` runs benchmarks/train_gpu.py,
# `baseline ARGS...` the same script of an earlier commit, exported to .baseline/
# (`mkdir .baseline && git archive COMMIT ml benchmarks | tar -x -C .baseline`, carried too),
# `bench SCRIPT ARGS...` another script in benchmarks/, `run CMD...` any command.
#   bash benchmarks/gpu_call.sh benchmarks/plans/regression_vs_baseline.txt   (carry: .gpu-bundle .baseline)
# Each line's output goes to $OUT/NN.log; RESULT lines are collected in $OUT/results.jsonl.
# The bundle is unpacked once per machine and its bytecode compiled then, as `pip install` does;
# later calls on the same warm machine find it. That machine's environment sets
# PYTHONDONTWRITEBYTECODE=1 and its image lacks the bytecode of some packages (numpy, jinja2,
# urllib3, ...), so without this every process compiled those and the project's modules from source
# (docs/benchmarks.md says what that cost): the image's packages are compiled once per machine
# too, and the project's code in each call (its tree is new each time). Files larger than one call
# may carry travel in pieces over several calls on one warm machine: each call's `.carry-*/` folders
# are gathered into /tmp/parts.
set -uo pipefail
plan=${1:?usage: gpu_call.sh PLAN}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -f /tmp/site/.unpacked ]; then
  t=$SECONDS; mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site
  cp .gpu-bundle/anchor_bench.py /tmp/ 2>/dev/null
  python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1; touch /tmp/site/.unpacked
  echo "bundle unpacked and compiled in $((SECONDS - t)) s"
fi
if [ ! -f /tmp/.image-compiled ]; then
  t=$SECONDS; python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    > /dev/null 2>&1; touch /tmp/.image-compiled
  echo "the image's packages compiled in $((SECONDS - t)) s"
fi
python3 -m compileall -q -j 0 ml benchmarks tests > /dev/null 2>&1
mkdir -p /tmp/parts; for d in .carry-*/; do [ -d "$d" ] && cp "$d"* /tmp/parts/; done; ls /tmp/parts
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
[ -f /tmp/l8b/config.json ] || python3 /tmp/anchor_bench.py make > "$OUT/make.log" 2>&1
n=0
while read -r kind rest; do
  [[ -z "$kind" || "$kind" == \#* ]] && continue
  n=$((n + 1)); log=$(printf '%s/%02d.log' "$OUT" "$n"); t=$SECONDS
  case "$kind" in
    anchor) python3 /tmp/anchor_bench.py $rest > "$log" 2>&1 ;;
    train) python3 benchmarks/train_gpu.py $rest > "$log" 2>&1 ;;
    baseline) (cd .baseline && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/train_gpu.py $rest) > "$log" 2>&1 ;;
    bench) python3 benchmarks/$rest > "$log" 2>&1 ;;
    run) bash -c "$rest" > "$log" 2>&1 ;;
    *) echo "unknown plan line: $kind $rest"; continue ;;
  esac
  rc=$?
  echo "[$n] $kind $rest: rc=$rc $((SECONDS - t))s"
  grep -h '^PROFILE ' "$log"
  grep -h '^RESULT ' "$log" | sed 's/^RESULT //' | tee -a "$OUT/results.jsonl" | cut -c1-400
  [[ $rc -ne 0 || "$kind" == run ]] && tail -5 "$log"
done < "$plan"
exit 0
