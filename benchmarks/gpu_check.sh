#!/usr/bin/env bash
# The whole pipeline on a GPU machine, with no download and no builtin teacher: prints the teacher stage's
# tokens/s, the training tokens/s with and without the read-ahead, and the share of each step the training
# thread spent waiting on the store.
#
#   bash benchmarks/gpu_check.sh                 # every visible GPU: torchrun --nproc_per_node=<#GPUs>
#   bash benchmarks/gpu_check.sh --cpu-smoke     # tiny sizes on the CPU (checks the script itself, ~2 min)
#
# What it runs, in a fresh folder ($GPU_CHECK_DIR, default a temp folder; removed at the end unless
# GPU_CHECK_KEEP=1):
#   1. a random Llama teacher from a config (d=2048, V=128,256, 4 layers, bf16 safetensors via
#      save_pretrained; --cpu-smoke: d=64, V=4,096, 2 layers) and a byte-level BPE tokenizer trained on the
#      local corpus (CPython's pydoc topics, builtin:pydoc: no network);
#   2. distill-pipe prepare (seq_len 1024; smoke 64);
#   3. the teacher stage under torchrun (bf16; FSDP2 over NCCL when there are 2+ GPUs, one process on one
#      GPU), codec factored;
#   4. two students (the teacher's config at d=1024, 4 layers, random init; 326M parameters, most of them the
#      128k-token embeddings; bf16 autocast) for a few steps each: train.prefetch 2 and 0;
#   5. distill-pipe evaluate (bounded by evaluate.max_sequences, on the GPU in bf16).
# Needs the repository on PYTHONPATH (or installed) and torch, transformers, tokenizers, zarr, numcodecs,
# google-crc32c, typer, tqdm, pyyaml, matplotlib.
set -euo pipefail

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg; use --cpu-smoke or nothing" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
W="${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$W"
cleanup() { if [ "${GPU_CHECK_KEEP:-0}" != 1 ]; then rm -rf "$W"; fi; }
trap cleanup EXIT

if [ "$SMOKE" = 1 ]; then
  NPROC=1
  export CUDA_VISIBLE_DEVICES=""
  D=64; V=4096; LAYERS=2; FFN=128; HEADS=4; KV=2; TOKVOCAB=512; SEQ=64; TRAIN_TOK=8192; VAL_TOK=1024
  TBATCH=4; BATCH=2; STEPS=4; EVAL_SEQ=4; DTYPE=float32; SD=32; SFFN=64; SHEADS=4; SKV=2
else
  NPROC="$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
  D=2048; V=128256; LAYERS=4; FFN=8192; HEADS=16; KV=8; TOKVOCAB=8192; SEQ=1024; TRAIN_TOK=131072
  VAL_TOK=16384; TBATCH=8; BATCH=8; STEPS=24; EVAL_SEQ=16; DTYPE=bfloat16; SD=1024; SFFN=4096; SHEADS=8; SKV=4
fi
echo "gpu_check: work folder $W, $NPROC process(es), teacher d=$D V=$V layers=$LAYERS, seq_len $SEQ"

