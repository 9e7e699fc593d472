#!/usr/bin/env bash
# A 20-task playbook run by kiln's ansible provisioner in a runner Pod against the
# same playbook run by ansible-playbook on this host (the same ansible-core, in a
# venv made here from PyPI), both against the test sshd. Needs the cluster mode
# (root): KILN_CLUSTER=1 bash tests/env/up.sh. Result: bench/results/ansible-20-tasks.json.
#
#   bash bench/ansible.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export KILN_TEST_ENV=${KILN_TEST_ENV:-$PWD/.kiln-test-env}
# shellcheck disable=SC1091
. "$KILN_TEST_ENV/env.sh"
[[ ${KILN_CLUSTER:-0} == 1 ]] || {
	echo "bench/ansible.sh: the test environment has no node: KILN_CLUSTER=1 bash tests/env/up.sh" >&2
	exit 1
}
version=$(sed -n 's/^ARG ANSIBLE_CORE_VERSION=//p' Dockerfile.runner)
[[ -n $version ]] || { echo "bench/ansible.sh: no ARG ANSIBLE_CORE_VERSION in Dockerfile.runner" >&2; exit 1; }
venv=$KILN_TEST_ENV/ansible-$version
if [[ ! -x $venv/bin/ansible-playbook ]]; then
	/usr/bin/python3.11 -m venv "$venv"
	"$venv/bin/pip" install -q "ansible-core==$version"
fi
KILN_HOST_ANSIBLE=$venv/bin/ansible-playbook \
	cargo test --release --test runner -- --ignored --nocapture ansible_20_tasks
