#!/usr/bin/env bash
# Starts kiln's test EC2 server (server.py: moto + kiln's extensions) in the
# background and prints, as the only line on stdout:
#   KILN_EC2_ENDPOINT=http://127.0.0.1:<port>
#
#   bash tests/ec2server/start.sh <state-dir> [server.py flags...]
#
# <state-dir> gets ec2.pid (the server's PID; it leads its own session, so
# the whole group can be signalled), ec2.port, ec2.log. Idempotent: if the
# server recorded there is alive and answers, it is reused (flags are then
# ignored; change delays at run time with POST /_kiln/delays).
#
# Knobs: KILN_EC2_PORT (default 0: any free port), KILN_EC2_ARGS (more
# server.py flags), KILN_EC2_TIMEOUT (seconds to wait, default 60), and
# venv.sh's KILN_PYTHON / KILN_CACHE_DIR. Stop it with stop.sh <state-dir>.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[kiln-ec2] %s\n' "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
(($# >= 1)) || die "usage: start.sh <state-dir> [server.py flags...]"
STATE=$(realpath -m "$1")
shift
mkdir -p "$STATE"
PIDF=$STATE/ec2.pid PORTF=$STATE/ec2.port LOGF=$STATE/ec2.log
TIMEOUT=${KILN_EC2_TIMEOUT:-60}
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }

exec 7>"$STATE/.ec2.lock"
flock 7 # one start.sh per state dir at a time

# our_pid: the PID in ec2.pid, if alive and really ours (its command line
# names this state dir, so a recycled PID is not mistaken for the server).
our_pid() {
	local pid stat
	[[ -s $PIDF ]] || return 1
	pid=$(<"$PIDF")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$STATE" || return 1
	echo "$pid"
}

# healthy PID: the port in ec2.port answers /_kiln/health as process PID.
healthy() {
	local port resp
	[[ -s $PORTF ]] || return 1
	port=$(<"$PORTF")
	[[ $port =~ ^[0-9]+$ ]] || return 1
	resp=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" &&
		printf "GET /_kiln/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && cat <&3' "$port" 2>/dev/null) ||
		return 1
	local want="\"pid\": $1"
	[[ $resp == "HTTP/1."?" 200"* && ($resp == *"$want,"* || $resp == *"$want"$'\n'*) ]]
}

announce() {
	echo "KILN_EC2_ENDPOINT=http://127.0.0.1:$(<"$PORTF")"
}

if pid=$(our_pid); then
	if healthy "$pid"; then
		log "reusing EC2 server pid $pid on port $(<"$PORTF")"
		announce
		exit 0
	fi
	log "EC2 server pid $pid is alive but does not answer: restarting it"
	kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		our_pid >/dev/null || break
		sleep 0.1
	done
	our_pid >/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
fi
rm -f "$PIDF" "$PORTF"

VENV=$(bash "$HERE/venv.sh")
log "venv ready after $(elapsed)"

# shellcheck disable=SC2206 # KILN_EC2_ARGS is word-split on purpose
extra=(${KILN_EC2_ARGS:-})
# The child closes every inherited fd above 2 (our lock, any caller's lock,
# pipes - a daemon holding them would block the next start/stop or a caller
# waiting for EOF), writes its own PID, then execs: right whether or not
# setsid forks.
# shellcheck disable=SC2016
setsid bash -c 'for fd in /proc/$$/fd/*; do fd=${fd##*/}; ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null; done
	echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$PIDF" \
	"$VENV/bin/python" -u "$HERE/server.py" --port "${KILN_EC2_PORT:-0}" --port-file "$PORTF" \
	"${extra[@]}" "$@" </dev/null >>"$LOGF" 2>&1 &

deadline=$((SECONDS + TIMEOUT))
while :; do
	if [[ -s $PIDF ]] && ! pid=$(our_pid); then
		tail -20 "$LOGF" >&2
		die "EC2 server exited during start-up (log: $LOGF)"
	fi
	if [[ -n ${pid:-} ]] && healthy "$pid"; then
		break
	fi
	((SECONDS < deadline)) || {
		tail -20 "$LOGF" >&2
		die "EC2 server not ready after ${TIMEOUT}s (log: $LOGF)"
	}
	sleep 0.1
done
log "EC2 server pid $pid ready on port $(<"$PORTF") in $(elapsed) (log: $LOGF)"
announce
