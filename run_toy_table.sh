#!/usr/bin/env bash
# The SDD paper's nudity table in miniature: erase "red" from the toy model with every method (SD, SD+NEG, SLD
# weak/medium/strong/max, SEGA, ESD-u-1, ESD-x-1, ESD-x-3, SDD, and red+blue at once with ESD-x-3 and SDD), measure
# each on the same prompts and seeds, attack the fine-tuned ones. Rerunning resumes (finished methods are kept).
# Usage: bash run_toy_table.sh OUT [--quick] [--model TOY_PIPELINE] [more python -m utils.toy.table flags]
# Writes OUT/table.md (also printed), table.csv, table.png, samples.png. See docs/toy_table.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -lt 1 ] || { [[ "$1" == -* ]] && [[ "$1" != -h && "$1" != --help ]]; }; then
  echo "usage: bash run_toy_table.sh OUT [--quick] [--model TOY_PIPELINE] [python -m utils.toy.table flags]" >&2
  exit 2
fi
exec python -m utils.toy.table "$@"
