# The one-node cluster of tests/env/up.sh (KILN_CLUSTER=1; see README.md,
# "Cluster mode"): containerd + runc + CNI (Debian packages) and the kubelet,
# kube-scheduler and kube-controller-manager linked into the test apiserver
# binary, on top of the environment's apiserver. Sourced by up.sh, down.sh and
# image.sh after lib.sh; needs root.
# shellcheck shell=bash

NODE_NAME=kiln-node
NODE_IP=10.99.0.1               # on lo: the kubelet refuses a loopback node IP
POD_SUBNET=10.244.0.0/24
POD_GATEWAY=10.244.0.1          # the bridge's address, set here (not by CNI)
SERVICE_IP=10.0.0.1             # the `kubernetes` Service (tests/apiserver: 10.0.0.0/24)
BRIDGE=kiln0
NAT_CHAIN=KILN-NODE             # nat table; PREROUTING jumps to it for packets from $BRIDGE
CNI_NETWORK=kiln
CL=$STATE/cluster
CTR_SOCK=$CL/containerd/containerd.sock
# One node per machine: the node IP, the bridge, the kubelet's ports and the fixed
# paths below are machine-wide. The owner file names the state dir that runs it.
NODE_LOCK_DIR=/run/kiln-test-node
# Paths that containerd (shim sockets), the CNI plugins (netns, result cache) and
# the kubelet (device plugin socket, container log symlinks) use whatever their
# config says. down.sh removes what the node left in them, and each one itself
# if up.sh created it.
HOST_DIRS=(/run/containerd /run/netns /var/lib/cni /var/lib/kubelet /var/log/containers)
# What the kubelet sets at start-up (it refuses to run otherwise); restored by down.sh.
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Not :latest, so that imagePullPolicy defaults to IfNotPresent (no registry here).
TOOLS_IMAGE=kiln.test/busybox:test

ctr_() { ctr -a "$CTR_SOCK" -n k8s.io "$@"; }

# ------------------------------------------------------------------- OCI images
# oci_build LAYOUT TAG ROOTFS [umoci config flags...]: a new OCI layout LAYOUT
# (replaced if it exists) holding one image, TAG: one layer with the contents
# of the directory ROOTFS, ownership and modes as they are (numeric), and the
# given configuration.
oci_build() {
	local layout=$1 tag=$2 rootfs=$3
	shift 3
	rm -rf "$layout"
	umoci init --layout "$layout"
	umoci new --image "$layout:$tag"
	# A layer tar of our own: umoci 0.4.7's insert writes no padding after the
	# last file and no end-of-archive blocks (GNU tar: "Unexpected EOF").
	(cd "$rootfs" && tar --numeric-owner --sort=name -cf "$layout.layer.tar" -- *)
	umoci raw add-layer --image "$layout:$tag" --history.created_by "kiln tests/env/$(basename "$0")" "$layout.layer.tar"
	rm -f "$layout.layer.tar"
	umoci config --image "$layout:$tag" --no-history "$@"
	umoci gc --layout "$layout"
}

# oci_import LAYOUT REF: imports the image of the one-image LAYOUT into
# containerd (namespace k8s.io, the kubelet's) as REF; its tag must be REF's.
oci_import() {
	local layout=$1 ref=$2
	tar -C "$layout" -cf - oci-layout index.json blobs | ctr_ images import --base-name "${ref%:*}" - >/dev/null
	[[ -n $(image_id "$ref") ]]
}

# image_id REF: the config digest containerd has for REF, empty if none.
image_id() { ctr_ images ls "name==$1" 2>/dev/null | awk 'NR == 2 { print $3 }'; }

# --------------------------------------------------------------- mode, owner
# cluster_requested: KILN_CLUSTER=1 asks for the node, =0 stops it; unset keeps
# what this state dir has (a running node stays up, with its env.sh variables).
cluster_requested() {
	case ${KILN_CLUSTER:-} in
	1) return 0 ;;
	0) return 1 ;;
	"") [[ -f $CL/running ]] ;;
	*) die "KILN_CLUSTER=$KILN_CLUSTER: want 1 (start the node), 0 (stop it) or unset (keep it as it is)" ;;
	esac
}

node_owner() { cat "$NODE_LOCK_DIR/owner" 2>/dev/null || true; }

