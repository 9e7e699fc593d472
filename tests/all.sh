#!/usr/bin/env bash
# Runs every test: brings up the real test servers (tests/env/up.sh installs what
# they need), runs `cargo test` against them, and stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash tests/env/up.sh
# shellcheck disable=SC1091
. .kiln-test-env/env.sh
stop() { bash tests/env/down.sh >/dev/null 2>&1 || true; }
[[ ${KILN_KEEP_ENV:-} == 1 ]] || trap stop EXIT

cargo test --all-targets -- --nocapture --test-threads "${KILN_TEST_THREADS:-8}" 2>&1
