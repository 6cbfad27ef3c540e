#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the pure-Python packages benchmarks/gpu_pass.sh needs on a GPU machine
# without network whose Python 3.12 has torch, transformers, peft, accelerate, timm, safetensors, numpy,
# psutil, py-cpuinfo, msgpack and ninja, but not DeepSpeed or open_clip. Versions: constraints.txt.
#   benchmarks/gpu_wheels.sh [DIR]      (default DIR: .whl at the repository root)
# DIR/*.whl are installed by gpu_pass.sh; DIR/optional/*.whl (the locked transformers and its tokenizers)
# only where they import against the machine's own packages.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pip=${PIP:-python3 -m pip}
mkdir -p "$dir/optional"

locked() {  # NAME -> NAME==VERSION from constraints.txt
    local line
    line=$(grep -i -E "^$1==" constraints.txt) || { echo "gpu_wheels: $1 is not in constraints.txt" >&2; exit 1; }
    echo "$line"
}

download() {  # DEST NAME...: wheels for CPython 3.12 on x86_64 Linux, no dependencies
    local dest=$1
    shift
    local specs=()
    for name in "$@"; do specs+=("$(locked "$name")"); done
    $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dest" "${specs[@]}"
}

# DeepSpeed (sdist; built with its ops left to JIT, the wheel is pure Python) and what it imports
# beyond the machine's packages: hjson, einops, pydantic (+ its core and typing helpers).
DS_BUILD_OPS=0 $pip wheel -q --no-deps --no-build-isolation "$(locked deepspeed)" -w "$dir"
download "$dir" hjson einops pydantic pydantic_core annotated-types typing-inspection typing_extensions
# open_clip (the reference SigLipLoss) and its tokenizer's imports; peft at the locked version.
download "$dir" open_clip_torch ftfy wcwidth regex peft
# The locked transformers (the GPU ships an older 5.x) with the tokenizers it requires.
download "$dir/optional" transformers tokenizers
du -sh "$dir"
ls "$dir" "$dir/optional"
