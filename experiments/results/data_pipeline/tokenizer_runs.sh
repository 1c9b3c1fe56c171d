#!/usr/bin/env bash
# One tiny mHC run (experiments/configs/tiny.py, 300 steps) per tokenizer kind on the
# bundled corpus; prints validation loss and bits per byte. From the repository root:
#   bash experiments/results/data_pipeline/tokenizer_runs.sh /tmp/tokruns 512
set -euo pipefail
out=${1:?usage: $0 OUT_DIR VOCAB}
vocab=${2:?usage: $0 OUT_DIR VOCAB}
mkdir -p "$out"
mapfile -t specs < <(python experiments/results/data_pipeline/make_tokenizers.py "$out/tok" "$vocab" \
  | grep -E "^(byte|sentencepiece:|hf:|tiktoken:)")
echo "| tokenizer | train tokens | val loss (nats/token) | val bits per byte | wall s |"
for spec in "${specs[@]}"; do
  name=${spec%%:*}
  python experiments/prepare_data.py --out_dir="$out/data_$name" --tokenizer="$spec" \
    > "$out/prepare_$name.log" 2>&1
  python experiments/train.py --config=experiments/configs/tiny.py \
    --config.data.path="$out/data_$name" --config.data.tokenizer="$spec" \
    --workdir="$out/run_$name" > "$out/train_$name.log" 2>&1
  read -r label tokens < <(python -c "import json, sys
m = json.load(open(sys.argv[1]))
print(m['tokenizer']['kind'] + ':' + str(m['tokenizer']['vocab_size']), m['splits']['train']['num_tokens'])" \
    "$out/data_$name/meta.json")
  line=$(grep '^Done' "$out/train_$name.log")
  loss=$(sed 's/.*val_loss=\([0-9.]*\).*/\1/' <<< "$line")
  bpb=$(sed 's/.*val_bits_per_byte=\([0-9.]*\).*/\1/' <<< "$line")
  wall=$(sed 's/.*wall_s=\([0-9.]*\).*/\1/' <<< "$line")
  echo "| $label | $tokens | $loss | $bpb | $wall |"
done
