#!/usr/bin/env bash
# Install what is missing, then run the whole test suite; exits non-zero on any failure.
# Extra arguments go to pytest:  scripts/test.sh -k sanity -x
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"

cd "$REPO"
# Go is needed by tests/test_stubs.py (proto/generate.py --check).
export PATH="$PATH:/usr/local/go/bin"
exec "$REPO/.venv/bin/python" -m pytest tests -v -ra -p no:cacheprovider --durations=20 "$@"
