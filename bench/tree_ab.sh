#!/usr/bin/env bash
# A/B of two source trees on the engine's decode step, on one machine, alternating runs
# (machines of one kind differ by a few percent; only same-machine pairs compare). Issue 18
# item 3: the commit before the tensor-parallel merge against the merge itself, e.g.
#   mkdir -p .devtree/pre .devtree/post
#   git archive f57dd22^1 engine bench | tar -x -C .devtree/pre
#   git archive f57dd22 engine bench | tar -x -C .devtree/post
#   bash bench/tree_ab.sh 2 "$OUT" .devtree/pre .devtree/post --decode-batches 1,64
# Logs LOG_DIR/tree-ab-{NAME}-{ROUND}.log (NAME: the tree's directory name) and prints the
# decode rows of each run.
set -uo pipefail
rounds=$1 log_dir=$2 tree_a=$3 tree_b=$4
shift 4
export PYTHONUNBUFFERED=1
for round in $(seq 1 "$rounds"); do
  for tree in "$tree_a" "$tree_b"; do
    name=$(basename "$tree")
    log="$log_dir/tree-ab-$name-$round.log"
    (cd "$tree" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m bench.engine_bench --model llama-3.1-8b \
      --prefill 1x64 --skip transformers,overlap,attention "$@") >"$log" 2>&1
    echo "== $name round $round ($(cd "$tree" && python3 -c 'import engine, os; print(os.path.dirname(engine.__file__))'))"
    grep -E "copy \(|decode: .*(step, CUDA graph|achieved)" "$log"
  done
done
