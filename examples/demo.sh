#!/usr/bin/env bash
# One command, fresh machine: a real control plane, sshd and the local EC2 server
# (tests/env/up.sh), the CRD and RBAC, the operator, and examples/amazon-ebs.yaml
# followed step by step until the AMI exists. The last line printed is
#   AMI: ami-... (us-east-1), ami-... (eu-west-1)
# Then everything keeps running until Ctrl-C, which stops what this script
# started: the operator, and the servers if they were not already up.
#
# Knobs (all optional):
#   KILN_TEST_ENV         state dir of the servers (default <repo>/.kiln-test-env;
#                         servers already running there are reused and left running)
#   KILN_BIN              a built kiln binary (default: cargo build --bin kiln)
#   KILN_KUBECTL          kubectl to use (default: the one up.sh puts first on PATH)
#   KILN_DEMO_NAMESPACE   namespace of the demo build (default kiln-demo)
#   KILN_DEMO_EXIT=1      exit after printing the AMI instead of waiting for Ctrl-C
#   KILN_DEMO_TIMEOUT     seconds the build may take (default 600)
#   KILN_DEMO_MODE        host (default): the operator runs as a process here;
#                         cluster: as a Pod of the one-node cluster (root only,
#                         KILN_CLUSTER=1 of tests/env/up.sh), from its own image
#                         (tests/env/image.sh) installed by charts/kiln, and the
#                         build reaches the EC2 server and sshd from the Pod
set -euo pipefail
# Paths given relative to where the demo was started from.
[[ -z ${KILN_TEST_ENV:-} ]] || KILN_TEST_ENV=$(realpath -m "$KILN_TEST_ENV")
[[ -z ${KILN_BIN:-} ]] || KILN_BIN=$(realpath -m "$KILN_BIN")
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export KILN_TEST_ENV=${KILN_TEST_ENV:-$PWD/.kiln-test-env}
# shellcheck source-path=SCRIPTDIR/..
source tests/env/lib.sh # STATE (= KILN_TEST_ENV), pid_of, stop_service, lock_state
NS=${KILN_DEMO_NAMESPACE:-kiln-demo}
MODE=${KILN_DEMO_MODE:-host}
KILN_NS=$NS-kiln # cluster mode: the Helm release's namespace
HELM_RELEASE=""
CARGO_PID="" # the background `cargo build`, until it is waited for
NAME=demo
TIMEOUT=${KILN_DEMO_TIMEOUT:-600}
OP_PIDFILE=$STATE/demo-operator-$NS.pid # a *.pid: tests/env/down.sh stops it too
OP_KUBECONFIG=$STATE/demo-operator-$NS.kubeconfig
OP_LOG=$STATE/logs/demo-operator-$NS.log
SUMMARY=$STATE/demo-$NS.summary # the AMI line, or why the build failed

say() { printf '[demo] %s\n' "$*"; }
fail() {
	printf '[demo] ERROR: %s\n' "$*" >&2
	exit 1
}

