# Shared by recipes/*/run.sh: stage options, environment, logging. A script sets `exp=` and its defaults,
# then sources this with its arguments: `. recipes/common.sh "$@"`.
# Options: --stage N --stop-stage M (run stages N..M), --steps S, --num-train N (where the script uses them).
PY=${PY:-.venv/bin/python}
stage=0; stop_stage=100
while [ $# -gt 0 ]; do
  case $1 in
    --stage) stage=$2; shift 2;;
    --stop-stage) stop_stage=$2; shift 2;;
    --steps) steps=$2; shift 2;;
    --num-train) num_train=$2; shift 2;;
    *) echo "unknown option $1"; exit 2;;
  esac
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$exp"
log() { echo "[$(date +%H:%M:%S)] $*"; }
