#!/usr/bin/env bash
# The speed tables of docs/speed.md, measured in one go on an idle CPU machine (about 20 minutes on 2 cores):
#
#     bash dev/speed_table.sh [OUT_DIR]        # default /tmp/gptlab_speed; prints Markdown tables
#
# For nanoGPT's baby GPT (synthetic tokens) and the `small` preset (real pipeline): gptlab with
# its defaults (automatic choices, gptlab/perf.py), then with each automatic choice switched
# off one at a time, against the PyTorch peers (transformers GPT-2 and a nanoGPT-style model),
# two runs each; a bfloat16 row on CPUs with AMX / AVX512-BF16; sampling against Hugging Face
# generate (batch 1 and 8); and the README quick start timed end to end. Every benchmark run is
# one JSON line in OUT_DIR/results.jsonl; the tables are made from that file.
# SPEED_TABLE_SMOKE=1 runs the same with tiny shapes and few steps (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-/tmp/gptlab_speed}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
START=$(date +%s)

BABY=(--config=configs/pretrain.py:shakespeare_char --synthetic --config.model.dtype=float32
      --config.model.dropout=0.0 --config.data.batch_size=16 --config.model.vocab_size=65)
SMALL=(--config=configs/pretrain.py:small)
BABY_STEPS=(--steps=8 --warmup=1 --blocks=2)  # 8 timed steps: MFU from a median of 8
SMALL_STEPS=(--steps=20 --warmup=3 --blocks=4)
QUICKSTART_STEPS=600
BABY_SAMPLE=()
SMALL_SAMPLE=(--sample_prompt_len=16 --sample_new_tokens=64)
if [[ "${SPEED_TABLE_SMOKE:-0}" == 1 ]]; then
  BABY=(--config=configs/pretrain.py:tiny --synthetic)
  SMALL=(--config=configs/pretrain.py:tiny)
  BABY_STEPS=(--steps=2 --warmup=1 --blocks=2)
  SMALL_STEPS=(--steps=2 --warmup=1 --blocks=2)
  QUICKSTART_STEPS=20
  BABY_SAMPLE=(--sample_new_tokens=32)  # tiny's context is 64
  SMALL_SAMPLE=(--sample_new_tokens=32)
fi

bench() {  # [BENCH_ENV=NAME=VALUE] bench SHAPES ROW [flags...]: one benchmark run, its JSON line tagged with the shapes and row
  local shapes=$1 row=$2; shift 2
  echo "[$(( $(date +%s) - START ))s] $shapes: $row" >&2
  local line
  if ! line=$(env ${BENCH_ENV:-} "$PY" -m experiments.benchmark "$@" 2>>"$OUT/log.txt"); then
    echo "speed_table.sh: the benchmark failed ($shapes: $row); the end of $OUT/log.txt says why" >&2
    exit 1
  fi
  "$PY" -c "import json,sys; r=json.loads(sys.stdin.read()); r.update(shapes='$shapes', row='$row'); print(json.dumps(r))" \
    <<< "$line" >> "$RESULTS"
}

# The matmul library the defaults do not pick on this CPU (perf.choose_cpu_matmuls: oneDNN on Intel, XLA's own elsewhere).
OTHER_MATMULS=$("$PY" -c "from gptlab import perf; print({'xla': 'onednn', 'onednn': 'xla'}[perf.choose_cpu_matmuls('cpu', 'jit')[0]])")

# The CPU peak behind MFU is measured once per machine and cached: measure it now, on the idle machine.
rm -f "${XDG_CACHE_HOME:-$HOME/.cache}/gptlab/cpu_peak_tflops.json"

for run in 1 2; do
  bench baby "defaults" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=torch
  bench baby "model.attention=explicit" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=nanogpt \
    --config.model.attention=explicit
  bench baby "model.dense_backward=xla" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=nanogpt \
    --config.model.dense_backward=xla
  bench baby "parallel.cpu_devices=1" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=nanogpt --config.parallel.cpu_devices=1
  bench baby "parallel.cpu_reuse_memory=False" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=nanogpt \
    --config.parallel.cpu_reuse_memory=False
  # glibc's default tcache (no restart, gptlab/heap.py): the automatic reuse is then undone at these shapes.
  BENCH_ENV=GLIBC_TUNABLES=glibc.malloc.tcache_count=7 bench baby "GLIBC_TUNABLES=glibc.malloc.tcache_count=7" \
    "${BABY[@]}" "${BABY_STEPS[@]}" --compare=nanogpt
  bench baby "parallel.cpu_matmuls=$OTHER_MATMULS" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=nanogpt \
    --config.parallel.cpu_matmuls=$OTHER_MATMULS
  bench small "defaults" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=torch
  bench small "model.attention=explicit" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=nanogpt \
    --config.model.attention=explicit
  bench small "model.dense_backward=xla" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=nanogpt \
    --config.model.dense_backward=xla
  bench small "parallel.cpu_devices=1" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=nanogpt \
    --config.parallel.cpu_devices=1
  bench small "parallel.cpu_reuse_memory=False" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=nanogpt \
    --config.parallel.cpu_reuse_memory=False
  bench small "parallel.cpu_matmuls=$OTHER_MATMULS" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=nanogpt \
    --config.parallel.cpu_matmuls=$OTHER_MATMULS
  bench small "data.prefetch=2" "${SMALL[@]}" "${SMALL_STEPS[@]}" --compare=nanogpt --config.data.prefetch=2
