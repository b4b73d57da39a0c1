#!/usr/bin/env bash
# The device run of docs/benchmarks.md's "default mode" section: DiT-XL/2 in both modes, under autocast,
# with float8 caches; PixArt-alpha 2048 memory with float8 caches. Results under $OUT (or ./out).
# Each model's run is one process; Inductor's caches are shared between the settings of one model
# (--cache-dir), so compile times in these rows are warm where a setting compiles a graph an earlier one did.
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python benchmarks/run.py --models dit --cudagraphs both --repeats 3 --skip "eager|ratio 1.0" \
  --ungraphed preset --autocast "N=4" --cache-dtypes fp8 --cache-settings "N=4" --cache-dir /tmp/ic-dit \
  --out "$OUT/dit" 2>&1 | grep -v "^toca_fx: variant" | tee "$OUT/dit.log" | cut -c1-300
timeout 110 python benchmarks/run.py --models pixart2048 --cudagraphs off --repeats 2 --steps 8 --skip "eager|ratio 1.0|preset" \
  --cache-dtypes fp8 --cache-settings "N=4" --no-float32 --cache-dir /tmp/ic-px \
  --out "$OUT/p2048" 2>&1 | grep -v "^toca_fx: variant" | tee "$OUT/p2048.log" | cut -c1-300
cat "$OUT"/dit/benchmarks.md "$OUT"/p2048/benchmarks.md 2>/dev/null
