#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with torch, sam2 and mqsam2.
# sam2 1.1.0 ships as an sdist whose build imports torch, so torch goes in first and sam2 is built
# without isolation and without its CUDA extension (the extension only fills small mask holes).
# Usage: bash install.sh [--dev]      (--dev adds pytest and ruff)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel
# shellcheck disable=SC2086
pip install $TORCH_SPEC
.venv/bin/python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0
pip install -e ".${extras}"
echo "mqsam2 installed in .venv"
