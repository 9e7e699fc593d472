#!/usr/bin/env bash
# Smoke test of kiln's runner image (Dockerfile.runner, built and imported by
# KILN_CLUSTER=1 bash tests/env/up.sh as KILN_POD_RUNNER_IMAGE) in a real Pod made
# as kiln makes runner Pods: uid/gid 65532, runAsNonRoot, read-only root file
# system, an emptyDir at /tmp (the working dir), no ServiceAccount token, every
# capability dropped, the script written to /tmp and run with its own shebang.
# The script prints the tools' versions, clones a playbook repository over git://
# from a git daemon on this host (at the node IP), checks that git's https helper
# runs, writes the test sshd's private key to /tmp (0600) and runs ansible-playbook
# against the test sshd with its known_hosts (host key checking on): facts, copy,
# template. Prints the Pod's log; exits non-zero on the first failure.
#
#   . <state>/env.sh && bash tests/env/runner-smoke.sh
set -euo pipefail

[[ ${KILN_CLUSTER:-} == 1 && -n ${KILN_POD_RUNNER_IMAGE:-} ]] || {
	echo "runner-smoke: no cluster or runner image in this environment (source env.sh of KILN_CLUSTER=1 bash tests/env/up.sh)" >&2
	exit 1
}
ns=kiln-runner-smoke-$$
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-runner-smoke.XXXXXX")
daemon=''
remote_dir=kiln-runner-smoke-$$ # in the build user's home on the sshd's side
fail() {
	echo "runner-smoke: FAILED: $*" >&2
	kubectl -n "$ns" describe pod runner 2>/dev/null | tail -20 >&2 || true
	exit 1
}
cleanup() {
	kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
	[[ -z $daemon ]] || kill -- "-$daemon" 2>/dev/null || true
	rm -rf "$work"
	ssh_build "rm -rf ~/$remote_dir" >/dev/null 2>&1 || true
}
trap cleanup EXIT
ssh_build() {
	ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o UserKnownHostsFile="$KILN_SSH_KNOWN_HOSTS" \
		-o StrictHostKeyChecking=yes -i "$KILN_SSH_KEY" -p "$KILN_SSH_PORT" "$KILN_SSH_USER@$KILN_SSH_HOST" "$@" </dev/null
}

# ------------------------------------------------------- the playbook repository
repo=$work/src
mkdir -p "$repo/files" "$repo/templates"
cat >"$repo/playbook.yml" <<EOF
- hosts: all
  gather_facts: true
  vars:
    dest: "{{ ansible_env.HOME }}/$remote_dir"
  tasks:
    - name: facts
      ansible.builtin.debug:
        msg: "{{ ansible_distribution }} {{ ansible_distribution_version }}, python {{ ansible_python_version }}, user {{ ansible_user_id }}"
    - ansible.builtin.file: {path: "{{ dest }}", state: directory, mode: "0755"}
    - ansible.builtin.copy: {src: files/hello.txt, dest: "{{ dest }}/hello.txt", mode: "0644"}
    - ansible.builtin.template: {src: templates/build-info.j2, dest: "{{ dest }}/build-info", mode: "0644"}
EOF
echo "hello from the runner image" >"$repo/files/hello.txt"
cat >"$repo/templates/build-info.j2" <<'EOF'
build={{ kiln_build_name }} host={{ ansible_hostname }} os={{ ansible_distribution }}-{{ ansible_distribution_version }}
EOF
git -C "$repo" init -q -b main
git -C "$repo" add -A
git -C "$repo" -c user.name=kiln -c user.email=kiln@example.invalid commit -qm playbook
git clone -q --bare "$repo" "$work/served/playbooks.git"

