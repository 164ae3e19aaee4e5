#!/usr/bin/env bash
# Installs what orchestrate builds against: libtorch 2.11.0, taken from PyPI's
# torch==2.11.0 wheel, in a virtualenv kept per machine and keyed by the torch
# version, so fresh clones (CI's included) reuse it. Idempotent.
#
#   scripts/setup.sh            libtorch venv + .libtorch link
#   scripts/setup.sh --fixtures also diffusers/transformers, to regenerate
#                               tests/fixtures (never needed to build or test)
set -euo pipefail
TORCH_VERSION=2.11.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ORCHESTRATE_CACHE:-$HOME/.cache/orchestrate}"
VENV="$CACHE/torch-$TORCH_VERSION"
PY="${PYTHON:-python3}"

mkdir -p "$CACHE"
# The marker is written only after a complete install, so an interrupted
# setup never leaves a half-venv that looks done.
if [[ ! -f "$VENV/.orchestrate-complete" ]]; then
    echo "setup: creating $VENV with torch==$TORCH_VERSION (about 5 GB with its CUDA libraries)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --no-input "torch==$TORCH_VERSION"
    "$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__"
    touch "$VENV/.orchestrate-complete"
fi

TORCH_DIR="$("$VENV/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
ln -sfn "$VENV" "$ROOT/.venv"
ln -sfn "$TORCH_DIR" "$ROOT/.libtorch"
echo "setup: libtorch $TORCH_VERSION at $TORCH_DIR"

# tests/hub.rs compares the Hugging Face cache our downloads write with the one
# Python's huggingface_hub writes (the version pinned in tests/fixtures/requirements.txt).
HF_HUB_VERSION=2.4.0
if ! "$VENV/bin/python" -c "import sys, huggingface_hub; sys.exit(huggingface_hub.__version__ != '$HF_HUB_VERSION')" 2>/dev/null; then
    echo "setup: installing huggingface_hub==$HF_HUB_VERSION into $VENV (tests/hub.rs)"
    if ! "$VENV/bin/pip" install --quiet --no-input "huggingface_hub==$HF_HUB_VERSION"; then
        echo "setup: WARNING: could not install huggingface_hub; tests/hub.rs's Python comparison fails under CI=true and skips otherwise" >&2
    fi
fi

# tests/report.rs renders report.html in headless Chromium (Debian's package).
# Only that test needs it, so a failed install warns instead of stopping setup;
# the test then fails under CI=true and skips with a message elsewhere.
if [[ ! -x /usr/bin/chromium ]]; then
    SUDO=""; [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
    echo "setup: installing Debian's chromium (headless rendering of report.html in tests)"
    if ! { $SUDO apt-get update -qq &&
           $SUDO env DEBIAN_FRONTEND=noninteractive \
               apt-get install -y -qq --no-install-recommends chromium; }; then
        echo "setup: WARNING: could not install chromium; tests/report.rs fails under CI=true and skips otherwise" >&2
    fi
fi

# tests/slurm.rs runs a one-node Slurm cluster (Debian's slurm-wlm and munge);
# its daemons run as root, so only a root setup installs them. A failed install
# warns: the test installs them itself, and fails under CI=true if it cannot.
if [[ "$(id -u)" -eq 0 ]] && ! command -v slurmctld >/dev/null; then
    echo "setup: installing Debian's slurm-wlm and munge (tests/slurm.rs)"
    if ! "$ROOT/scripts/slurm/local-cluster.sh" install; then
        echo "setup: WARNING: could not install slurm-wlm and munge; tests/slurm.rs fails under CI=true and skips otherwise" >&2
    fi
fi

if [[ "${1:-}" == "--fixtures" ]]; then
    "$VENV/bin/pip" install --quiet --no-input -r "$ROOT/tests/fixtures/requirements.txt"
    echo "setup: fixture requirements installed into $VENV"
fi
