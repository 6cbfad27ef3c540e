#!/usr/bin/env bash
# The GPU pass: every GPU benchmark in bf16 plus real-size runs, into one results table.
#   benchmarks/gpu_pass.sh [OUT]          (OUT default: $OUT, else runs/gpu_pass)
#   benchmarks/gpu_pass.sh --dry [OUT]    same steps at small shapes on CPU (checks the script end to end)
# GPU_PASS_BUDGET (seconds, default 420): every step's limit is cut to what is left of it, and a step
# with under 20 s left is skipped (recorded), so the pass ends within the budget and can be rerun once in
# a 15-minute GPU lease.
# Run from anywhere; it works in the repository root with PYTHONPATH=. (no installed entry points).
# Packages the machine lacks come from .whl/ (benchmarks/gpu_wheels.sh fills it; installed into /tmp/site;
# .whl/optional/ — the locked transformers — only where it imports against the machine's packages).
# Steps (each with a time limit; a failing step is recorded and the next one runs):
#   env          versions, GPU, the machine's bf16 matmul rate
#   sigmoid      chunked sigmoid loss vs direct vs open_clip SigLipLoss, N 32768, d 1024, bf16
#   sail_head    SAIL head training step at batch 8192 and the paper's 32768 (DINOv2-L + NV-Embed-v2 widths)
#   kuea_step    KUEA step, ViT-B/16 and ViT-L/14-336 students (random weights, cached target), batch 64:
#                bf16 with SDPA, eager attention, gradient checkpointing; torch.compile on ViT-B/16
#   kuea_run     `mllm-swap align kuea` with recipes/kuea_vitl14_336.yaml for 20 bf16 steps (random
#                CLIP-L/14-336 student and DINOv2-L target written first; target cache built by the run)
#   lora_step    LLaVA-1.5-7B shape (32 layers, random weights), LoRA r 128 under ZeRO-2, one GPU, batch 8
#                x (576 + 512) tokens: with gradient checkpointing (the recipe) and without
# Results: OUT/results.md and OUT/results.json (+ one .json/.md per step, logs in OUT/logs).
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ "${1:-}" == "--dry" ]]; then
    dry=1
    shift
fi
out=${1:-${OUT:-runs/gpu_pass}}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
: >"$out/status.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
start=$(date +%s)

