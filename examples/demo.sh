#!/usr/bin/env bash
# One command, fresh machine: a real control plane and sshd, the CRDs and RBAC,
# the operator, and a sample ImageBuild followed until it is Ready.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash tests/env/up.sh
# shellcheck disable=SC1091
. .kiln-test-env/env.sh
cargo build --quiet --bin kiln
OP_PID=
cleanup() {
	[[ -z $OP_PID ]] || kill "$OP_PID" 2>/dev/null || true
	wait 2>/dev/null || true
	bash tests/env/down.sh
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kubectl apply --server-side -f crds/ >/dev/null
kubectl apply --server-side -k config/rbac >/dev/null 2>&1 || kubectl apply --server-side -f config/rbac/ >/dev/null
kubectl wait --for=condition=Established crd/imagebuilds.kiln.dev --timeout=30s >/dev/null
kubectl create namespace kiln-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n kiln-demo create secret generic ssh-key --from-file=ssh-privatekey="$KILN_SSH_KEY" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n kiln-demo create secret generic known-hosts --from-file=known_hosts="$KILN_SSH_KNOWN_HOSTS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n kiln-demo create configmap demo-files --from-literal=motd="built by kiln" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

./target/debug/kiln run >"$KILN_TEST_ENV/demo-operator.log" 2>&1 &
OP_PID=$!
echo "operator running (pid $OP_PID, log $KILN_TEST_ENV/demo-operator.log)"

kubectl -n kiln-demo delete imagebuild hello --ignore-not-found --wait=true >/dev/null
sed -e "s|\${KILN_SSH_USER}|$KILN_SSH_USER|" -e "s|\${KILN_SSH_HOST}|$KILN_SSH_HOST|" -e "s|\${KILN_SSH_PORT}|$KILN_SSH_PORT|" \
	examples/null-build.yaml | kubectl -n kiln-demo apply -f -

# Stream step progress until Ready (or Stalled).
last=
for _ in $(seq 1 300); do
	line=$(kubectl -n kiln-demo get ib hello -o jsonpath='{.status.phase} {.status.currentStep} {range .status.steps[*]}{.name}={.phase} {end}' 2>/dev/null || true)
	[[ $line == "$last" ]] || { echo "  $line"; last=$line; }
	phase=${line%% *}
	[[ $phase == Succeeded || $phase == Failed ]] && break
	sleep 0.5
done
kubectl -n kiln-demo get ib hello
kubectl -n kiln-demo wait --for=condition=Ready ib/hello --timeout=5s
echo "built: $(cat /tmp/kiln-demo/motd) at $(cat /tmp/kiln-demo/built-at)"
if [[ -t 0 && ${KILN_DEMO_EXIT:-} != 1 ]]; then
	echo "Everything keeps running; Ctrl-C stops it."
	while true; do sleep 3600; done
fi
