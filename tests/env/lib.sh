# Shared helpers for tests/env/up.sh and tests/env/down.sh. Sourced, not run.
# shellcheck shell=bash

KILN_ENV_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KILN_REPO_ROOT=$(cd "$KILN_ENV_DIR/../.." && pwd)
# The state dir: everything the running environment owns lives here.
STATE=$(realpath -m "${KILN_TEST_ENV:-$KILN_REPO_ROOT/.kiln-test-env}")

log() { printf '[kiln-env] %s\n' "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

now() { date +%s.%N; }
# since START: seconds elapsed, one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# chart_value FILE KEY [PARENT]: the plain scalar KEY (top level, or under the
# top-level PARENT) of a YAML file such as the chart's values.yaml, quotes removed.
chart_value() {
	awk -v key="$2" -v parent="${3:-}" '
		/^[^ #]/ { top = $1; sub(/:$/, "", top) }
		{ line = $0; sub(/#.*/, "", line) }
		(parent == "" && line ~ "^" key ":") || (parent != "" && top == parent && line ~ "^  " key ":") {
			sub("^ *" key ": *", "", line); gsub(/^["'\'']|["'\''] *$|[ \t]+$/, "", line); print line; exit
		}' "$1"
}

# chart_ref SECTION: the chart's default reference of an image section (image for
# kiln's, runner for the runner's): SECTION.repository:SECTION.tag, the tag
# defaulting to the chart's appVersion.
chart_ref() {
	local values=$KILN_REPO_ROOT/charts/kiln/values.yaml repository tag
	repository=$(chart_value "$values" repository "$1")
	tag=$(chart_value "$values" tag "$1")
	[[ -n $tag ]] || tag=$(chart_value "$KILN_REPO_ROOT/charts/kiln/Chart.yaml" appVersion)
	[[ -n $repository && -n $tag ]] || die "cannot read $1.repository / $1.tag / appVersion from charts/kiln"
	echo "$repository:$tag"
}

# proc_gone PID: true if PID is gone or a zombie.
proc_gone() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
	stat=${stat##*) }
	[[ ${stat%% *} == Z ]]
}

# started_before PID FILE: true if process PID started no later than FILE was
# last written (to the precision of /proc/stat's btime). A PID recycled by an
# unrelated process, or seen again after a reboot, started later than that.
started_before() {
	local stat f btime ticks
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	read -ra f <<<"$stat" # f[0] is field 3 (state); starttime is field 22
	btime=$(awk '$1 == "btime" { print $2 }' /proc/stat)
	ticks=$(getconf CLK_TCK 2>/dev/null || echo 100)
	awk -v b="$btime" -v s="${f[19]}" -v t="$ticks" -v m="$(stat -c %Y "$2")" \
		'BEGIN { exit !(b + s / t <= m + 2) }'
}

# pid_of NAME: prints the PID in $STATE/NAME.pid if that process is alive and
# is the one the file was written for (see started_before); fails otherwise.
# Works for any server that writes NAME.pid right after starting it.
pid_of() {
	local f="$STATE/$1.pid" pid
	[[ -s $f ]] || return 1
	pid=$(<"$f")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	proc_gone "$pid" && return 1
	started_before "$pid" "$f" || return 1
	echo "$pid"
}

# start_daemon NAME LOGFILE CMD ARGS...: runs CMD in its own session (so it
# outlives this script and the terminal, and down.sh can signal its whole
# process group), output to LOGFILE, PID in $STATE/NAME.pid.
start_daemon() {
	local name=$1 logf=$2 pidf="$STATE/$1.pid" i
	shift 2
	rm -f "$pidf"
	# The child writes its own PID, then execs: right whether or not setsid forks.
	# 9>&- 8>&-: the daemon must not inherit the state dir's lock (see lock_state)
	# or the machine's node lock (cluster.sh).
	setsid bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidf" "$@" \
		</dev/null >"$logf" 2>&1 9>&- 8>&- &
	for ((i = 0; i < 100; i++)); do
		[[ -s $pidf ]] && return 0
		sleep 0.05
	done
	die "$name did not start (see $logf)"
}

# stop_service NAME [TIMEOUT]: SIGTERM (to the process group, if the process
# leads one), then SIGKILL after TIMEOUT seconds (default 10); removes the
# pid file either way.
stop_service() {
	local name=$1 timeout=${2:-10} pid stat pgrp target i
	if pid=$(pid_of "$name"); then
		stat=$(cat "/proc/$pid/stat" 2>/dev/null || true)
		stat=${stat##*) }
		read -r _ _ pgrp _ <<<"$stat"
		target=$pid
		[[ $pgrp == "$pid" ]] && target=-$pid
		kill -TERM -- "$target" 2>/dev/null || true
		for ((i = 0; i < timeout * 10; i++)); do
			proc_gone "$pid" && break
			sleep 0.1
		done
		if ! proc_gone "$pid"; then
			log "$name (pid $pid) ignored SIGTERM for ${timeout}s: SIGKILL"
			kill -KILL -- "$target" 2>/dev/null || true
			for ((i = 0; i < 50; i++)); do
				proc_gone "$pid" && break
				sleep 0.1
			done
		fi
		log "stopped $name (pid $pid)"
	fi
	rm -f "$STATE/$name.pid"
}

# lock_state: one up.sh/down.sh at a time per state dir (fd 9 holds the lock).
lock_state() {
	command -v flock >/dev/null || return 0
	exec 9>"$STATE/.lock"
	flock -w 900 9 || die "another up.sh/down.sh holds $STATE/.lock"
}
