#!/usr/bin/env bash
# Brings up kiln's integration-test environment, for CI (.ci/run) and
# developers alike; see tests/env/README.md for the contract.
#
#   bash tests/env/up.sh && . .kiln-test-env/env.sh
#
# - a real kube-apiserver (Kubernetes 1.34) + embedded etcd on 127.0.0.1,
#   built from tests/apiserver and cached by content hash;
# - an OpenSSH sshd of our own on 127.0.0.1 (not the system service);
# - the EC2 test server (tests/ec2server);
# - with KILN_CLUSTER=1, a one-node cluster on top of the apiserver: containerd,
#   runc, CNI, kubelet, kube-scheduler, kube-controller-manager (cluster.sh).
#
# Idempotent: servers still alive from an earlier run are reused; dead ones
# are restarted from scratch. Stop everything with tests/env/down.sh.
#
# Knobs (all optional):
#   KILN_TEST_ENV           state dir (default: <repo>/.kiln-test-env)
#   KILN_CACHE_DIR          built binaries (default: ${XDG_CACHE_HOME:-~/.cache}/kiln)
#   KILN_APISERVER_PORT     apiserver port (default 0: any free port)
#   KILN_APISERVER_TIMEOUT  seconds to wait for apiserver readiness (default 120)
#   KILN_SSH_PORT_WANTED    sshd port to try first (default 2222; else any free)
#   KILN_SSHD_MAX_STARTUPS  sshd MaxStartups (default 200:30:400; the benchmark raises it)
#   KILN_SSHD_MAX_SESSIONS  sshd MaxSessions (default 100)
#   KILN_HELM_VERSION       helm to build, v3.x.y or v4.x.y (default v4.3.1)
#   KILN_ENV_NO_HELM=1      do not build helm (examples/demo.sh in host mode); a cached one is linked
#   KILN_CLUSTER            1: also run the one-node cluster (root only); 0: stop it;
#                           unset: keep it running if it is (README.md, "Cluster mode")
#   KILN_NODE_TIMEOUT       seconds to wait for the node to be Ready (default 120)
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=cluster.sh
source "$KILN_ENV_DIR/cluster.sh"

T_ALL=$(now)
mkdir -p "$STATE"
# As root, sshd reads the kiln-build user's authorized keys under $STATE with that
# user's rights: a private (0700, e.g. mktemp -d) state dir must let it through.
[[ $(id -u) != 0 ]] || chmod go+x "$STATE"
lock_state
CLUSTER=
if cluster_requested; then
	CLUSTER=1
	cluster_preflight # before anything starts
fi

SUDO=
[[ $(id -u) == 0 ]] || SUDO=sudo
# The build machine's login user. As root we make an unprivileged one with a
# plain /bin/sh, like a cloud image's `ubuntu`: root's own shell start-up here
# (bashrc with pyenv) costs ~100 ms of CPU per command, which is not what a
# build machine looks like and swamps load tests. Not root: log in as ourselves.
SSH_USER=$(id -un)
ensure_build_user() {
	[[ $(id -u) == 0 ]] || return 0
	local u=kiln-build
	if ! id "$u" >/dev/null 2>&1; then
		useradd --create-home --shell /bin/sh "$u" >/dev/null
	fi
	# sshd without PAM refuses a locked ("!") password; "*" is no password, unlocked.
	usermod -p '*' "$u" >/dev/null
	SSH_USER=$u
}
ENV_EXTRA=() # extra "NAME=value" lines for env.sh, from hooks