# Which servers were already running, so that exactly the others are stopped.
declare -A BEFORE=()
if [[ -d $STATE ]]; then
	for f in "$STATE"/*.pid; do
		[[ -e $f ]] || continue
		n=$(basename "$f" .pid)
		[[ $n == demo-operator-* ]] && continue
		if p=$(pid_of "$n"); then BEFORE[$n]=$p; fi
	done
fi

OP_PID="" PROGRESS_PID=""
cleanup() {
	local rc=$? n p i ours=() all=1
	trap '' INT TERM # a second Ctrl-C does not interrupt the cleanup
	if [[ -n $PROGRESS_PID ]]; then
		kill -TERM "$PROGRESS_PID" 2>/dev/null || true
		wait "$PROGRESS_PID" 2>/dev/null || true
	fi
	if [[ -n $CARGO_PID ]]; then
		kill -TERM "$CARGO_PID" 2>/dev/null || true
		wait "$CARGO_PID" 2>/dev/null || true
	fi
	if [[ -n $HELM_RELEASE ]]; then
		helm uninstall "$HELM_RELEASE" -n "$KILN_NS" --wait >/dev/null 2>&1 || true
		"${KILN_KUBECTL:-kubectl}" delete namespace "$KILN_NS" --wait=false >/dev/null 2>&1 || true
		printf '[demo] uninstalled kiln (helm release %s in %s)\n' "$HELM_RELEASE" "$KILN_NS" >&2
	fi
	if [[ -n $OP_PID ]]; then
		kill -TERM "$OP_PID" 2>/dev/null || true
		for ((i = 0; i < 150; i++)); do
			proc_gone "$OP_PID" && break
			sleep 0.1
		done
		kill -KILL "$OP_PID" 2>/dev/null || true
		wait "$OP_PID" 2>/dev/null || true
		printf '[demo] stopped the operator (pid %s)\n' "$OP_PID" >&2
	fi
	rm -f "$OP_KUBECONFIG" "$OP_PIDFILE" "$SUMMARY"
	for f in "$STATE"/*.pid; do
		[[ -e $f ]] || continue
		n=$(basename "$f" .pid)
		[[ $n == demo-operator-* ]] && continue
		p=$(pid_of "$n") || continue
		if [[ ${BEFORE[$n]:-} == "$p" ]]; then all=; else ours+=("$n"); fi
	done
	if ((${#ours[@]})); then
		if [[ -n $all ]]; then
			printf '[demo] stopping the servers it started: %s\n' "${ours[*]}" >&2
			bash tests/env/down.sh
		else
			printf '[demo] stopping the servers it started (%s); the others were running before\n' "${ours[*]}" >&2
			(
				lock_state
				for n in "${ours[@]}"; do stop_service "$n"; done
			)
		fi
	elif ((${#BEFORE[@]})); then
		printf '[demo] the servers were running before the demo: left running (bash tests/env/down.sh stops them)\n' >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------- servers
# As root, up.sh's sshd logs in an unprivileged `kiln-build` user and reads its
# authorized keys in the state dir as that user: it must be able to enter the
# dir, which `mktemp -d` makes 0700.
mkdir -p "$STATE"
[[ $(id -u) != 0 ]] || chmod go+x "$STATE"
case $MODE in
host) ;;
cluster)
	[[ $(id -u) == 0 ]] || fail "KILN_DEMO_MODE=cluster needs root (the node runs containers with runc)"
	export KILN_CLUSTER=1
	;;
*) fail "KILN_DEMO_MODE=$MODE: host or cluster" ;;
esac
# kiln compiles while up.sh builds and starts the servers: most of a cold start is
# the two builds, and the Rust one has long stretches on one core.
CARGO_LOG=$STATE/demo-cargo-build.log
if [[ -z ${KILN_BIN:-} ]]; then
	mkdir -p "$STATE"
	cargo build --quiet --bin kiln --message-format=json-render-diagnostics >"$CARGO_LOG" 2>&1 &
	CARGO_PID=$!
fi
# The host mode does not use helm: up.sh need not build it.
[[ $MODE == cluster ]] || export KILN_ENV_NO_HELM=${KILN_ENV_NO_HELM:-1}
bash tests/env/up.sh
# shellcheck disable=SC1091
. "$STATE/env.sh"
[[ -n ${KILN_EC2_ENDPOINT:-} ]] || fail "KILN_EC2_ENDPOINT missing from $STATE/env.sh"
# Where the build's endpoint and SSH go: from this host, or from a Pod.
BUILD_EC2=$KILN_EC2_ENDPOINT BUILD_SSH_HOST=$KILN_SSH_HOST BUILD_SSH_PORT=$KILN_SSH_PORT
if [[ $MODE == cluster ]]; then
	BUILD_EC2=$KILN_POD_EC2_ENDPOINT BUILD_SSH_HOST=$KILN_POD_SSH_HOST BUILD_SSH_PORT=$KILN_POD_SSH_PORT
fi

# ------------------------------------------------------------------- kubectl
# env.sh puts up.sh's kubectl (the apiserver's version, built once) first on PATH.
KUBECTL=${KILN_KUBECTL:-kubectl}
command -v "$KUBECTL" >/dev/null || fail "no kubectl: tests/env/up.sh should have linked one into \$KILN_TEST_BIN"
k() { "$KUBECTL" "$@"; }

# ---------------------------------------------------------------------- kiln
if [[ -n $CARGO_PID ]]; then
	wait "$CARGO_PID" || { tail -30 "$CARGO_LOG" >&2; fail "cargo build --bin kiln failed (log: $CARGO_LOG)"; }
	CARGO_PID=""
	KILN_BIN=$(sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' "$CARGO_LOG" | tail -1)
fi
[[ -x $KILN_BIN ]] || fail "no kiln binary (KILN_BIN=$KILN_BIN)"

# --------------------------------------------------------- CRD, RBAC, namespace
k apply --server-side --force-conflicts -f crds/ >/dev/null
k apply --server-side --force-conflicts -k config/rbac >/dev/null
k wait --for=condition=Established crd/imagebuilds.kiln.dev --timeout=60s >/dev/null
k create namespace "$NS" --dry-run=client -o yaml | k apply -f - >/dev/null
k -n "$NS" create secret generic known-hosts --from-file=known_hosts="$KILN_SSH_KNOWN_HOSTS" \
	--dry-run=client -o yaml | k apply -f - >/dev/null
say "CRD and RBAC installed; namespace $NS"

if [[ $MODE == cluster ]]; then
	# kiln's image from this binary, into the node's containerd; the chart runs it.
	bash tests/env/image.sh --binary "$KILN_BIN" --import >/dev/null
	# Named for the namespace: the release's ClusterRole must not be config/rbac's `kiln`.
	helm upgrade --install "kiln-op-$NS" charts/kiln -n "$KILN_NS" --create-namespace \
		--set "watchNamespaces[0]=$NS" --set "aws.allowedEndpoints[0]=$BUILD_EC2" \
		--set log.format=text --wait --timeout 180s >/dev/null
	HELM_RELEASE=kiln-op-$NS
	mkdir -p "$STATE/logs"
	# The Pod's log, followed: it ends when the Pod does (the build follower's
	# "operator exited").
	k -n "$KILN_NS" logs -f "deploy/$HELM_RELEASE" >"$OP_LOG" 2>&1 &
	OP_PID=$!
	say "kiln runs as a Pod (helm release $HELM_RELEASE in $KILN_NS; log $OP_LOG)"
else
	# The operator runs as its ServiceAccount (config/rbac), watching the demo's namespace only.
	token=$(k -n kiln-system create token kiln --duration=24h)
	server=$(k config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
	ca=$(k config view --raw --minify --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
	(
		umask 077
		cat >"$OP_KUBECONFIG" <<-EOF
			apiVersion: v1
			kind: Config
			clusters: [{name: kiln-test, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
			users: [{name: kiln, user: {token: "$token"}}]
			contexts: [{name: kiln, context: {cluster: kiln-test, user: kiln, namespace: "$NS"}}]
			current-context: kiln
		EOF
	)
	mkdir -p "$STATE/logs"
	KILN_METRICS_ADDR=127.0.0.1:0 KILN_LOG=${KILN_LOG:-info} \
		"$KILN_BIN" run --namespace "$NS" --kubeconfig "$OP_KUBECONFIG" \
			--allowed-endpoints "$KILN_EC2_ENDPOINT" >"$OP_LOG" 2>&1 &
	OP_PID=$!
	echo "$OP_PID" >"$OP_PIDFILE"
	say "operator running (pid $OP_PID, log $OP_LOG)"
fi

# A previous demo's build in this namespace goes first (the operator releases its finalizer).
k -n "$NS" delete imagebuild "$NAME" --ignore-not-found --wait=true --timeout=120s >/dev/null

# ---------------------------------------------------------------- source AMI
# The EC2 server starts empty: give it an "Ubuntu 24.04" image owned by Canonical's
# account, for the build's sourceAMIFilter to find (already there: 409, fine).
python3 - "$KILN_EC2_ENDPOINT" <<-'EOF'
	import json, sys, urllib.error, urllib.request
	image = {"name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250115",
	         "owner": "099720109477", "public": True,
	         "description": "Canonical, Ubuntu, 24.04, amd64 noble image",
	         "creation_date": "2025-01-15T00:00:00.000Z", "region": "us-east-1"}
	req = urllib.request.Request(sys.argv[1] + "/_kiln/images", data=json.dumps([image]).encode(),
	                             headers={"Content-Type": "application/json"}, method="POST")
	try:
	    urllib.request.urlopen(req, timeout=30).read()
	except urllib.error.HTTPError as e:
	    if e.code != 409:
	        sys.exit(f"loading the source image: HTTP {e.code}: {e.read().decode()}")
EOF

# ------------------------------------------------------------------ progress
# Follows the ImageBuild with `kubectl get -w` and prints one line per change of
# a step (or of the build's phase). Exits 0 on Succeeded, 1 on Failed (after
# writing the summary file: the AMI line, or the failure message), 3 on timeout,
# 4 if the operator exited.
rm -f "$SUMMARY"
python3 -u - "$KUBECTL" "$NS" "$NAME" "$TIMEOUT" "$SUMMARY" "$OP_PID" <<'EOF' &
import codecs, json, os, select, signal, subprocess, sys, time

kubectl, ns, name, timeout, summary, operator = sys.argv[1:7]
t0 = time.monotonic()
deadline = t0 + float(timeout)
child = None


def bye(code):
    if child is not None and child.poll() is None:
        child.kill()
        child.wait()
    sys.exit(code)


signal.signal(signal.SIGTERM, lambda *_: bye(143))
signal.signal(signal.SIGINT, lambda *_: bye(130))


def show(what, phase, note=""):
    lines = (note or "").strip().splitlines()
    note = lines[0] if lines else ""
    if len(note) > 110:
        note = note[:109] + "…"
    print(f"{time.monotonic() - t0:7.1f}s  {what:<22} {phase:<10} {note}".rstrip(), flush=True)


steps, build = {}, [None]


def event(obj):
    st = obj.get("status") or {}
    phase = st.get("phase")
    terminal = phase in ("Succeeded", "Failed")
    # Pending/Running before this event's step lines, CleaningUp and the end after.
    if phase in ("Pending", "Running") and phase != build[0]:
        build[0] = phase
        show("ImageBuild", phase)
    for s in st.get("steps") or []:
        n, ph, cl = s.get("name"), s.get("phase"), s.get("cleanup")
        was_ph, was_cl = steps.get(n, ("Pending", "Pending"))
        if ph != was_ph and ph != "Pending":
            show(n, ph, "" if ph == "Running" else s.get("message"))
        if cl == "Done" and was_cl != "Done":
            show(n, "cleanup", "done")
        steps[n] = (ph, cl)
    if phase == "CleaningUp" and phase != build[0]:
        build[0] = phase
        show("ImageBuild", phase)
    gen = (obj.get("metadata") or {}).get("generation")
    if not terminal or st.get("observedGeneration") != gen:
        return None
    if phase != build[0]:
        build[0] = phase
        show("ImageBuild", phase)
    with open(summary, "w") as f:
        if phase == "Succeeded":
            arts = [a for a in st.get("artifacts") or [] if a.get("generation") == gen]
            f.write("AMI: " + ", ".join(f"{a.get('imageId')} ({a.get('region')})" for a in arts) + "\n")
        else:
            f.write((st.get("message") or "no message") + "\n")
    return 0 if phase == "Succeeded" else 1


while True:
    child = subprocess.Popen(
        [kubectl, "-n", ns, "get", "imagebuilds.kiln.dev", "--field-selector",
         "metadata.name=" + name, "--watch", "-o", "json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    fd, buf = child.stdout.fileno(), ""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    dec = json.JSONDecoder()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"[demo] the build did not finish within {timeout}s", file=sys.stderr)
            bye(3)
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            try:
                with open(f"/proc/{operator}/stat") as f:
                    gone = f.read().rsplit(") ", 1)[1].startswith("Z")
            except OSError:
                gone = True
            if gone:
                bye(4)
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break  # the watch ended (server timeout): start another
        buf += utf8.decode(data)
        while True:
            buf = buf.lstrip()
            try:
                obj, end = dec.raw_decode(buf)
            except ValueError:
                break
            buf = buf[end:]
            done = event(obj)
            if done is not None:
                bye(done)
    child.wait()
    time.sleep(1)
EOF
PROGRESS_PID=$!

export KILN_DEMO_DIR=/tmp/kiln-demo-$NS
say "applying examples/amazon-ebs.yaml: ImageBuild $NS/$NAME, against the EC2 server at $BUILD_EC2"
sed -e "s|\${KILN_EC2_ENDPOINT}|$BUILD_EC2|g" -e "s|\${KILN_SSH_USER}|$KILN_SSH_USER|g" \
	-e "s|\${KILN_SSH_HOST}|$BUILD_SSH_HOST|g" -e "s|\${KILN_SSH_PORT}|$BUILD_SSH_PORT|g" \
	-e "s|\${KILN_DEMO_DIR}|$KILN_DEMO_DIR|g" examples/amazon-ebs.yaml | k -n "$NS" apply -f - >/dev/null

rc=0
wait "$PROGRESS_PID" || rc=$?
PROGRESS_PID=
if ((rc != 0)); then
	[[ -s $SUMMARY ]] && fail "the build failed: $(<"$SUMMARY")"
	if ((rc == 4)); then
		tail -20 "$OP_LOG" >&2 || true
		fail "the operator exited (log: $OP_LOG)"
	fi
	fail "following the build failed (exit $rc); operator log: $OP_LOG"
fi
k -n "$NS" get imagebuild "$NAME"
echo "On the build machine (the loopback sshd stands in for the instance):"
for f in build-info motd; do
	printf '  %s: %s\n' "$KILN_DEMO_DIR/$f" "$(head -1 "$KILN_DEMO_DIR/$f" 2>/dev/null || echo '(missing)')"
done
cat "$SUMMARY"

if [[ ${KILN_DEMO_EXIT:-} != 1 ]]; then
	echo "[demo] everything keeps running (KUBECONFIG=$KUBECONFIG); Ctrl-C stops what the demo started" >&2
	rc=0
	wait "$OP_PID" || rc=$?
	OP_PID=
	# The operator shares the demo's process group, so Ctrl-C reaches it too, and it
	# may finish its clean shutdown (exit 0, which only a signal causes) before this
	# shell runs its INT trap: that is the Ctrl-C, not a failure.
	((rc != 0)) || exit 130
	fail "the operator exited (code $rc); log: $OP_LOG"
fi
