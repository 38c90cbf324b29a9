#!/usr/bin/env bash
# The Python package's tests: a virtualenv of their own under ${CARGO_TARGET_DIR:-target}/pyenv,
# `pip install ./python[test]` into it, the jobrelay binary the tests drive (cargo build, a
# no-op when it is up to date), mypy on the package, then pytest. Arguments go to pytest.
# Fails when a test fails; pytest finding no test at all (exit 5) is reported, not a failure.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"
venv="$target/pyenv"

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "python3 (3.9 or newer) is required for the Python tests" >&2
  exit 1
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
  || { echo "the Python package needs Python 3.9 or newer" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  # Debian's python3 has no venv module without python3-venv.
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    "$python" -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$repo/python[test]"

if [ -z "${JOBRELAY_BIN:-}" ] && command -v cargo >/dev/null 2>&1; then
  cargo build -q -p jobrelay
  export JOBRELAY_BIN="$target/debug/jobrelay"
fi

echo "== mypy (strict) on the jobrelay package"
(cd "$repo/python" && "$venv/bin/python" -m mypy)
echo "== pytest"
status=0
(cd "$repo/python" && "$venv/bin/python" -m pytest "$@") || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no test (exit 5): nothing failed"
  exit 0
fi
exit "$status"
