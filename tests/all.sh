#!/usr/bin/env bash
# Runs every test: brings up the real test servers (tests/env/up.sh installs what
# they need), runs `cargo test` against them, and stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# As root (CI is), with the one-node cluster: tests/cluster.rs runs kiln as a Pod
# and must not skip (KILN_CLUSTER=0 opts out). Without root there is no node.
if [[ $(id -u) == 0 && ${KILN_CLUSTER:-1} == 1 ]]; then
	export KILN_CLUSTER=1 KILN_REQUIRE_CLUSTER=1
fi
bash tests/env/up.sh
# shellcheck disable=SC1091
. .kiln-test-env/env.sh
stop() { bash tests/env/down.sh >/dev/null 2>&1 || true; }
[[ ${KILN_KEEP_ENV:-} == 1 ]] || trap stop EXIT

cargo test --all-targets -- --nocapture --test-threads "${KILN_TEST_THREADS:-8}" 2>&1