# git daemon on the node IP (Pods reach it directly: it is a local address), on a free port.
port=$(python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$KILN_NODE_IP")
setsid git daemon --export-all --reuseaddr --informative-errors --base-path="$work/served" \
	--listen="$KILN_NODE_IP" --port="$port" "$work/served" >"$work/daemon.log" 2>&1 &
daemon=$!
for ((i = 0; i < 50; i++)); do
	git ls-remote "git://$KILN_NODE_IP:$port/playbooks.git" >/dev/null 2>&1 && break
	sleep 0.1
done
git ls-remote "git://$KILN_NODE_IP:$port/playbooks.git" >/dev/null || fail "git daemon on $KILN_NODE_IP:$port (log: $(cat "$work/daemon.log"))"

# ---------------------------------------------------------------------- the Pod
# shellcheck disable=SC2016 # expanded in the Pod
script='#!/bin/sh
set -eu
echo "== id: $(id)"
echo "== ansible-playbook --version"; ansible-playbook --version
echo "== git --version: $(git --version)"
echo "== ssh -V: $(ssh -V 2>&1)"
echo "== git clone git://$GIT_HOST/playbooks.git"
git clone -q "git://$GIT_HOST/playbooks.git" /tmp/playbooks
git -C /tmp/playbooks log --oneline
echo "== git ls-remote https:// (the https helper runs; nothing listens there)"
git ls-remote "https://$SSH_HOST:1/none.git" 2>&1 | head -1 || true
printf "%s\n" "$SSH_PRIVATE_KEY" >/tmp/id_key && chmod 600 /tmp/id_key
printf "%s\n" "$SSH_KNOWN_HOSTS" >/tmp/known_hosts
printf "%s\n" "build ansible_host=$SSH_HOST ansible_port=$SSH_PORT ansible_user=$SSH_USER ansible_ssh_private_key_file=/tmp/id_key ansible_ssh_common_args=\"-o UserKnownHostsFile=/tmp/known_hosts -o StrictHostKeyChecking=yes\"" >/tmp/inventory
echo "== ansible-playbook"
cd /tmp/playbooks
ansible-playbook -i /tmp/inventory playbook.yml -e kiln_build_name=runner-smoke
echo runner-smoke-done'

kubectl create namespace "$ns" >/dev/null
kubectl -n "$ns" create secret generic ssh --from-file=key="$KILN_SSH_KEY" \
	--from-file=known_hosts="$KILN_SSH_KNOWN_HOSTS" >/dev/null
# The script's JSON string, and the Pod as kiln's shell_local.rs makes it.
script_json=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$script")
kubectl -n "$ns" apply -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runner"},
 "spec": {
  "restartPolicy": "Never", "automountServiceAccountToken": false, "enableServiceLinks": false,
  "terminationGracePeriodSeconds": 0,
  "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
  "containers": [{
   "name": "run", "image": "$KILN_POD_RUNNER_IMAGE", "imagePullPolicy": "IfNotPresent",
   "command": ["/bin/sh", "-c", "umask 077 && printf '%s' \"\$0\" > /tmp/kiln-script && chmod 700 /tmp/kiln-script && exec /tmp/kiln-script", $script_json],
   "workingDir": "/tmp",
   "env": [
    {"name": "GIT_HOST", "value": "$KILN_NODE_IP:$port"},
    {"name": "SSH_HOST", "value": "$KILN_POD_SSH_HOST"}, {"name": "SSH_PORT", "value": "$KILN_POD_SSH_PORT"},
    {"name": "SSH_USER", "value": "$KILN_SSH_USER"},
    {"name": "SSH_PRIVATE_KEY", "valueFrom": {"secretKeyRef": {"name": "ssh", "key": "key"}}},
    {"name": "SSH_KNOWN_HOSTS", "valueFrom": {"secretKeyRef": {"name": "ssh", "key": "known_hosts"}}}],
   "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
   "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
  "volumes": [{"name": "tmp", "emptyDir": {}}]}}
EOF
phase=
for ((i = 0; i < 600; i++)); do
	phase=$(kubectl -n "$ns" get pod runner -o 'jsonpath={.status.phase}' 2>/dev/null || true)
	[[ $phase == Succeeded || $phase == Failed ]] && break
	sleep 0.2
done
echo "--- the Pod: $phase after $(elapsed)"
out=$(kubectl -n "$ns" logs runner 2>&1) || true
echo "$out"
[[ $phase == Succeeded ]] || fail "the Pod's phase is ${phase:-unknown}"
[[ $out == *runner-smoke-done* ]] || fail "the script did not finish"
[[ $out == *"ansible-playbook [core "* ]] || fail "no ansible-playbook version"
[[ $out == *"uid=65532"* ]] || fail "not uid 65532"
[[ $out == *"unable to access 'https://"* ]] || fail "git's https helper did not run"
[[ $out =~ build[[:space:]]+:\ ok=[0-9]+\ +changed=[1-9][0-9]*\ +unreachable=0\ +failed=0 ]] || fail "the play did not succeed with changes"
echo "--- on the build machine (~$KILN_SSH_USER/$remote_dir)"
got=$(ssh_build "cat ~/$remote_dir/hello.txt ~/$remote_dir/build-info") || fail "reading the files the play wrote"
echo "$got"
[[ $got == *"hello from the runner image"* && $got == *"build=runner-smoke host="* ]] || fail "the copied or templated file is wrong"
echo "runner-smoke: ok ($(elapsed))"
