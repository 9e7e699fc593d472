#!/usr/bin/env bash
# Smoke test of the cluster mode (KILN_CLUSTER=1 bash tests/env/up.sh): a Pod
# of the tools image on the node, with a ServiceAccount token, reaches the
# apiserver through the `kubernetes` Service (10.0.0.1:443), the test sshd and
# the EC2 test server at the addresses env.sh gives Pods; `kubectl logs` and
# `kubectl exec` work. Prints what it checks; exits non-zero on the first failure.
#
#   . <state>/env.sh && bash tests/env/cluster-smoke.sh
set -euo pipefail

[[ ${KILN_CLUSTER:-} == 1 ]] || {
	echo "cluster-smoke: no cluster in this environment (source env.sh of KILN_CLUSTER=1 bash tests/env/up.sh)" >&2
	exit 1
}
ns=kiln-smoke-$$
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
fail() {
	echo "cluster-smoke: FAILED: $*" >&2
	kubectl -n "$ns" describe pod probe 2>/dev/null | tail -20 >&2 || true
	exit 1
}
cleanup() { kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT

kubectl create namespace "$ns" >/dev/null
kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: probe}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: probe
    image: $KILN_POD_TOOLS_IMAGE
    command: ["/bin/sh", "-c"]
    args:
    - |
      sa=/var/run/secrets/kubernetes.io/serviceaccount
      echo "service: \$KUBERNETES_SERVICE_HOST:\$KUBERNETES_SERVICE_PORT namespace: \$(cat \$sa/namespace)"
      echo "apiserver: \$(wget -q -O- --no-check-certificate https://\$KUBERNETES_SERVICE_HOST:\$KUBERNETES_SERVICE_PORT/version | grep gitVersion)"
      # The token authenticates: the default ServiceAccount may not list Pods (403, not 401).
      echo "token: \$(wget -O- --no-check-certificate --header "Authorization: Bearer \$(cat \$sa/token)" \\
        https://\$KUBERNETES_SERVICE_HOST:\$KUBERNETES_SERVICE_PORT/api/v1/namespaces/default/pods 2>&1 | grep -o 'HTTP/1.1 40[13].*')"
      echo "sshd: \$(echo | nc -w 3 $KILN_POD_SSH_HOST $KILN_POD_SSH_PORT | head -1)"
      echo "ec2: \$(wget -q -O- $KILN_POD_EC2_ENDPOINT/_kiln/health | grep '"ok"')"
      echo probe-done
      exec sleep 3600
EOF
kubectl -n "$ns" wait --for=condition=Ready pod/probe --timeout=60s >/dev/null || fail "the Pod is not Ready"
echo "Pod Ready after $(elapsed) (created, scheduled, started)"
for ((i = 0; i < 50; i++)); do
	out=$(kubectl -n "$ns" logs probe 2>&1) || true
	[[ $out == *probe-done* ]] && break
	sleep 0.2
done
echo "--- kubectl logs"
echo "$out"
[[ $out == *"service: 10.0.0.1:443 namespace: $ns"* ]] || fail "no ServiceAccount namespace file or no kubernetes Service env"
[[ $out == *'apiserver:'*gitVersion* ]] || fail "the apiserver is not reachable at 10.0.0.1:443 from the Pod"
[[ $out == *'token: HTTP/1.1 403'* ]] || fail "the ServiceAccount token was not accepted (want 403 Forbidden, not 401)"
[[ $out == *'sshd: SSH-2.0-'* ]] || fail "the test sshd is not reachable at $KILN_POD_SSH_HOST:$KILN_POD_SSH_PORT"
[[ $out == *'ec2: '*'"ok": true'* ]] || fail "the EC2 server is not reachable at $KILN_POD_EC2_ENDPOINT"
echo "--- kubectl exec"
ex=$(kubectl -n "$ns" exec probe -- sh -c 'echo exec-ok uid=$(id -u) ip=$(ip -4 -o addr show eth0 | awk "{print \$4}")') || fail "kubectl exec"
echo "$ex"
[[ $ex == exec-ok* ]] || fail "kubectl exec printed: $ex"
echo "cluster-smoke: ok ($(elapsed))"
