#!/usr/bin/env bash
# Builds kiln's container image without Docker or a registry: the release
# binary on a minimal Debian root filesystem, as an OCI layout (umoci), tagged
# as the Helm chart's default image and, if the cluster mode's containerd of
# this environment runs, imported into it (namespace k8s.io), so that
# `helm install charts/kiln` runs it as is (pullPolicy IfNotPresent).
#
#   cargo build --release --bin kiln && bash tests/env/image.sh
#
# What the image is comes from the Dockerfile's final stage, so the two cannot
# drift: its USER, ENTRYPOINT, CMD, EXPOSE and LABELs, and the COPY of the
# binary (its destination). The base, gcr.io/distroless/cc-debian12:nonroot, is
# mirrored here: /etc/passwd and /etc/group with nonroot (65532), /home/nonroot,
# /tmp, the CA bundle and /etc/os-release of this (Debian 12) machine, the C
# library files the binary links (ldd), and the base's Env and WorkingDir. An
# instruction this script does not know, or another base, is an error.
# tests/image.rs checks the result against the Dockerfile.
#
# Options:
#   --binary PATH   the kiln binary (default: target/release/kiln); stripped
#                   into the image, as the Dockerfile does
#   --layout DIR    the OCI layout to write (replaced; default: <state>/cluster/images/kiln)
#   --no-import     do not import into containerd (default: import if this
#                   environment's containerd runs; --import: fail if it does not)
#   --dockerfile F  mirror F instead of the repository's Dockerfile (tests)
#   --ref           print the image reference (from charts/kiln) and exit
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=cluster.sh
source "$KILN_ENV_DIR/cluster.sh"

BASE=gcr.io/distroless/cc-debian12:nonroot
binary=$KILN_REPO_ROOT/target/release/kiln layout= import=auto dockerfile=$KILN_REPO_ROOT/Dockerfile
while (($#)); do
	case $1 in
	--binary) binary=$2 && shift ;;
	--layout) layout=$2 && shift ;;
	--no-import) import=no ;;
	--import) import=yes ;;
	--dockerfile) dockerfile=$2 && shift ;;
	--ref) import=ref ;;
	*) die "usage: $0 [--binary PATH] [--layout DIR] [--no-import|--import] [--dockerfile FILE] [--ref]" ;;
	esac
	shift
done
layout=$(realpath -m "${layout:-$CL/images/kiln}")

