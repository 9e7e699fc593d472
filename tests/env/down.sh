#!/usr/bin/env bash
# Stops kiln's integration-test environment started by tests/env/up.sh: every
# server with a pid file in the state dir gets SIGTERM, then SIGKILL if it is
# still there after a few seconds. Removes the pid files, the apiserver's ready
# marker and env.sh. Keeps the rest of the state dir (logs) and the cached
# apiserver binary; `down.sh --purge` removes the state dir too.
#
# A cluster-mode node (cluster.sh) goes first: every Pod sandbox is removed
# through the CRI, then containerd stops, and what the node set up on the host
# (lo address, bridge, iptables chains, mounts, cgroups, sysctls) is undone.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=cluster.sh
source "$KILN_ENV_DIR/cluster.sh"

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

cluster_down
for f in "$STATE"/*.pid; do
	[[ -e $f ]] || continue
	name=$(basename "$f" .pid)
	stop_service "$name" 10
done
rm -f "$STATE/apiserver/ready" "$STATE/env.sh"
if [[ -n $purge ]]; then
	exec 9>&-
	# Not into a mount point that something failed to unmount.
	rm -rf --one-file-system "$STATE"
	log "removed $STATE"
fi
