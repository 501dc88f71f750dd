#!/usr/bin/env bash
# Re-resolves the locked installs from pyproject.toml's ranges (the CPU build of torch pinned by
# constraints-cpu.txt), newest versions allowed, with hashes:
#   requirements/cpu-dev.lock  what `bash install.sh --dev` installs (the toolkit + pytest)
#   requirements/cpu.lock      what `bash install.sh` installs: the same versions, without pytest
# Run it after changing a dependency range, or when scripts/test_latest.sh shows that the newest
# versions pass; then `rm -rf .venv && bash install.sh --dev`, the README's test command, and
# commit both files. Takes ~7 min (pip-tools hashes every file of every pinned release).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/python" -m pip --disable-pip-version-check -q install pip-tools==7.7.0
common=(--quiet --strip-extras --allow-unsafe --generate-hashes --no-emit-index-url --no-emit-find-links)
"$tools/bin/pip-compile" "${common[@]}" --upgrade --extra dev \
    -o requirements/cpu-dev.lock pyproject.toml constraints-cpu.txt
"$tools/bin/pip-compile" "${common[@]}" --upgrade \
    -o requirements/cpu.lock pyproject.toml constraints-cpu.txt requirements/runtime.in
