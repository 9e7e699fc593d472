#!/usr/bin/env bash
# Runs the EC2 server's own tests (test_server.py) in the cached venv.
# They start a private server on a free port. Extra args go to pytest.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$(bash "$HERE/venv.sh")
cd "$HERE"
PYTHONDONTWRITEBYTECODE=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider test_server.py "$@"