done
if grep -qE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then  # PyTorch peers in bfloat16 autocast
  bench baby "bfloat16" "${BABY[@]}" "${BABY_STEPS[@]}" --compare=torch --config.model.dtype=bfloat16
fi
bench baby "sampling" "${BABY[@]}" --sample_only --compare=torch "${BABY_SAMPLE[@]}"
bench small "sampling" "${SMALL[@]}" --sample_only --compare=torch "${SMALL_SAMPLE[@]}"

# The README quick start, end to end (start-up, data, compile, 600 steps, evaluations, checkpoints).
rm -rf "$OUT/quickstart"
QS_START=$SECONDS
"$PY" -m experiments.pretrain "${SMALL[@]}" --config.train.num_steps=$QUICKSTART_STEPS --workdir="$OUT/quickstart" \
  > "$OUT/quickstart.log" 2>&1
QS_SECONDS=$(( SECONDS - QS_START ))

"$PY" - "$RESULTS" "$QS_SECONDS" "$OUT/quickstart" <<'PYEOF'
import json, sys
from gptlab import tables
rows = [json.loads(line) for line in open(sys.argv[1])]
first = rows[0]
print(f"\nCPU: {first['cpu']}; peak {first['peak_tflops']:.3g} TFLOP/s ({first['peak_tflops_source']})")
print(f"auto choices: {first['auto']}\n")
mb = lambda v: "-" if v is None else f"{v / 2**20:,.0f}"
for shapes in ("baby", "small"):
    train = [r for r in rows if r["shapes"] == shapes and "tokens_per_s" in r]
    if not train:
        continue
    m = train[0]["model"]
    print(f"**{shapes}** ({m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} wide, context {m['block_size']}, "
          f"vocab {m['vocab_size']}, batch {train[0]['batch_size']}, {train[0]['data']})\n")
    table = []
    for r in train:
        get = lambda k, f="{:,.0f}": f.format(r[k]) if k in r else "-"
        table.append([r['row'], get('tokens_per_s'), get('torch_tokens_per_s'), get('nanogpt_tokens_per_s'),
                      get('ratio_vs_torch', '**{:.2f}**'), get('ratio_vs_nanogpt', '**{:.2f}**'),
                      get('ratio_vs_nanogpt_by_mean', '{:.2f}'), f"{r['mfu']:.3f}",
                      f"{mb(r.get('peak_rss_increase_bytes'))} / {mb(r.get('torch_peak_rss_increase_bytes'))} / "
                      f"{mb(r.get('nanogpt_peak_rss_increase_bytes'))}"])
    print("\n".join(tables.markdown(
        ["setting", "gptlab tokens/s", "transformers tokens/s", "nanoGPT tokens/s", "vs transformers", "vs nanoGPT",
         "vs nanoGPT, mean step", "MFU", "peak RSS MB gptlab / transformers / nanoGPT"], table, "lrrrrrrrl")))
    print()
    # MFU repeatability: the defaults' two runs, next to how much the peer's own speed moved between them.
    runs = [r for r in train if r["row"] == "defaults"]
    if len(runs) == 2:
        apart = lambda a, b: f"{abs(a - b) / max(a, b):.0%} apart"
        peer = [r.get("nanogpt_tokens_per_s") for r in runs]
        line = f"defaults, two runs: MFU {runs[0]['mfu']:.3f} and {runs[1]['mfu']:.3f} ({apart(runs[0]['mfu'], runs[1]['mfu'])})"
        if None not in peer:
            line += f"; the nanoGPT peer in the same runs: {peer[0]:,.0f} and {peer[1]:,.0f} tokens/s ({apart(*peer)})"
        print(line + "\n")
table = []
for r in rows:
    for key in sorted(k for k in r if k.startswith("sample_tokens_per_s_batch")):
        b = key.rsplit("batch", 1)[1]
        table.append([f"{r['shapes']} ({r['sample_prompt_len']} + {r['sample_new_tokens']} tokens)", b, f"{r[key]:,.0f}",
                      f"{r[f'hf_sample_tokens_per_s_batch{b}']:,.0f}", f"**{r[f'sample_ratio_vs_hf_batch{b}']:.2f}**"])
print("\n".join(tables.markdown(["sampling (greedy, cache)", "batch", "gptlab tokens/s", "HF generate tokens/s", "ratio"],
                               table, "lrrrr")))
result = json.load(open(f"{sys.argv[3]}/result.json"))
timing = result.get("timing", {})
print(f"\nquick start ({result.get('steps')} steps): {float(sys.argv[2]):.0f} s end to end (command start to exit), "
      f"{timing.get('wall_time_s', 0):.0f} s in the run; train loss {result.get('train_loss', float('nan')):.3f}, "
      f"eval loss {result.get('eval_loss', float('nan')):.3f}; {timing.get('tokens_per_sec', 0):,.0f} tokens/s at the end")
PYEOF
echo "total $(( $(date +%s) - START )) s; raw results in $RESULTS" >&2
