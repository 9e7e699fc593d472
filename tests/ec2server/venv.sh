#!/usr/bin/env bash
# Prints the path of a Python venv with tests/ec2server/requirements.txt
# installed, building it first if needed. Progress goes to stderr; only the
# path goes to stdout.
#
# The venv lives in the cache, keyed by a hash of requirements.txt (and of the
# Python version), so a second run takes milliseconds and editing
# requirements.txt makes a fresh one:
#   ${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/ec2-venv-<hash>
# Knobs: KILN_PYTHON (default python3; needs >= 3.9).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[kiln-ec2] %s\n' "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

PY=${KILN_PYTHON:-python3}
command -v "$PY" >/dev/null || die "$PY not found (set KILN_PYTHON)"
pyver=$("$PY" -c 'import sys; assert sys.version_info >= (3, 9), "need Python >= 3.9"; print(sys.version.split()[0])') ||
	die "$PY is not a usable Python >= 3.9"
hash=$({
	cat "$HERE/requirements.txt"
	echo "python $pyver"
} | sha256sum | cut -c1-16)
CACHE=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
VENV=$CACHE/ec2-venv-$hash

ready() { [[ -e $VENV/.kiln-ok ]] && "$VENV/bin/python" -c '' 2>/dev/null; }

if ! ready; then
	mkdir -p "$CACHE"
	exec 8>"$VENV.lock"
	flock 8 # one builder per venv; the others wait, then reuse it
	if ! ready; then
		t0=$(date +%s.%N)
		log "building $VENV (python $pyver) ..."
		rm -rf "$VENV"
		"$PY" -m venv "$VENV" >&2 || die "python -m venv failed (Debian: apt-get install python3-venv)"
		if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
			-r "$HERE/requirements.txt" >"$VENV.pip.log" 2>&1; then
			tail -20 "$VENV.pip.log" >&2
			rm -rf "$VENV"
			die "pip install failed (log: $VENV.pip.log)"
		fi
		touch "$VENV/.kiln-ok"
		log "venv built in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
	fi
	flock -u 8
fi
echo "$VENV"
