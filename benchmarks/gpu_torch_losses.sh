#!/usr/bin/env bash
# One-shot GPU run of benchmarks/torch_losses.py (bf16, fused sdpa attention and eager
# attention), from the repository root: `bash benchmarks/gpu_torch_losses.sh`.
# Prints nvidia-smi and the tables, and writes them to $OUT/torch_losses_gpu.md
# ($OUT defaults to results/). Takes under 4 minutes on one H100 (each run is capped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"
mkdir -p "$OUT"
REPORT="$OUT/torch_losses_gpu.md"

nvidia-smi || echo "nvidia-smi not available"
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
python -c "import transformers" 2>/dev/null || pip install --quiet "transformers>=4.40"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "# Torch losses on GPU ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo
} > "$REPORT"

run() {  # $1: title; remaining: options of torch_losses.py
  local title="$1"; shift
  echo "## $title" | tee -a "$REPORT"
  echo | tee -a "$REPORT"
  timeout 75 python benchmarks/torch_losses.py --device cuda "$@" --out "$OUT/_part.md" \
    > "$OUT/_log.txt" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    tee -a "$REPORT" < "$OUT/_part.md"
  else
    echo "failed (exit $rc):" | tee -a "$REPORT"
    tail -5 "$OUT/_log.txt" | sed 's/^/    /' | tee -a "$REPORT"
  fi
  echo | tee -a "$REPORT"
  rm -f "$OUT/_part.md" "$OUT/_log.txt"
}

run "Small GPT-2 (4 x 128), bf16, sdpa (fused) attention" --dtype bf16 --attn sdpa
run "Small GPT-2 (4 x 128), bf16, eager attention" --dtype bf16 --attn eager
run "GPT-2 small size (12 x 768, vocab 50257, 8 pairs x 256 tokens), bf16, sdpa" \
  --dtype bf16 --attn sdpa --layers 12 --width 768 --heads 12 --vocab 50257 --batch 8 \
  --length 256 --reps 10

# The trainer on CUDA: a saved GPT-2 (4 x 128) and a JSONL of token ids through
# `drdpo llm --model --data` with bf16, for DPO, KLDPO and WDPO (finite differences).
python - "$OUT" <<'PY'
import json, sys, torch
from pathlib import Path
from transformers import GPT2Config, GPT2LMHeadModel
out = Path(sys.argv[1]) / "_trainer"
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=128, n_layer=4, n_head=4)
                ).save_pretrained(out / "model")
g = torch.Generator().manual_seed(0)
with open(out / "data.jsonl", "w") as fh:
    for _ in range(256):
        fh.write(json.dumps({k: torch.randint(0, 512, (n,), generator=g).tolist()
                             for k, n in (("prompt", 16), ("chosen", 32), ("rejected", 32))}) + "\n")
PY
echo "## Trainer on CUDA (bf16): drdpo llm --model --data" | tee -a "$REPORT"
timeout 150 python -m experiments llm --model "$OUT/_trainer/model" --data "$OUT/_trainer/data.jsonl" \
  --methods dpo,kldpo,wdpo --steps 30 --batch-size 16 --bf16 --device cuda --no-progress \
  --out "$OUT/_trainer/res" > "$OUT/_log.txt" 2>&1
echo "exit $?" | tee -a "$REPORT"
tail -8 "$OUT/_log.txt" | tee -a "$REPORT"
for m in dpo kldpo wdpo; do
  f="$OUT/_trainer/res/llm_model/$m/metrics.csv"
  [ -f "$f" ] && { echo "$m: $(head -1 "$f")"; echo "$m first: $(sed -n 2p "$f")"; echo "$m last: $(tail -1 "$f")"; } | tee -a "$REPORT"
done
rm -rf "$OUT/_trainer" "$OUT/_log.txt"

echo "table written to $REPORT"
