#!/usr/bin/env bash
# The GPU measurements quoted in the README, on one GPU, all steps or the named ones:
#
#     bash benchmarks/gpu.sh OUT_DIR [matcher_share throughput_bf16 frozen_cache throughput_compile default_job]
#
# the matcher's share of a training step, bf16 throughput against the peers (incl. DiT's 256x256 geometries), the
# stage-one feature cache at DiT-XL/2-256 geometry, then torch.compile and the README's default job with --bf16.
# Every step has its own time limit and writes its JSON (the default job its results, model card and preview) to
# OUT_DIR; suite.log there holds everything printed. A step that fails or runs out of time is logged with its exit
# status and the next one runs. On one H100 the first three took 17, about 50 and about 25 s; the last two have not
# finished there yet (compilation alone took longer than 90 s; the default job trained at about 7 steps/s of its 1750
# without dataloader workers), so they get limits that, all steps together, pass 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [STEP...]}
shift
wanted=" $* "
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [ "$wanted" = "  " ] || [[ "$wanted" == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, transformers, diffusers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| diffusers', diffusers.__version__, '| cuda', torch.cuda.is_available())"
    step matcher_share 40 python benchmarks/matcher_share.py
    step throughput_bf16 150 python benchmarks/throughput.py --device cuda --bf16 --no-memory --repeats 3 --warmup 1 \
        --geometries small S-256 XL-256 --json "$out/throughput_cuda_bf16.json"
    step frozen_cache 80 python benchmarks/frozen_cache.py --device cuda --bf16 --geometry XL-256 --images 16 \
        --epochs 3 --repeats 1 --json "$out/frozen_cache_cuda.json"
    step throughput_compile 150 python benchmarks/throughput.py --device cuda --bf16 --compile --no-memory \
        --geometries small --repeats 3 --warmup 1 --json "$out/throughput_cuda_bf16_compile.json"
    step default_job 300 python run_detection.py --output_dir /tmp/gpu-default-job --bf16 true \
        --dataloader_num_workers 4 --overwrite_output_dir true
    for file in all_results.json predictions_preview.png README.md; do
        cp "/tmp/gpu-default-job/$file" "$out/default_job_$file" 2>/dev/null
    done
} | tee "$out/suite.log"