# node_alive DIR: true if the state dir DIR has a live containerd or kubelet.
node_alive() {
	local STATE=$1 n
	for n in containerd kubelet; do
		pid_of "$n" >/dev/null && return 0
	done
	return 1
}

lock_node() {
	mkdir -p "$NODE_LOCK_DIR"
	exec 8>"$NODE_LOCK_DIR/lock"
	flock -w 300 8 || die "another up.sh/down.sh holds $NODE_LOCK_DIR/lock"
}
unlock_node() { exec 8>&-; }

# node_conflict: dies if a live node of another state dir runs on this machine.
node_conflict() {
	local owner
	owner=$(node_owner)
	if [[ -n $owner && $owner != "$STATE" ]] && node_alive "$owner"; then
		die "a kiln test node already runs on this machine, for $owner (only one node per machine: the node IP $NODE_IP, bridge $BRIDGE, ports 10250/10248 and /run/containerd are machine-wide). Stop it first: KILN_TEST_ENV=$owner bash tests/env/down.sh"
	fi
}

# cluster_preflight: what can fail before anything starts.
cluster_preflight() {
	[[ $(id -u) == 0 ]] || die "KILN_CLUSTER=1 needs root (containerd, the kubelet, iptables)"
	local sock=$CL/kubelet/root/pod-resources/kubelet.sock
	((${#sock} < 100)) || die "the state dir path is too long for the node's unix sockets ($sock): use a shorter KILN_TEST_ENV"
	node_conflict
}

# claim_node: makes this state dir the machine's node owner, or dies if a live
# node of another state dir has it. A dead owner's leftovers are cleaned first.
claim_node() {
	local owner
	owner=$(node_owner)
	[[ $owner != "$STATE" ]] || return 0
	if [[ -n $owner ]]; then
		node_conflict
		log "cluster: the node of $owner is dead: cleaning up what it left on the host"
		host_cleanup "$owner"
	fi
	if [[ -z $owner ]] && { ip -4 addr show dev lo | grep -qF " $NODE_IP/" || ip link show "$BRIDGE" >/dev/null 2>&1; }; then
		log "cluster: $NODE_IP on lo or bridge $BRIDGE exist with no owner: cleaning up"
		host_cleanup ""
	fi
	if ss -Hltn "( sport = :10250 or sport = :10248 )" 2>/dev/null | grep -q .; then
		die "port 10250 or 10248 (the kubelet's) is in use: $(ss -Hltnp '( sport = :10250 or sport = :10248 )' | tr -s ' ' | head -2)"
	fi
	echo "$STATE" >"$NODE_LOCK_DIR/owner.tmp"
	mv -f "$NODE_LOCK_DIR/owner.tmp" "$NODE_LOCK_DIR/owner"
}

# ---------------------------------------------------------------- host setup
# Records, once per node life, what down.sh must restore: which fixed dirs did
# not exist, and the sysctls the kubelet changes.
record_host() {
	local d k
	mkdir -p "$CL/host"
	if [[ ! -f $CL/host/recorded ]]; then
		: >"$CL/host/created-dirs"
		for d in "${HOST_DIRS[@]}"; do
			[[ -e $d ]] || echo "$d" >>"$CL/host/created-dirs"
		done
		: >"$CL/host/sysctls"
		for k in "${KUBELET_SYSCTLS[@]}"; do
			echo "$k=$(sysctl -n "$k")" >>"$CL/host/sysctls"
		done
		touch "$CL/host/recorded"
	fi
}

setup_host_network() {
	ip -4 addr show dev lo | grep -qF " $NODE_IP/32 " || ip addr add "$NODE_IP/32" dev lo
	# The bridge is ours, not the CNI plugin's (isGateway false): the plugin
	# would set net.ipv4.ip_forward=1, and Pods need no forwarding (everything
	# they reach is on this host).
	ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
	ip -4 addr show dev "$BRIDGE" | grep -qF " $POD_GATEWAY/24 " || ip addr add "$POD_GATEWAY/24" dev "$BRIDGE"
	ip link set "$BRIDGE" up
	# DNAT to 127.0.0.1 of packets that arrive on the bridge, and their replies.
	sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
	iptables -w -t nat -N "$NAT_CHAIN" 2>/dev/null || true
	iptables -w -t nat -C PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN" 2>/dev/null ||
		iptables -w -t nat -I PREROUTING 1 -i "$BRIDGE" -j "$NAT_CHAIN"
	# And of this host's own connections to $NODE_IP: an operator outside the
	# cluster and a runner Pod it starts (Ansible) reach the sshd at one address.
	iptables -w -t nat -C OUTPUT -d "$NODE_IP/32" -j "$NAT_CHAIN" 2>/dev/null ||
		iptables -w -t nat -I OUTPUT 1 -d "$NODE_IP/32" -j "$NAT_CHAIN"
}

# nat_rules APISERVER_PORT SSH_PORT EC2_PORT: what Pods reach on this host. Only
# packets arriving on $BRIDGE, or sent by this host to $NODE_IP, are rewritten.
nat_rules() {
	local api=$1 ssh=$2 ec2=$3
	{
		echo "*nat"
		echo "-F $NAT_CHAIN"
		echo "-A $NAT_CHAIN -d $SERVICE_IP/32 -p tcp --dport 443 -j DNAT --to-destination 127.0.0.1:$api"
		echo "-A $NAT_CHAIN -d $NODE_IP/32 -p tcp --dport $ssh -j DNAT --to-destination 127.0.0.1:$ssh"
		[[ -z $ec2 ]] || echo "-A $NAT_CHAIN -d $NODE_IP/32 -p tcp --dport $ec2 -j DNAT --to-destination 127.0.0.1:$ec2"
		echo "COMMIT"
	} | iptables-restore -w --noflush
}

# ----------------------------------------------------------------- containerd
# write_containerd_config: writes containerd's config to config.toml.new and the
# CNI config in place (read by containerd at each Pod).
write_containerd_config() {
	mkdir -p "$CL/containerd" "$CL/cni/net.d" "$CL/cni/ipam"
	[[ -n $PAUSE_IMAGE ]] || die "write_containerd_config: no pause image (find_pause)"
	cat >"$CL/containerd/config.toml.new" <<-EOF
		# kiln test node: generated by tests/env/up.sh (cluster.sh).
		version = 2
		root = "$CL/containerd/root"
		state = "$CL/containerd/state"
		[grpc]
		  address = "$CTR_SOCK"
		[ttrpc]
		  address = "$CTR_SOCK.ttrpc"
		[plugins."io.containerd.grpc.v1.cri"]
		  sandbox_image = "$PAUSE_IMAGE"
		  enable_cdi = false
		  # Required on this kind of VM: root lacks CAP_SYS_RESOURCE, so the
		  # oom_score_adj the kubelet asks for (-998 for the sandbox) fails every
		  # sandbox with "can't get final child's PID from pipe: EOF".
		  restrict_oom_score_adj = true
		  [plugins."io.containerd.grpc.v1.cri".containerd]
		    snapshotter = "overlayfs"
		    default_runtime_name = "runc"
		    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
		      runtime_type = "io.containerd.runc.v2"
		      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
		        SystemdCgroup = false
		        BinaryName = "/usr/sbin/runc"
		        Root = "$CL/containerd/runc"
		  [plugins."io.containerd.grpc.v1.cri".cni]
		    bin_dir = "/usr/lib/cni"
		    conf_dir = "$CL/cni/net.d"
		[plugins."io.containerd.internal.v1.opt"]
		  path = "$CL/containerd/opt"
	EOF
	cat >"$CL/cni/net.d/10-$CNI_NETWORK.conflist.tmp" <<-EOF
		{"cniVersion": "0.4.0", "name": "$CNI_NETWORK", "plugins": [
		  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
		   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "$POD_GATEWAY"}]],
		            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$CL/cni/ipam"}},
		  {"type": "portmap", "capabilities": {"portMappings": true}}]}
	EOF
	mv -f "$CL/cni/net.d/10-$CNI_NETWORK.conflist.tmp" "$CL/cni/net.d/10-$CNI_NETWORK.conflist"
}

