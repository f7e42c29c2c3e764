#!/usr/bin/env bash
# A GPU node that has torch and no internet (most clusters' compute nodes): carry the project's other packages over
# as wheels, install them without an index, and check them against the node's own torch.
#
#   1. on a connected machine, in the project's environment (pip install -r requirements.txt):
#        bash offline_node.sh wheels DIR NODE_TORCH [NODE_PYTHON]   e.g.  wheels wheelhouse 2.11.0 3.12
#      every package of this environment except torch and its CUDA libraries, as x86-64 Linux wheels for the node's
#      Python, plus the torchvision built for the node's torch (torch 2.N pairs with torchvision 0.N+15).
#   2. copy DIR and this folder to the node, then there:
#        bash offline_node.sh install DIR      pip install --no-index from DIR; the node's torch stays as it is
#        bash offline_node.sh check            versions, pip check, and one tiny training step and the GPU check's
#                                              stages on the GPU with tiny models (a minute): then bench.py --gpu-check
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

usage() { echo "usage: bash offline_node.sh wheels DIR NODE_TORCH [NODE_PYTHON] | install DIR | check" >&2; exit 2; }

wheels() {
    local dir=$1 torch=$2 python=${3:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
    [[ $torch =~ ^2\.([0-9]+)\. ]] || { echo "error: NODE_TORCH must look like 2.11.0 (got $torch)" >&2; exit 2; }
    local vision="torchvision==0.$((BASH_REMATCH[1] + 15)).*"
    mkdir -p "$dir"
    # The environment's own closure, pinned, without torch, torchvision and the CUDA wheels the node already has.
    $PY -m pip freeze --exclude-editable | grep -viE '^(torch|torchvision|triton|nvidia-|cuda-)' > "$dir/requirements-node.txt"
    echo "$vision" >> "$dir/requirements-node.txt"
    local platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    $PY -m pip download --no-deps --only-binary=:all: --python-version "$python" --implementation cp "${platforms[@]}" \
        -d "$dir" -r "$dir/requirements-node.txt"
    echo "wrote $(ls "$dir"/*.whl | wc -l) wheels to $dir for Python $python and torch $torch: copy it to the node"
}

install() {
    local dir=$1
    [[ -f $dir/requirements-node.txt ]] || { echo "error: $dir has no requirements-node.txt: make it with 'wheels'" >&2
                                             exit 2; }
    $PY -c 'import torch' 2>/dev/null || { echo "error: no torch on this node's $PY: load the cluster's torch module" \
                                                "or environment first" >&2; exit 2; }
    # --no-deps: the wheelhouse is the whole closure, and torch (which the resolver would want) is the node's own.
    $PY -m pip install --no-index --no-deps --find-links "$dir" -r "$dir/requirements-node.txt"
    check
}

check() {
    $PY - <<'EOF'
import importlib, re, sys
import torch
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.txt").read(), re.M))
for name, module in [("torch", "torch"), ("torchvision", "torchvision"), ("diffusers", "diffusers"),
                     ("transformers", "transformers"), ("open_clip_torch", "open_clip"), ("safetensors", "safetensors"),
                     ("numpy", "numpy")]:
    have = importlib.import_module(module).__version__  # 2.11.0+cu130: the local build tag is not the version
    print(f"{name} {have}" + ("" if have.split("+")[0] == pins.get(name) else f" (CI tested {pins.get(name)})"))
print(f"CUDA available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA GPU on this node")
EOF
    $PY -m pip check
    local out
    out=$(mktemp -d)
    $PY safediffusion_r1.py --tiny --steps 1 --device cuda --output-dir "$out" --run-name offline-check
    $PY bench.py --gpu-check --tiny --device cuda --out "$out/gpu_check_tiny.json"
    rm -rf "$out"
    echo "the node is ready: python bench.py --gpu-check (about 6 minutes) measures the real-size step"
}

case "${1:-}" in
    wheels) [[ $# -ge 3 ]] || usage; wheels "$2" "$3" "${4:-}" ;;
    install) [[ $# -eq 2 ]] || usage; install "$2" ;;
    check) check ;;
    *) usage ;;
esac