# ---------------------------------------------------------------- packages
ensure_packages() {
	local missing=() created_policy=
	[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
	[[ -x /usr/lib/openssh/sftp-server ]] || missing+=(openssh-sftp-server)
	{ command -v ssh && command -v ssh-keygen && command -v sftp; } >/dev/null || missing+=(openssh-client)
	{ command -v setsid && command -v flock; } >/dev/null || missing+=(util-linux)
	command -v lua5.1 >/dev/null || missing+=(lua5.1) # runs config/argocd/health.lua in tests
	# tests/image.rs builds kiln's image with tests/env/image.sh (umoci, strip).
	command -v umoci >/dev/null || missing+=(umoci)
	command -v strip >/dev/null || missing+=(binutils)
	# ... and the runner image with tests/env/runner-image.sh (Debian's python3.11 and
	# pip, git, ssh, busybox).
	/usr/bin/python3.11 -m pip --version >/dev/null 2>&1 || missing+=(python3.11 python3-pip)
	/usr/bin/python3.11 -c 'import venv' >/dev/null 2>&1 || missing+=(python3-venv)
	[[ -x /usr/bin/git && -x /usr/lib/git-core/git-remote-http ]] || missing+=(git)
	dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
	if [[ -n $CLUSTER ]]; then
		command -v containerd >/dev/null || missing+=(containerd)
		[[ -x /usr/sbin/runc ]] || missing+=(runc)
		[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/portmap ]] || missing+=(containernetworking-plugins)
		{ command -v iptables && command -v iptables-restore; } >/dev/null || missing+=(iptables)
		{ command -v ip && command -v ss; } >/dev/null || missing+=(iproute2)
		command -v gcc >/dev/null || missing+=(gcc)
		[[ -f /usr/lib/x86_64-linux-gnu/libc.a || -n $(gcc -print-file-name=libc.a 2>/dev/null | grep /) ]] || missing+=(libc6-dev)
		[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
		command -v python3 >/dev/null || missing+=(python3)
	fi
	((${#missing[@]})) || return 0
	log "installing: ${missing[*]}"
	# Keep apt from starting the system sshd: we run our own, and do not need it.
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
		$SUDO chmod 755 /usr/sbin/policy-rc.d
		created_policy=1
	fi
	local rc=0
	{
		$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
			$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
				-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
	} >"$STATE/apt.log" 2>&1 || rc=$?
	[[ -z $created_policy ]] || $SUDO rm -f /usr/sbin/policy-rc.d
	((rc == 0)) || {
		tail -20 "$STATE/apt.log" >&2
		die "apt-get failed (log: $STATE/apt.log)"
	}
}

find_go() {
	GO=$(command -v go || true)
	if [[ -z $GO ]]; then
		for g in /usr/local/go/bin/go /usr/lib/go/bin/go "${HOME:-/root}/go/bin/go"; do
			[[ -x $g ]] && GO=$g && break
		done
	fi
	[[ -n $GO ]] || die "Go (>= 1.21; the module wants 1.24, fetched through the Go proxy by GOTOOLCHAIN=auto) is not installed"
}

# ------------------------------------------------------------------- build
build_apiserver() {
	local src="$KILN_ENV_DIR/../apiserver" kver minor key cache ldflags pkg=k8s.io/component-base/version
	src=$(cd "$src" && pwd)
	kver=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$src/go.mod")
	[[ $kver =~ ^v1\.([0-9]+)\. ]] || die "cannot read the k8s.io/kubernetes version from $src/go.mod"
	minor=${BASH_REMATCH[1]}
	# Without these, /version says v0.0.0-master and kubectl version fails to parse it.
	ldflags="-s -w -X $pkg.gitVersion=$kver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
	key=$(
		cd "$src"
		{
			cat go.mod go.sum $(LC_ALL=C ls ./*.go)
			echo "$ldflags"
			"$GO" version
		} | sha256sum | cut -c1-16
	)
	cache=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/kiln}
	BIN="$cache/kiln-test-apiserver-$key"
	if [[ -x $BIN ]]; then
		log "apiserver binary: cached ($BIN)"
		return
	fi
	mkdir -p "$cache"
	log "building the apiserver (Kubernetes $kver; the first build takes ~10 min on 2 cores; log: $STATE/build.log)"
	if ! (cd "$src" && "$GO" build -buildvcs=false -ldflags "$ldflags" -o "$BIN.tmp.$$" .) >"$STATE/build.log" 2>&1; then
		rm -f "$BIN.tmp.$$"
		tail -30 "$STATE/build.log" >&2
		die "go build failed (log: $STATE/build.log)"
	fi
	mv -f "$BIN.tmp.$$" "$BIN"
	# Keep the newest three builds (~150 MB each), e.g. for switching branches.
	LC_ALL=C ls -1t "$cache"/kiln-test-apiserver-* 2>/dev/null | grep -v '\.tmp\.' | tail -n +4 | xargs -r rm -f
}

# ------------------------------------------------------------------- tools
# kubectl and helm, for tests that shell out to them (packaging, gitops_status) and for
# developers: built from the Go module proxy, cached in the same directory as the
# apiserver (named by version and a hash of what went into the binary), and linked
# into $STATE/bin, which env.sh puts first on PATH.
HELM_VERSION=${KILN_HELM_VERSION:-v4.3.1}

# install_tool NAME FILE BUILD-FUNCTION: unless FILE exists, runs BUILD-FUNCTION
# with a scratch dir (in the cache dir) as its argument; it must leave the binary
# there as NAME, which is then moved to FILE. Links $STATE/bin/NAME to FILE and
# keeps the newest three cached builds of NAME.
install_tool() {
	local name=$1 file=$2 build=$3 dir tmp t
	dir=$(dirname "$file")
	if [[ -x $file ]]; then
		log "$name: cached ($file)"
	else
		mkdir -p "$dir"
		tmp=$(mktemp -d "$dir/.build-$name.XXXXXX")
		t=$(now)
		log "building $name (log: $STATE/build-$name.log)"
		if ! "$build" "$tmp" >"$STATE/build-$name.log" 2>&1; then
			rm -rf "$tmp"
			tail -30 "$STATE/build-$name.log" >&2
			die "building $name failed (log: $STATE/build-$name.log)"
		fi
		mv -f "$tmp/$name" "$file"
		rm -rf "$tmp"
		log "$name: built in $(since "$t") ($file)"
		LC_ALL=C ls -1t "$dir/$name"-v* 2>/dev/null | tail -n +4 | xargs -r rm -f
	fi
	mkdir -p "$STATE/bin"
	ln -sfn "$file" "$STATE/bin/$name.tmp"
	mv -fT "$STATE/bin/$name.tmp" "$STATE/bin/$name"
}

# kubectl from k8s.io/kubernetes at the version tests/apiserver pins, built with
# that module's go.mod (so every k8s.io/* module is the apiserver's, and the
# build shares most packages with it). The committed go.mod/go.sum stay as they
# are: Go works on copies (-modfile), adding go.sum lines for the few modules
# only kubectl needs (checked against the checksum database, as usual).
KUBECTL_SRC= KUBECTL_LDFLAGS=
build_kubectl() {
	cp "$KUBECTL_SRC/go.mod" "$KUBECTL_SRC/go.sum" "$1/"
	(cd "$KUBECTL_SRC" && "$GO" build -modfile="$1/go.mod" -mod=mod -ldflags "$KUBECTL_LDFLAGS" \
		-o "$1/kubectl" k8s.io/kubernetes/cmd/kubectl)
}
HELM_MODULE= HELM_LDFLAGS=
build_helm() {
	# `go install module@version` builds with the module's own go.mod and go.sum.
	(cd "$1" && CGO_ENABLED=0 GOBIN="$1" "$GO" install -ldflags "$HELM_LDFLAGS" "$HELM_MODULE/cmd/helm@$HELM_VERSION")
}

build_tools() {
	local cache kver minor key pkg=k8s.io/component-base/version
	cache=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/kiln}

	KUBECTL_SRC=$(cd "$KILN_ENV_DIR/../apiserver" && pwd)
	kver=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$KUBECTL_SRC/go.mod")
	[[ $kver =~ ^v1\.([0-9]+)\. ]] || die "cannot read the k8s.io/kubernetes version from $KUBECTL_SRC/go.mod"
	minor=${BASH_REMATCH[1]}
	KUBECTL_LDFLAGS="-s -w -X $pkg.gitVersion=$kver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
	key=$({
		cat "$KUBECTL_SRC/go.mod" "$KUBECTL_SRC/go.sum"
		echo "k8s.io/kubernetes/cmd/kubectl $KUBECTL_LDFLAGS"
		"$GO" version
	} | sha256sum | cut -c1-16)
	install_tool kubectl "$cache/kubectl-$kver-$key" build_kubectl

	# The demo's host mode has no use for helm: not built for it (a cached one is
	# still linked).
	if [[ ${KILN_ENV_NO_HELM:-0} == 1 ]]; then
		local cached
		cached=$(LC_ALL=C ls -1t "$cache/helm-$HELM_VERSION"-* 2>/dev/null | head -1 || true)
		if [[ -x $cached ]]; then
			install_tool helm "$cached" false
		else
			log "helm: not built (KILN_ENV_NO_HELM=1)"
		fi
		ENV_EXTRA+=("KILN_TEST_BIN=$STATE/bin")
		return
	fi
	[[ $HELM_VERSION =~ ^(v[34])\.[0-9]+\.[0-9]+$ ]] || die "KILN_HELM_VERSION=$HELM_VERSION: want v3.x.y or v4.x.y"
	HELM_MODULE=helm.sh/helm/${BASH_REMATCH[1]}
	pkg=$HELM_MODULE/internal/version
	HELM_LDFLAGS="-s -w -X $pkg.version=$HELM_VERSION -X $pkg.metadata= -X $pkg.gitTreeState=clean"
	key=$({
		echo "$HELM_MODULE/cmd/helm@$HELM_VERSION CGO_ENABLED=0 $HELM_LDFLAGS"
		"$GO" version
	} | sha256sum | cut -c1-16)
	install_tool helm "$cache/helm-$HELM_VERSION-$key" build_helm
	ENV_EXTRA+=("KILN_TEST_BIN=$STATE/bin")
}

# --------------------------------------------------------------- apiserver
APISERVER_REUSED=
start_apiserver() {
	local pid args
	# For the cluster mode's kubelet (harmless without one, so always: switching
	# modes then needs no new apiserver): logs and exec dial the node's
	# InternalIP (its name does not resolve), as a client the kubelet accepts.
	args=("$BIN" --dir "$STATE/apiserver" --port "${KILN_APISERVER_PORT:-0}" --
		--kubelet-preferred-address-types=InternalIP,Hostname
		--kubelet-client-certificate="$STATE/apiserver/pki/admin.crt"
		--kubelet-client-key="$STATE/apiserver/pki/admin.key")
	if pid=$(pid_of apiserver) && [[ -f $STATE/apiserver/ready && -f $STATE/apiserver/kubeconfig ]] &&
		[[ $(readlink "/proc/$pid/exe") == "$BIN" ]] &&
		{ [[ -z $CLUSTER ]] || tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qx -- "--kubelet-client-key=.*"; }; then
		log "apiserver: reusing pid $pid ($(<"$STATE/apiserver/ready"))"
		APISERVER_REUSED=1
		return
	fi
	stop_service apiserver
	rm -rf "$STATE/apiserver"
	mkdir -p "$STATE/apiserver"
	start_daemon apiserver "$STATE/apiserver.log" "${args[@]}"
}

wait_apiserver() {
	[[ -z $APISERVER_REUSED ]] || return 0
	local timeout=${KILN_APISERVER_TIMEOUT:-120} t0
	t0=$(date +%s)
	until [[ -f $STATE/apiserver/ready ]]; do
		if ! pid_of apiserver >/dev/null; then
			tail -30 "$STATE/apiserver.log" >&2
			die "the apiserver exited (log: $STATE/apiserver.log)"
		fi
		if (($(date +%s) - t0 > timeout)); then
			tail -30 "$STATE/apiserver.log" >&2
			stop_service apiserver
			die "the apiserver was not ready within ${timeout}s (log: $STATE/apiserver.log)"
		fi
		sleep 0.1
	done
	log "apiserver: ready at $(<"$STATE/apiserver/ready") (pid $(<"$STATE/apiserver.pid"))"
}

# -------------------------------------------------------------------- sshd
ssh_as() { # ssh_as KEY KNOWN_HOSTS PORT CMD...
	local key=$1 kh=$2 port=$3
	shift 3
	ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=3 -o IdentitiesOnly=yes \
		-o StrictHostKeyChecking=yes -o UserKnownHostsFile="$kh" -o GlobalKnownHostsFile=/dev/null \
		-o LogLevel=ERROR -i "$key" -p "$port" "$SSH_USER@127.0.0.1" "$@" </dev/null
}
ssh_probe() { ssh_as "$STATE/ssh/id_ed25519" "$STATE/ssh/known_hosts" "$1" true >/dev/null 2>&1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_known_hosts() { # write_known_hosts FILE PUBKEYFILE PORT
	local type blob _ h
	read -r type blob _ <"$2"
	# $NODE_IP: how Pods of the cluster mode reach this sshd (cluster.sh's DNAT).
	for h in 127.0.0.1 localhost "$NODE_IP"; do
		printf '[%s]:%s %s %s\n' "$h" "$3" "$type" "$blob"
	done >"$1.tmp"
	mv "$1.tmp" "$1"
}

SSH_PORT=
start_sshd() {
	local pid d="$STATE/sshd" k="$STATE/ssh" port attempt i
	if pid=$(pid_of sshd) && [[ -s $d/port ]] && ssh_probe "$(<"$d/port")"; then
		SSH_PORT=$(<"$d/port")
		# (Again: an older up.sh wrote fewer names.)
		write_known_hosts "$k/known_hosts" "$d/ssh_host_ed25519_key.pub" "$SSH_PORT"
		write_known_hosts "$k/bad_known_hosts" "$d/bad_host_ed25519_key.pub" "$SSH_PORT"
		log "sshd: reusing pid $pid on 127.0.0.1:$SSH_PORT"
		return
	fi
	stop_service sshd
	rm -rf "$d" "$k"
	mkdir -p "$d" "$k"
	chmod 700 "$d" "$k"
	ssh-keygen -q -t ed25519 -N '' -C kiln-test-host -f "$d/ssh_host_ed25519_key"
	ssh-keygen -q -t ed25519 -N '' -C kiln-test-other-host -f "$d/bad_host_ed25519_key" # never served
	ssh-keygen -q -t ed25519 -N '' -C kiln-test -f "$k/id_ed25519"
	ssh-keygen -q -t ed25519 -N '' -C kiln-test-wrong -f "$k/wrong_ed25519" # never authorized
	# Readable by the build user: sshd reads it with that user's privileges.
	mkdir -p "$STATE/authorized" && chmod 755 "$STATE/authorized"
	cp "$k/id_ed25519.pub" "$STATE/authorized/keys" && chmod 644 "$STATE/authorized/keys"
	# Keys of EC2 key pairs that instances were launched with (the EC2 server
	# appends them, as cloud-init would): amazon-ebs builds log in here.
	: >"$STATE/authorized/instances" && chmod 644 "$STATE/authorized/instances"
	if [[ $(id -u) == 0 ]]; then
		mkdir -p /run/sshd # privilege separation dir, needed when sshd runs as root
		chmod 755 /run/sshd
	fi

	for ((attempt = 0; attempt < 10; attempt++)); do
		if ((attempt == 0)); then port=${KILN_SSH_PORT_WANTED:-2222}; else port=$((20000 + RANDOM % 30000)); fi
		port_in_use "$port" && continue
		cat >"$d/sshd_config" <<-EOF
			# kiln test sshd: generated by tests/env/up.sh; not the system sshd.
			ListenAddress 127.0.0.1
			Port $port
			HostKey $d/ssh_host_ed25519_key
			PidFile $d/sshd.pid
			AuthorizedKeysFile $STATE/authorized/keys $STATE/authorized/instances
			UsePAM no
			StrictModes no
			PasswordAuthentication no
			KbdInteractiveAuthentication no
			PubkeyAuthentication yes
			PermitRootLogin prohibit-password
			Subsystem sftp /usr/lib/openssh/sftp-server
			MaxStartups ${KILN_SSHD_MAX_STARTUPS:-200:30:400}
			MaxSessions ${KILN_SSHD_MAX_SESSIONS:-100}
			LogLevel INFO
			PrintMotd no
			X11Forwarding no
		EOF
		# OpenSSH >= 9.8 penalizes sources that fail auth, which wrong-key tests do on purpose.
		if /usr/sbin/sshd -t -f "$d/sshd_config" -o PerSourcePenalties=no >/dev/null 2>&1; then
			echo "PerSourcePenalties no" >>"$d/sshd_config"
		fi
		/usr/sbin/sshd -t -f "$d/sshd_config" 2>"$STATE/sshd.log" || {
			cat "$STATE/sshd.log" >&2
			die "invalid sshd_config"
		}
		write_known_hosts "$k/known_hosts" "$d/ssh_host_ed25519_key.pub" "$port"
		write_known_hosts "$k/bad_known_hosts" "$d/bad_host_ed25519_key.pub" "$port"
		start_daemon sshd "$STATE/sshd.log" /usr/sbin/sshd -D -e -f "$d/sshd_config"
		for ((i = 0; i < 100; i++)); do
			if ssh_probe "$port"; then
				echo "$port" >"$d/port"
				SSH_PORT=$port
				if ssh_as "$k/wrong_ed25519" "$k/known_hosts" "$port" true >/dev/null 2>&1; then
					die "sshd accepted the wrong key: check $d/sshd_config"
				fi
				log "sshd: pid $(<"$STATE/sshd.pid") on 127.0.0.1:$port as $SSH_USER"
				return
			fi
			pid_of sshd >/dev/null || break # e.g. the port was taken after all
			sleep 0.1
		done
		log "sshd did not come up on port $port: $(tail -3 "$STATE/sshd.log" | tr '\n' ' ')"
		stop_service sshd
	done
	die "could not start sshd (log: $STATE/sshd.log)"
}

# --------------------------------------------------------------------- ec2
# The moto-based EC2 test server (tests/ec2server): its own cached venv, reused
# while alive; down.sh stops it through $STATE/ec2.pid like the others.
EC2_PORT=
start_ec2() {
	local line
	line=$(bash "$KILN_ENV_DIR/../ec2server/start.sh" "$STATE" --authorized-keys "$STATE/authorized/instances") || die "the EC2 test server did not start (log: $STATE/ec2.log)"
	ENV_EXTRA+=("$line")
	EC2_PORT=${line##*:}
}

# ----------------------------------------------------------------- cluster
# cluster.sh does the work; these add what Pods need to know to env.sh.
start_cluster_node() {
	local api
	api=$(<"$STATE/apiserver/ready")
	api=${api##*:}
	cluster_node "$api" "$SSH_PORT" "$EC2_PORT"
	ENV_EXTRA+=(
		"KILN_CLUSTER=1"
		"KILN_NODE_NAME=$NODE_NAME"
		"KILN_NODE_IP=$NODE_IP"
		"KILN_CONTAINERD_ADDRESS=$CTR_SOCK"
		"KILN_POD_APISERVER=https://$SERVICE_IP:443"
		"KILN_POD_SSH_HOST=$NODE_IP"
		"KILN_POD_SSH_PORT=$SSH_PORT"
		"KILN_POD_EC2_ENDPOINT=http://$NODE_IP:$EC2_PORT"
		"KILN_POD_TOOLS_IMAGE=$TOOLS_IMAGE"
		"KILN_POD_RUNNER_IMAGE=$RUNNER_IMAGE"
		"KILN_POD_PAUSE_IMAGE=$PAUSE_IMAGE"
	)
}

# kiln's runner image (Dockerfile.runner: /bin/sh, ansible-core, ssh, git), made by
# runner-image.sh from this machine's files and PyPI wheels (cached by version),
# and imported into the node's containerd. Rebuilt only when the Dockerfile, the
# script or the Debian packages it copies change; imported only when containerd
# lacks that build.
RUNNER_IMAGE=
runner_image() {
	KILN_TEST_ENV=$STATE bash "$KILN_ENV_DIR/runner-image.sh" --cached --import ||
		die "building the runner image failed (tests/env/runner-image.sh)"
	RUNNER_IMAGE=$(bash "$KILN_ENV_DIR/runner-image.sh" --ref)
}

# ------------------------------------------------------------------ env.sh
# export_line NAME VALUE: single-quoted, so that naive parsers (strip the
# quotes) and the shell read the same value.
export_line() {
	if [[ $2 == *"'"* ]]; then printf 'export %s=%q\n' "$1" "$2"; else printf "export %s='%s'\n" "$1" "$2"; fi
}

write_env() {
	local f="$STATE/env.sh" kv
	{
		echo "# kiln integration-test environment: written by tests/env/up.sh; source it."
		printf '%s\0' \
			KUBECONFIG "$STATE/apiserver/kubeconfig" \
			KILN_TEST_ENV "$STATE" \
			KILN_SSH_HOST 127.0.0.1 \
			KILN_SSH_PORT "$SSH_PORT" \
			KILN_SSH_USER "$SSH_USER" \
			KILN_SSH_KEY "$STATE/ssh/id_ed25519" \
			KILN_SSH_WRONG_KEY "$STATE/ssh/wrong_ed25519" \
			KILN_SSH_KNOWN_HOSTS "$STATE/ssh/known_hosts" \
			KILN_SSH_BAD_KNOWN_HOSTS "$STATE/ssh/bad_known_hosts" |
			while IFS= read -r -d '' k && IFS= read -r -d '' v; do export_line "$k" "$v"; done
		for kv in "${ENV_EXTRA[@]}"; do
			export_line "${kv%%=*}" "${kv#*=}"
		done
		# kubectl and helm (build_tools) before anything else on PATH; not repeated
		# when sourced again.
		# shellcheck disable=SC2016
		echo 'case ":$PATH:" in *":$KILN_TEST_BIN:"*) ;; *) export PATH="$KILN_TEST_BIN:$PATH" ;; esac'
	} >"$f.tmp"
	mv "$f.tmp" "$f"
}

# -------------------------------------------------------------------- main
phase() { # phase NAME FUNCTION...
	local name=$1 t
	shift
	t=$(now)
	"$@"
	log "  $name: $(since "$t")"
}

phase packages ensure_packages
ensure_build_user
find_go
phase build build_apiserver
# The apiserver boots (~5 s) while sshd is set up.
phase apiserver-start start_apiserver
# kubectl and helm are built (first run) or linked while the apiserver boots.
phase tools build_tools
phase sshd start_sshd
phase ec2 start_ec2
# containerd and the images while the apiserver boots; the node once it is ready.
if [[ -n $CLUSTER ]]; then
	phase node-runtime cluster_runtime
	phase runner-image runner_image
fi
phase apiserver-ready wait_apiserver
if [[ -n $CLUSTER ]]; then
	phase node start_cluster_node
elif [[ ${KILN_CLUSTER:-} == 0 && -d $CL ]]; then
	phase node-stop cluster_down
fi
write_env
log "up in $(since "$T_ALL"); now: . $STATE/env.sh"