if ((!dry)) && compgen -G ".whl/*.whl" >/dev/null; then  # a dry run uses this machine's packages
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    if compgen -G ".whl/optional/*.whl" >/dev/null; then
        $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-optional .whl/optional/*.whl
        if PYTHONPATH="/tmp/site-optional:$PYTHONPATH" $py -c "import transformers, tokenizers; from transformers import LlavaForConditionalGeneration" 2>"$out/logs/optional.log"; then
            export PYTHONPATH="/tmp/site-optional:$PYTHONPATH"
        else
            echo "gpu_pass: the locked transformers does not import here (see logs/optional.log); using the machine's"
        fi
    fi
fi

budget=${GPU_PASS_BUDGET:-$((dry ? 3600 : 420))}
step() {  # NAME LIMIT_S COMMAND...: run, log, record; never stops the pass
    local name=$1 limit=$2 t0 code=0 left
    shift 2
    t0=$(date +%s)
    left=$((budget - (t0 - start)))
    if ((left < 20)); then
        echo "skipped: ${left} s left of the ${budget} s budget" >"$out/logs/$name.log"
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$out/logs/$name.log" >>"$out/status.tsv"
        echo "!! $name skipped (budget spent)"
        return 0
    fi
    ((dry)) && limit=$((limit * 4))  # a shared CPU is slower at the small shapes than a GPU at the real ones
    ((limit <= left)) || limit=$left
    echo "== $name (limit ${limit}s, $((t0 - start)) s into the pass)"
    timeout --kill-after=10 "$limit" "$@" >"$out/logs/$name.log" 2>&1 || code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(($(date +%s) - t0))" "$out/logs/$name.log" >>"$out/status.tsv"
    tail -n 3 "$out/logs/$name.log"
    [[ $code == 0 ]] || echo "!! $name failed with exit code $code (recorded; continuing)"
}

if ((dry)); then  # small shapes, CPU: the same scripts and options
    dev=cpu; half=float32; bf16=fp32; nsig=1024; dsig=64; chunk=256; sail=tiny; kbatch=2; kshrink="--shrink 4 --layers 2"
    students=openai/clip-vit-base-patch16; lora="--layers 1 --vision-layers 1 --shrink 8 --batch-size 1 --text-tokens 16 --steps 2"
    wshrink="--shrink 4 --layers 2"; images=16; kset="train.batch_size=4"; sailflag=""
else
    dev=cuda; half=bfloat16; bf16=bf16; nsig=32768; dsig=1024; chunk=4096; sail=large,paper; kbatch=64; kshrink=""
    students=openai/clip-vit-base-patch16,openai/clip-vit-large-patch14-336
    lora="--layers 32 --vision-layers 24 --batch-size 8 --text-tokens 512 --steps 6"
    wshrink=""; images=256; kset="train.batch_size=64"; sailflag="--bf16"
fi

step env 60 $py -c "
import json, platform, sys, torch
sys.path.insert(0, 'benchmarks')
from common import datasheet_peak, matmul_tflops
env = {'python': platform.python_version(), 'torch': torch.__version__, 'device': '$dev'}
for name in ('transformers', 'peft', 'accelerate', 'deepspeed', 'open_clip', 'timm'):
    try:
        env[name] = __import__(name).__version__
    except Exception as err:
        env[name] = f'missing ({type(err).__name__})'
if '$dev' == 'cuda':
    env['gpu'] = torch.cuda.get_device_name()
    env['datasheet'] = datasheet_peak('cuda')
env['matmul_tflops_$half'] = round(matmul_tflops(dtype=torch.$half, device='$dev'), 2)
json.dump(env, open('$out/env.json', 'w'), indent=1)
print(env)
"
step sigmoid 100 $py benchmarks/bench_sigmoid_loss.py --device $dev --dtype $half --ns $nsig --d $dsig \
    --chunk $chunk --variants chunked,direct,open_clip --threads 0 --repeats 3 --out "$out/sigmoid_loss.json"
step sail_head 60 $py benchmarks/bench_sail_head.py --device $dev $sailflag --presets $sail --repeats 3 \
    --out "$out/sail_head.json"
step kuea_step 150 $py benchmarks/bench_kuea_step.py --device $dev --students $students --batch-size $kbatch \
    --variants $bf16+sdpa,$bf16+eager,$bf16+sdpa+ckpt --steps 4 --warmup 1 $kshrink --out "$out/kuea_step.json"
models=/tmp/gpu_pass_models run=/tmp/gpu_pass_kuea_run  # weights stay out of OUT
step kuea_models 90 $py benchmarks/random_weights.py "$models" $wshrink --images $images --image-size 384 \
    --models openai/clip-vit-large-patch14-336,facebook/dinov2-large
rm -rf "$run"
step kuea_run 180 $py -m mllm_swap align kuea --config recipes/kuea_vitl14_336.yaml --out "$run" \
    --set "student=$models/openai/clip-vit-large-patch14-336" --set "target=$models/facebook/dinov2-large" \
    --set "data.train=$models/images" --set train.steps=20 --set train.warmup=2 --set "$kset" \
    --set train.num_workers=4 --set train.save_every=0 --set train.log_every=1 --set eval.data=null \
    --set data.encode_batch_size=64
rm -rf "$models"
mkdir -p "$out/kuea_run"
cp "$run"/{metrics.jsonl,result.json,config.yaml,compat_report.json} "$out/kuea_run/" 2>/dev/null || true
rm -rf "$run"
step lora_step 200 $py benchmarks/bench_lora_step.py --device $dev $lora \
    --variants $bf16+sdpa+ckpt,$bf16+sdpa --out "$out/lora_step.json"
step kuea_compile 120 $py benchmarks/bench_kuea_step.py --device $dev --students openai/clip-vit-base-patch16 \
    --batch-size $kbatch --variants $bf16+sdpa+compile --steps 4 --warmup 2 $kshrink --out "$out/kuea_compile.json"
$py benchmarks/report.py "$out" --run "kuea_run=$out/kuea_run"
echo "gpu_pass: $(($(date +%s) - start)) s; results in $out/results.md"
