#!/usr/bin/env bash
# Stops the EC2 server that start.sh started for <state-dir> (SIGTERM to its
# process group, SIGKILL after 10 s). tests/env/down.sh does the same for
# every <state-dir>/*.pid, so this is for using start.sh on its own.
set -euo pipefail
(($# == 1)) || {
	echo "usage: stop.sh <state-dir>" >&2
	exit 2
}
STATE=$(realpath -m "$1")
PIDF=$STATE/ec2.pid
[[ -s $PIDF ]] || exit 0
pid=$(<"$PIDF")
if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$STATE"; then
	kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		[[ -e /proc/$pid ]] || break
		[[ $(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
		sleep 0.1
	done
	[[ -e /proc/$pid ]] && kill -KILL -- "-$pid" 2>/dev/null || true
fi
rm -f "$PIDF" "$STATE/ec2.port"