# ---------------------------------------------------------------- the reference
# The chart's default image: image.repository and image.tag (empty: appVersion).
REF=$(chart_ref image)
tag=${REF##*:}
if [[ $import == ref ]]; then
	echo "$REF"
	exit 0
fi

for t in umoci python3 strip ldd; do
	command -v "$t" >/dev/null || die "$t is missing (tests/env/up.sh installs umoci and binutils)"
done
[[ -f $binary && -x $binary ]] || die "no kiln binary at $binary (cargo build --release --bin kiln)"
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || die "no /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)"
T0=$(now)

# ------------------------------------------------------------- the Dockerfile
# One line per fact of the final stage: base IMAGE, copy SRC DST, user U,
# entrypoint JSON, cmd JSON, expose PORT/PROTO, label KEY<TAB>VALUE.
facts=$(python3 - "$dockerfile" <<'EOF'
import json, shlex, sys

text = open(sys.argv[1]).read()
lines, cur = [], ""
for raw in text.splitlines():
    s = raw.strip()
    if not cur and (not s or s.startswith("#")):
        continue
    if cur and s.startswith("#"):
        continue  # a comment inside a continued instruction
    if s.endswith("\\"):
        cur += s[:-1] + " "
        continue
    lines.append(cur + s)
    cur = ""
stages = []
for l in lines:
    word, _, rest = l.partition(" ")
    word, rest = word.upper(), rest.strip()
    if word == "FROM":
        stages.append([])
    if not stages:
        continue  # ARG before FROM, parser directives
    stages[-1].append((word, rest))

def fail(msg):
    print("Dockerfile: " + msg, file=sys.stderr)
    sys.exit(1)

out, copies = [], 0
for word, rest in stages[-1]:
    if word == "FROM":
        base = rest.split()[0]
        out.append("base " + base)
    elif word == "COPY":
        args = shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        paths = [a for a in args if not a.startswith("--")]
        if [f for f in flags if not f.startswith("--from=")] or len(paths) != 2:
            fail("COPY %s: only COPY --from=STAGE SRC DST (one file) is mirrored" % rest)
        copies += 1
        out.append("copy %s %s" % (paths[0], paths[1]))
    elif word == "USER":
        out.append("user " + rest)
    elif word in ("ENTRYPOINT", "CMD"):
        try:
            v = json.loads(rest)
            assert isinstance(v, list) and all(isinstance(x, str) for x in v)
        except Exception:
            fail("%s %s: only the exec (JSON array) form is mirrored" % (word, rest))
        out.append("%s %s" % (word.lower(), json.dumps(v)))
    elif word == "EXPOSE":
        for p in rest.split():
            out.append("expose " + (p if "/" in p else p + "/tcp"))
    elif word == "LABEL":
        for kv in shlex.split(rest):
            k, eq, v = kv.partition("=")
            if not eq:
                fail("LABEL %s: only KEY=VALUE is mirrored" % rest)
            if "\t" in k or "\n" in v:
                fail("LABEL %s: no tabs in keys, no newlines in values" % rest)
            out.append("label %s\t%s" % (k, v))
    else:
        fail("%s in the final stage: tests/env/image.sh does not know how to mirror it" % word)
if copies != 1:
    fail("the final stage must COPY exactly one file (the kiln binary); it has %d COPY" % copies)
print("\n".join(out))
EOF
) || die "cannot mirror the Dockerfile (above)"

user= entry=() cmd=() config=()
while IFS= read -r line; do
	case $line in
	"base "*)
		[[ ${line#base } == "$BASE" ]] ||
			die "the Dockerfile's final stage is FROM ${line#base }; this script mirrors $BASE only"
		;;
	"copy "*)
		read -r _ src dst <<<"$line"
		[[ $src == */target/release/kiln ]] || die "the Dockerfile copies $src, not the release binary"
		;;
	"user "*) user=${line#user } ;;
	"entrypoint "*) mapfile -t entry < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "${line#entrypoint }") ;;
	"cmd "*) mapfile -t cmd < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "${line#cmd }") ;;
	"expose "*) config+=("--config.exposedports=${line#expose }") ;;
	"label "*)
		line=${line#label }
		config+=("--config.label=${line%%$'\t'*}=${line#*$'\t'}")
		;;
	esac
done <<<"$facts"

# ---------------------------------------------------------------- the rootfs
mkdir -p "$(dirname "$layout")"
work=$(mktemp -d "$(dirname "$layout")/.kiln-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
R=$work/rootfs
mkdir -p "$R/etc/ssl/certs" "$R/home/nonroot" "$R/tmp" "$R$(dirname "$dst")"
chmod 1777 "$R/tmp"
chmod 700 "$R/home/nonroot"
# The base's users, as distroless has them.
cat >"$R/etc/passwd" <<-EOF
	root:x:0:0:root:/root:/sbin/nologin
	nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
	nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$R/etc/group" <<-EOF
	root:x:0:
	tty:x:5:
	staff:x:50:
	nobody:x:65534:
	nonroot:x:65532:
EOF
echo "hosts: files dns" >"$R/etc/nsswitch.conf"
cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/os-release "$R/etc/os-release"
strip -o "$R$dst" "$binary" # as the Dockerfile's build stage does
chmod 755 "$R$dst"
# The C library files the binary links, at the paths the loader looks them up.
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[[ -n $libs ]] || die "ldd found no libraries in $binary (a static binary? then this script needs no libc)"
for l in $libs; do
	mkdir -p "$R$(dirname "$l")"
	cp -L "$l" "$R$l"
done
chown -R 0:0 "$R" 2>/dev/null || true
chown 65532:65532 "$R/home/nonroot" 2>/dev/null || log "not root: /home/nonroot is not owned by 65532 in the image"

# ------------------------------------------------------------------ the image
args=(--config.user="$user" --config.workingdir=/home/nonroot
	--config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	--config.env=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)
for a in "${entry[@]}"; do args+=("--config.entrypoint=$a"); done
for a in "${cmd[@]}"; do args+=("--config.cmd=$a"); done
oci_build "$layout" "$tag" "$R" "${args[@]}" "${config[@]}" >"$work/umoci.log" 2>&1 || {
	cat "$work/umoci.log" >&2
	die "umoci failed"
}
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$layout/index.json")
log "image $REF: OCI layout $layout ($(du -sh "$layout" | cut -f1); manifest $digest) in $(since "$T0")"

if [[ $import == no ]]; then exit 0; fi
if pid_of containerd >/dev/null && ctr -a "$CTR_SOCK" version >/dev/null 2>&1; then
	oci_import "$layout" "$REF" || die "importing $REF into containerd ($CTR_SOCK) failed"
	log "image $REF: imported into containerd ($CTR_SOCK, namespace k8s.io)"
elif [[ $import == yes ]]; then
	die "containerd of $STATE does not run (KILN_CLUSTER=1 bash tests/env/up.sh)"
fi
