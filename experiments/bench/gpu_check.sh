#!/usr/bin/env bash
# Issue 6's GPU part in as few device calls as possible (device time is scarce: ~15 min a session).
#
# Here, once (the device machine reaches no registry; its image has torch, timm, transformers, tokenizers,
# safetensors, yaml, tqdm, matplotlib, scipy but not these):
#   bash experiments/bench/gpu_check.sh download        # ~4 MB of wheels into .whl/ (git-ignored via .git/info/exclude)
# Then one device call per stage list (each stage's output lands in $OUT/<stage>.log; JSON beside it):
#   run(command="bash experiments/bench/gpu_check.sh tests bench", carry=[".whl"], timeout_s=580)
#   run(command="bash experiments/bench/gpu_check.sh profile data", carry=[".whl"], timeout_s=400)
# Stages (H100 timings from 2026-11-24, the machine's start not included):
#   tests    tests/test_gpu.py (8 CUDA tests, ~2 min)
#   bench    b32 training eager + torch.compile for both libraries, --quick (~5 min: compiling is ~2 min a model)
#   profile  torch.profiler tables of the compiled b32 step for both libraries (what to optimise next)
#   data     the loader with 2 and 8 workers against the "main" model's GPU training rate (~1 min)
#   vit_s    experiments/emoji_vit_s_gpu.yaml (never run on a GPU yet) with a 4-minute budget, then its
#            report: $OUT gets the log, metrics.jsonl and report metrics (VIT_S_ARGS adds overrides)
#   full     the whole bench (train 2 rounds + compile, generation, data; ~8 min)
# 15 device minutes fit "tests bench" and "profile" (plus the machine's start); the rest in a later lease.
# pycocoevalcap's wheel is 104 MB (Java jars and METEOR's tables): only its Python scorers are carried
# (BLEU, ROUGE-L, CIDEr; the image has no Java, so the PTB tokenisation is mmstory's Python port and METEOR
# is skipped).
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7
        soundfile==0.14.0 cffi==2.1.1 pycparser==3.12"

if [ "${1:-}" = download ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
    # The device image's python3 is 3.12 (KINDS.md); every wheel is pure Python or manylinux x86_64.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS pycocoevalcap==1.2 || exit 1
    # BLEU, ROUGE-L and CIDEr only: the Java parts without their jars would hang waiting for a JVM that failed
    rm -rf .whl/lite && unzip -q .whl/pycocoevalcap-1.2-*.whl 'pycocoevalcap/bleu/*.py' \
        'pycocoevalcap/cider/*.py' 'pycocoevalcap/rouge/*.py' -d .whl/lite \
        && rm .whl/pycocoevalcap-1.2-*.whl && du -sh .whl
    exit
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site:$PWD/.whl/lite"
fi
{ date -u; nvidia-smi -L; python3 -c "import torch, open_clip, transformers; print('torch', torch.__version__,
  '| open_clip', open_clip.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.log"

status=0
for stage in "$@"; do
    start=$SECONDS
    case $stage in
        tests)   python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider ;;
        bench)   python3 experiments/bench/bench.py --device cuda --bf16 --compile --quick --parts train \
                     --out "$OUT/bench_train.json" ;;
        profile) python3 experiments/bench/bench.py --device cuda --bf16 --compile --profile b32 ;;
        data)    python3 experiments/bench/bench.py --device cuda --bf16 --quick --parts data --out "$OUT/bench_data.json" ;;
        vit_s)   python3 -m mmstory.cli train experiments/emoji_vit_s_gpu.yaml --max_minutes=4 --out_dir=/tmp/vit_s \
                     ${VIT_S_ARGS:-} && cp /tmp/vit_s/metrics.jsonl "$OUT/vit_s_metrics.jsonl" \
                     && cp /tmp/vit_s/report/metrics.json "$OUT/vit_s_report.json" ;;
        full)    python3 experiments/bench/bench.py --device cuda --bf16 --compile --out "$OUT/bench_full.json" ;;
        *)       echo "gpu_check: unknown stage '$stage' (download, tests, bench, profile, data, vit_s, full)" >&2; exit 2 ;;
    esac 2>&1 | tee "$OUT/$stage.log"
    rc=${PIPESTATUS[0]}
    echo "gpu_check: stage $stage exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/$stage.log"
    [ "$rc" = 0 ] || status=$rc
done
exit $status