# 1. random teacher + local tokenizer ---------------------------------------------------------------------
"$PY" - "$W/teacher" "$D" "$V" "$LAYERS" "$FFN" "$HEADS" "$KV" "$TOKVOCAB" <<'EOF'
import sys, time
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out, d, V, layers, ffn, heads, kv, tok_vocab = sys.argv[1], *map(int, sys.argv[2:])
t0 = time.perf_counter()
tk = Tokenizer(models.BPE())
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tk.train_from_iterator([v for _, v in sorted(topics.items())],
                       trainers.BpeTrainer(vocab_size=tok_vocab, special_tokens=["<|endoftext|>"],
                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                  tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
with torch.device(device):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
tok.save_pretrained(out)
n = sum(p.numel() for p in model.parameters())
print(f"gpu_check: random Llama teacher {n / 1e6:.0f}M parameters, tokenizer {len(tok)} tokens -> {out} "
      f"({time.perf_counter() - t0:.0f} s)")
EOF

cat > "$W/params.yaml" <<EOF
paths:
  tokens: $W/tokens.zarr
  logits: $W/logits.zarr
  manifest: $W/manifest.json
  train: $W/train
  evaluate: $W/evaluate
data:
  source: builtin:pydoc
  seq_len: $SEQ
  validation_fraction: 0.1
  max_train_tokens: $TRAIN_TOK
  max_validation_tokens: $VAL_TOK
teacher:
  model: $W/teacher
  dtype: bfloat16
teacher_logits:
  batch_size: $TBATCH
  codec: factored
  shard_size: 16
train:
  batch_size: $BATCH
  max_steps: $STEPS
  warmup_steps: 2
  eval_steps: 1000
  save_steps: 1000
  keep_last: 1
  alpha: 0.5
  temperature: 2.0
  dtype: $DTYPE
  calibration_tokens: 64
  max_eval_sequences: 8
students:
  prefetch2:
    init: &student
      config: {hidden_size: $SD, intermediate_size: $SFFN, num_hidden_layers: 4, num_attention_heads: $SHEADS,
               num_key_value_heads: $SKV}
    prefetch: 2
  prefetch0:
    init: *student
    prefetch: 0
evaluate:
  batch_size: 4
  max_sequences: $EVAL_SEQ
EOF

run() { echo "+ $*"; "$@"; }
DP=("$PY" -m distill_pipe)
TR=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m distill_pipe)  # = torchrun

# 2-5. the stages -----------------------------------------------------------------------------------------
run "${DP[@]}" prepare --params "$W/params.yaml" 2>&1 | tail -n 3
T0=$(date +%s.%N)
run "${TR[@]}" teacher-logits --params "$W/params.yaml" 2>&1 | tee "$W/teacher.log" | { grep -v "it/s\]\|tok/s\]" || true; } | tail -n 4
T1=$(date +%s.%N)
for s in prefetch2 prefetch0; do
  run "${TR[@]}" train --student "$s" --params "$W/params.yaml" 2>&1 | tail -n 2
done
T2=$(date +%s.%N)
run "${DP[@]}" evaluate --params "$W/params.yaml" 2>&1 | tail -n 2
T3=$(date +%s.%N)

# summary ---------------------------------------------------------------------------------------------------
"$PY" - "$W" "$T0" "$T1" "$T2" "$T3" <<'EOF'
import json, re, sys
from pathlib import Path
import torch
from distill_pipe.store import open_store

w, t0, t1, t2, t3 = Path(sys.argv[1]), *map(float, sys.argv[2:])
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
store = open_store(w / "logits.zarr")
n_tok = sum(store.num_sequences(s) for s in store.splits) * store.seq_len
m = re.findall(r"computed (\d+) tokens in ([\d.]+) s \((\d+) tokens/s on this rank\)", (w / "teacher.log").read_text())
print(f"\n==== gpu_check on {dev}, torch {torch.__version__} ====")
print(f"teacher stage: {n_tok:,} tokens, codec {store.codec}, d={store.hidden_size}, V={store.vocab_size}: "
      + (f"{int(m[-1][2]):,} tokens/s per rank (forward + encode + write); " if m else "")
      + f"stage wall {t1 - t0:.0f} s incl. start-up and model load ({n_tok / (t1 - t0):,.0f} tokens/s)")
for s in ("prefetch2", "prefetch0"):
    r = json.loads((w / "train" / s / "metrics.json").read_text())
    share = r.get("data_wait_seconds", 0.0) / max(r["train_seconds"], 1e-9)
    print(f"train {s}: {r['steps']} steps x {r['global_batch']} x {store.seq_len} tokens, "
          f"{r['tokens_per_s']:,.0f} tokens/s, waiting on the store {share:.1%} of step time "
          f"({r.get('data_wait_seconds', 0.0):.2f} of {r['train_seconds']:.2f} s)")
ev = json.loads((w / "evaluate" / "metrics.json").read_text())
print(f"evaluate: {ev['teacher']['tokens']:,} targets per model, {len(ev)} models, wall {t3 - t2:.0f} s; "
      + ", ".join(f"{k} ppl {v['perplexity']:.1f}" for k, v in ev.items()))
print(f"total wall {t3 - t0:.0f} s after the teacher was built")
EOF
