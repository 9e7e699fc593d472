#!/usr/bin/env bash
# The benchmark, on an environment of its own (.kiln-bench-env: its own apiserver,
# EC2 server and an sshd with MaxStartups/MaxSessions raised for 500 concurrent
# builds), with the operator built in release mode. Results: bench/results/*.json.
#
#   bash bench/run.sh                      # every scenario (about 27 minutes)
#   KILN_BENCH=null:10,ebs-delays:1 bash bench/run.sh
#   KILN_BENCH=pipeline-source:100 KILN_BENCH_IDLE_SECONDS=60 bash bench/run.sh
#
# The idle-pipeline scenarios (pipeline-cron, pipeline-source) take their version-1
# builds plus a window of KILN_BENCH_IDLE_SECONDS (default 300) each.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export KILN_TEST_ENV=${KILN_BENCH_ENV:-$PWD/.kiln-bench-env}
export KILN_SSHD_MAX_STARTUPS=2000:30:4000 KILN_SSHD_MAX_SESSIONS=1000
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

bash tests/env/up.sh
# shellcheck disable=SC1091
. "$KILN_TEST_ENV/env.sh"
stop() { bash tests/env/down.sh >/dev/null 2>&1 || true; }
[[ ${KILN_KEEP_ENV:-} == 1 ]] || trap stop EXIT

cargo test --release --test bench -- --ignored --nocapture --test-threads 1 2>&1 |
	tee "$KILN_TEST_ENV/bench.log" | grep -v '^\s*$' | grep -Ev '"(p50|p90|mean)"'
# The README's tables, from every result in bench/results.
python3 bench/table.py bench/results