CONTAINERD_RESTARTED=
start_containerd() {
	local pid i
	write_containerd_config
	if pid=$(pid_of containerd) && ctr -a "$CTR_SOCK" version >/dev/null 2>&1 &&
		cmp -s "$CL/containerd/config.toml.new" "$CL/containerd/config.toml"; then
		log "containerd: reusing pid $pid"
		return
	fi
	stop_service containerd
	mv -f "$CL/containerd/config.toml.new" "$CL/containerd/config.toml"
	start_daemon containerd "$STATE/containerd.log" containerd --config "$CL/containerd/config.toml"
	for ((i = 0; i < 300; i++)); do
		ctr -a "$CTR_SOCK" version >/dev/null 2>&1 && break
		pid_of containerd >/dev/null || break
		sleep 0.05
	done
	ctr -a "$CTR_SOCK" version >/dev/null 2>&1 || {
		tail -20 "$STATE/containerd.log" >&2
		die "containerd did not start (log: $STATE/containerd.log)"
	}
	CONTAINERD_RESTARTED=1
	log "containerd: pid $(<"$STATE/containerd.pid")"
}

# ------------------------------------------------------------------ images
PAUSE_IMAGE= PAUSE_SRC=
find_pause() {
	local kver modcache tag
	kver=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$KILN_ENV_DIR/../apiserver/go.mod")
	modcache=$(cd "$KILN_ENV_DIR/../apiserver" && "$GO" env GOMODCACHE)
	PAUSE_SRC=$modcache/k8s.io/kubernetes@$kver/build/pause
	if [[ ! -f $PAUSE_SRC/linux/pause.c ]]; then
		(cd "$KILN_ENV_DIR/../apiserver" && "$GO" mod download k8s.io/kubernetes) >/dev/null
	fi
	[[ -f $PAUSE_SRC/linux/pause.c ]] || die "no pause.c in $PAUSE_SRC (go mod download k8s.io/kubernetes@$kver)"
	tag=$(awk '$1 == "TAG" && $2 == "?=" { print $3; exit }' "$PAUSE_SRC/Makefile")
	[[ -n $tag ]] || die "cannot read the pause TAG from $PAUSE_SRC/Makefile"
	PAUSE_IMAGE=registry.k8s.io/pause:$tag
}

