#!/usr/bin/env bash
# Stops kiln's integration-test environment started by tests/env/up.sh: every
# server with a pid file in the state dir gets SIGTERM, then SIGKILL if it is
# still there after a few seconds. Removes the pid files, the apiserver's ready
# marker and env.sh. Keeps the rest of the state dir (logs) and the cached
# apiserver binary; `down.sh --purge` removes the state dir too.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=
case ${1:-} in
--purge) purge=1 ;;
"") ;;
*) die "usage: $0 [--purge]" ;;
esac

if [[ ! -d $STATE ]]; then
	log "nothing to stop ($STATE does not exist)"
	exit 0
fi
lock_state

for f in "$STATE"/*.pid; do
	[[ -e $f ]] || continue
	name=$(basename "$f" .pid)
	stop_service "$name" 10
done
rm -f "$STATE/apiserver/ready" "$STATE/env.sh"
if [[ -n $purge ]]; then
	exec 9>&-
	rm -rf "$STATE"
	log "removed $STATE"
fi
