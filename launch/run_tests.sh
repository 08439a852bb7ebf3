#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, then runs pytest on
# CPU with 8 fake devices (for the sharding tests) and a persistent JAX
# compilation cache, on PYTEST_WORKERS processes (default 2, one per core of
# the CI machine; tests are dominated by single-threaded XLA compiles).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
# libtpu (the `tpu` extra) goes beside .venv, not into it: with it installed, every
# jax start-up in .venv would probe for a TPU. tests/libtpu_env.py puts it on the
# path of the subprocesses that compile the train step for a TPU slice (in
# test_compile.py and test_launch.py). Where no wheel exists (libtpu is Linux-only),
# those tests are skipped and say why.
LIBTPU_PIN="$(grep -m1 '^libtpu==' constraints.txt)"
if [ ! -d ".libtpu/${LIBTPU_PIN/==/-}.dist-info" ]; then
  echo "[setup] installing $LIBTPU_PIN into .libtpu for the TPU compile test"
  rm -rf .libtpu
  .venv/bin/python -m pip install --quiet --no-deps --target .libtpu "$LIBTPU_PIN" \
    || echo "[setup] $LIBTPU_PIN did not install: the TPU compile test will be skipped"
fi
export MSLAM_LIBTPU_DIR="$PWD/.libtpu"
# espeak-ng speaks the corpus builder's synthetic speech; its tests
# (tests/test_corpus_builder.py) are skipped without it. Installed here only as
# root on Debian/Ubuntu (a CI machine); elsewhere a line says how.
if ! command -v espeak-ng > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "[setup] installing espeak-ng (apt-get) for the corpus builder's tests"
    { timeout 180 apt-get update -qq && timeout 180 apt-get install -y -qq espeak-ng; } \
      > /dev/null 2>&1 || echo "[setup] espeak-ng did not install: its tests will be skipped"
  else
    echo "[setup] no espeak-ng: the corpus builder's speech tests will be skipped" \
         "(sudo apt-get install espeak-ng)"
  fi
fi
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
export TF_CPP_MIN_LOG_LEVEL=2
# The host allocator for XLA:CPU's per-step temporary buffer, as the entry points
# use it (mimalloc where installed; MSLAM_HOST_MALLOC picks; mslam_jax/host_memory.py).
eval "$(.venv/bin/python -m mslam_jax.host_memory)"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