# ensure_image REF BUILD-FUNCTION KEY: unless containerd has REF built from KEY
# (recorded in $CL/images/<name>.key), runs BUILD-FUNCTION ROOTFS LAYOUT TAG,
# which fills ROOTFS and calls oci_build; then imports the image.
ensure_image() {
	local ref=$1 build=$2 key=$3 name tag tmp
	name=${ref##*/}
	name=${name%:*}
	tag=${ref##*:}
	mkdir -p "$CL/images"
	if [[ -n $(image_id "$ref") && $(cat "$CL/images/$name.key" 2>/dev/null) == "$key" ]]; then
		return
	fi
	tmp=$(mktemp -d "$CL/images/.rootfs.XXXXXX")
	"$build" "$tmp/rootfs" "$CL/images/$name" "$tag" >"$CL/images/$name.log" 2>&1 || {
		rm -rf "$tmp"
		tail -20 "$CL/images/$name.log" >&2
		die "building image $ref failed (log: $CL/images/$name.log)"
	}
	rm -rf "$tmp"
	oci_import "$CL/images/$name" "$ref" || die "importing $ref into containerd failed"
	echo "$key" >"$CL/images/$name.key"
	log "image $ref: built and imported"
}

build_pause_image() { # ROOTFS LAYOUT TAG
	mkdir -p "$1"
	gcc -Os -Wall -Werror -static -DVERSION="v$3-kiln" -o "$1/pause" "$PAUSE_SRC/linux/pause.c"
	strip "$1/pause"
	# As build/pause/Dockerfile: ADD pause /pause, USER 65535:65535, ENTRYPOINT ["/pause"].
	oci_build "$2" "$3" "$1" --config.user 65535:65535 --config.entrypoint /pause
}

build_tools_image() { # ROOTFS LAYOUT TAG: Debian's static busybox and its applets
	local a
	mkdir -p "$1/bin" "$1/tmp" "$1/etc"
	chmod 1777 "$1/tmp"
	cp /bin/busybox "$1/bin/busybox"
	for a in $("$1/bin/busybox" --list); do
		[[ $a == busybox ]] || ln -s busybox "$1/bin/$a"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$1/etc/passwd"
	printf 'root:x:0:\nnobody:x:65534:\n' >"$1/etc/group"
	oci_build "$2" "$3" "$1" --config.entrypoint /bin/sh --config.env PATH=/bin
}

# Part of the images' cache keys: change it when oci_build changes what it makes.
OCI_BUILD=2
ensure_images() {
	ensure_image "$PAUSE_IMAGE" build_pause_image "$(sha256sum "$PAUSE_SRC/linux/pause.c" | cut -c1-16)-$(gcc -dumpfullversion)-$OCI_BUILD"
	# The busybox-static package is statically linked: file(1) is not needed to tell.
	ensure_image "$TOOLS_IMAGE" build_tools_image "$(sha256sum /bin/busybox | cut -c1-16)-$OCI_BUILD"
}

# ------------------------------------------------------- kubelet, kcm, scheduler
write_kubelet_config() {
	local pki=$STATE/apiserver/pki
	mkdir -p "$CL/kubelet/root" "$CL/kubelet/pki" "$CL/kubelet/manifests"
	cat >"$CL/kubelet/config.yaml.tmp" <<-EOF
		# kiln test node: generated by tests/env/up.sh (cluster.sh).
		apiVersion: kubelet.config.k8s.io/v1beta1
		kind: KubeletConfiguration
		address: $NODE_IP
		port: 10250
		healthzBindAddress: 127.0.0.1
		healthzPort: 10248
		readOnlyPort: 0
		cgroupDriver: cgroupfs
		failCgroupV1: false
		failSwapOn: false
		containerRuntimeEndpoint: unix://$CTR_SOCK
		# Only the apiserver (the admin client certificate) may use the kubelet API.
		authentication:
		  anonymous: {enabled: false}
		  webhook: {enabled: false}
		  x509: {clientCAFile: $pki/ca.crt}
		authorization: {mode: AlwaysAllow}
		clusterDomain: cluster.local
		resolvConf: /etc/resolv.conf
		# No iptables chains (KUBE-FIREWALL...) on the host: nothing here needs them.
		makeIPTablesUtilChains: false
		imageGCHighThresholdPercent: 100
		evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
		staticPodPath: $CL/kubelet/manifests
		volumePluginDir: $CL/kubelet/volume-plugins
		podLogsDir: $CL/kubelet/pod-logs
	EOF
	mv -f "$CL/kubelet/config.yaml.tmp" "$CL/kubelet/config.yaml"
}

# node_reusable NAME: true if NAME (a subcommand of the apiserver binary) runs
# from $BIN against the current apiserver (a new one has a fresh etcd, without
# the Node: the kubelet must register again) and containerd.
node_reusable() {
	local pid
	[[ -z $CONTAINERD_RESTARTED ]] && pid=$(pid_of "$1") && [[ $(readlink "/proc/$pid/exe") == "$BIN" &&
		$(cat "$CL/$1.for" 2>/dev/null) == "$BIN $(<"$STATE/apiserver.pid")" ]]
}

# node_component NAME ARGS...: (re)starts NAME unless node_reusable.
NODE_RESTARTED=
node_component() {
	local name=$1
	shift
	if node_reusable "$name"; then
		log "$name: reusing pid $(pid_of "$name")"
		return
	fi
	stop_service "$name"
	start_daemon "$name" "$STATE/$name.log" "$BIN" "$name" "$@"
	echo "$BIN $(<"$STATE/apiserver.pid")" >"$CL/$name.for"
	NODE_RESTARTED=1
}

# clean_node: no Pod, no kubelet state, no IP lease: what a new kubelet starts
# from (with a new apiserver, the Pods of the old one are orphans anyway).
clean_node() {
	stop_service kubelet
	"$BIN" cri-clean --endpoint "unix://$CTR_SOCK" --timeout 60s >"$CL/cri-clean.log" 2>&1 || {
		cat "$CL/cri-clean.log" >&2
		die "cri-clean failed (log: $CL/cri-clean.log)"
	}
	unmount_under "$CL/kubelet"
	rm -rf --one-file-system "$CL/kubelet/root" "$CL/cni/ipam"
	mkdir -p "$CL/kubelet/root" "$CL/cni/ipam"
}

start_node() {
	local pki=$STATE/apiserver/pki kubeconfig=$STATE/apiserver/kubeconfig
	write_kubelet_config
	node_reusable kubelet || clean_node
	node_component kubelet --config="$CL/kubelet/config.yaml" --kubeconfig="$kubeconfig" \
		--root-dir="$CL/kubelet/root" --cert-dir="$CL/kubelet/pki" \
		--node-ip="$NODE_IP" --hostname-override="$NODE_NAME" --v=1
	# Not the controllers the apiserver already runs in-process (tests/apiserver/controllers.go).
	node_component kube-controller-manager --kubeconfig="$kubeconfig" --leader-elect=false \
		--secure-port=0 --flex-volume-plugin-dir="$CL/kcm-volume-plugins" --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
		--controllers='*,-clusterrole-aggregation-controller,-namespace-controller,-serviceaccount-controller,-garbage-collector-controller,-service-lb-controller,-node-route-controller,-cloud-node-lifecycle-controller' \
		--v=1
	node_component kube-scheduler --kubeconfig="$kubeconfig" --leader-elect=false --secure-port=0 --v=1
}

kubectl_() { "$STATE/bin/kubectl" --kubeconfig "$STATE/apiserver/kubeconfig" "$@"; }

wait_node() {
	local timeout=${KILN_NODE_TIMEOUT:-120} t0 ready n
	t0=$(date +%s)
	while :; do
		ready=$(kubectl_ get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
		[[ $ready == True ]] && kubectl_ get configmap kube-root-ca.crt -n default >/dev/null 2>&1 && break
		for n in containerd kubelet kube-controller-manager kube-scheduler; do
			pid_of "$n" >/dev/null && continue
			tail -30 "$STATE/$n.log" >&2
			die "$n exited (log: $STATE/$n.log)"
		done
		if (($(date +%s) - t0 > timeout)); then
			tail -30 "$STATE/kubelet.log" >&2
			die "node $NODE_NAME not Ready within ${timeout}s (Ready=$ready; logs: $STATE/kubelet.log, $STATE/containerd.log)"
		fi
		sleep 0.2
	done
}

# cluster_up APISERVER_PORT SSH_PORT EC2_PORT: everything after the apiserver is
# ready. cluster_runtime (containerd, images) ran before, while it booted.
cluster_runtime() {
	cluster_preflight
	mkdir -p "$CL"
	lock_node
	claim_node
	record_host
	setup_host_network
	find_pause
	start_containerd
	unlock_node
	ensure_images
}

cluster_node() {
	local api=$1 ssh=$2 ec2=$3 t
	nat_rules "$api" "$ssh" "$ec2"
	t=$(now)
	start_node
	wait_node
	touch "$CL/running"
	if [[ -n $NODE_RESTARTED ]]; then
		log "node $NODE_NAME: Ready $(since "$t") after the kubelet (re)started"
	else
		log "node $NODE_NAME: Ready"
	fi
}

# -------------------------------------------------------------------- teardown
# unmount_under DIR...: unmounts every mount point at or below DIR, deepest first.
unmount_under() {
	local d m
	for d in "$@"; do
		d=$(realpath -m "$d")
		awk -v d="$d" '{ m = $5; gsub(/\\040/, " ", m); if (m == d || index(m, d "/") == 1) print m }' /proc/self/mountinfo |
			sort -r | while IFS= read -r m; do
			umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
		done
	done
}

# kill_cgroups NAME: kills every process in, and removes, the cgroup NAME (e.g.
# kubepods) of every hierarchy.
kill_cgroups() {
	local name=$1 root d i
	for root in $(awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts); do
		d=$root/$name
		[[ -d $d ]] || continue
		for ((i = 0; i < 20; i++)); do
			find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
			find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
			[[ -d $d ]] || break
			sleep 0.1
		done
		[[ ! -d $d ]] || log "cannot remove cgroup $d"
	done
}

# iptables_remove CHAIN-REGEX: removes from every table the rules that jump to
# chains matching CHAIN-REGEX, then those chains.
iptables_remove() {
	local re=$1 t rule chain
	for t in nat filter mangle raw; do
		iptables -w -t "$t" -S 2>/dev/null | awk -v re="$re" '$1 == "-A" { for (i = 3; i < NF; i++) if (($i == "-j" || $i == "-g") && $(i + 1) ~ re) { print; next } }' |
			while IFS= read -r rule; do
				eval "iptables -w -t $t -D ${rule#-A }" 2>/dev/null || true
			done
		for chain in $(iptables -w -t "$t" -S 2>/dev/null | awk -v re="$re" '$1 == "-N" && $2 ~ re { print $2 }'); do
			iptables -w -t "$t" -F "$chain" 2>/dev/null || true
			iptables -w -t "$t" -X "$chain" 2>/dev/null || log "cannot delete iptables chain $t/$chain"
		done
	done
}

# host_cleanup DIR: removes what the node of state dir DIR ("" if unknown) left
# on the host outside DIR. Only for the machine's node owner (or a dead one).
host_cleanup() {
	local dir=$1 pid d line k v
	# Shims (each in its own session) and their containers.
	if [[ -n $dir ]]; then
		for pid in $(pgrep -f '^/usr/bin/containerd-shim-runc-v2 ' || true); do
			if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/cluster/containerd/"; then
				kill -KILL "$pid" 2>/dev/null || true
			fi
		done
	fi
	kill_cgroups kubepods
	for d in /run/netns/cni-*; do
		[[ -e $d ]] || continue
		umount "$d" 2>/dev/null || true
		rm -f "$d"
	done
	[[ -z $dir ]] || unmount_under "$dir/cluster"
	unmount_under /run/containerd
	# The CNI plugins' chains (portmap: CNI-HOSTPORT-*, per Pod: CNI-*) and ours.
	iptables_remove "^(CNI-|$NAT_CHAIN\$)"
	ip link del "$BRIDGE" 2>/dev/null || true
	ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
	if [[ -n $dir && -f $dir/cluster/host/recorded ]]; then
		while IFS='=' read -r k v; do
			if [[ -n $k && $(sysctl -n "$k") != "$v" ]]; then sysctl -qw "$k=$v"; fi
		done <"$dir/cluster/host/sysctls"
		if [[ -d /var/log/containers ]]; then
			find /var/log/containers -maxdepth 1 -type l -lname "$dir/cluster/*" -delete
		fi
		# (What CNI DEL did not remove: a crashed node.)
		rm -f /var/lib/cni/results/"$CNI_NETWORK"-* /var/lib/cni/results/cni-loopback-* \
			/var/lib/kubelet/device-plugins/kubelet.sock \
			/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
		if [[ -d /run/containerd/s ]]; then find /run/containerd/s -type s -delete; fi
		while IFS= read -r d; do
			if [[ -d $d ]]; then find "$d" -depth -type d -empty -delete 2>/dev/null || true; fi
			[[ ! -e $d ]] || log "left $d (not empty)"
		done <"$dir/cluster/host/created-dirs"
		rm -f "$dir/cluster/host/recorded"
	fi
	[[ $(node_owner) != "$dir" ]] || rm -f "$NODE_LOCK_DIR/owner"
}

# cluster_down: stops this state dir's node and, if it owns the machine's node,
# cleans up the host. Safe to run when nothing runs.
cluster_down() {
	local n owner
	[[ -d $CL ]] || return 0
	for n in kube-scheduler kube-controller-manager kubelet; do
		stop_service "$n" 10
	done
	if pid_of containerd >/dev/null; then
		# Through the CRI, so that the CNI plugins tear each Pod's network down.
		"$(cluster_bin)" cri-clean --endpoint "unix://$CTR_SOCK" --timeout 60s >"$CL/cri-clean.log" 2>&1 ||
			log "cri-clean failed (log: $CL/cri-clean.log); cleaning up by force"
	fi
	stop_service containerd 10
	rm -f "$CL/running"
	if [[ $(id -u) == 0 ]]; then
		lock_node
		owner=$(node_owner)
		# Also what a crashed node left: shims, containers, netns, mounts, rules.
		if [[ -z $owner || $owner == "$STATE" ]]; then host_cleanup "$STATE"; fi
		unlock_node
	fi
	unmount_under "$CL"
	rm -rf --one-file-system "$CL/cni/ipam"
}

# cluster_bin: the apiserver binary that ran the node (for cri-clean).
cluster_bin() {
	local b
	b=$(awk '{ print $1; exit }' "$CL/kubelet.for" 2>/dev/null || true)
	[[ -x $b ]] || b=$(LC_ALL=C ls -1t "${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/kiln}"/kiln-test-apiserver-* 2>/dev/null | grep -v '\.tmp\.' | head -1)
	echo "$b"
}
