#!/usr/bin/env bash
# Creates .venv at the repository root when missing (or when setup.py or
# constraints.txt changed since it was made) and installs mslam_jax with the
# tested pins from constraints.txt. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp_of() { cat setup.py constraints.txt | sha256sum | cut -d' ' -f1; }
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ "$(cat .venv/.mslam_stamp 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "[setup] installing mslam_jax and its pinned dependencies (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
  stamp_of > .venv/.mslam_stamp
fi
