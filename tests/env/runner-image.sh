#!/usr/bin/env bash
# Builds kiln's runner image (Dockerfile.runner: what the runner Pods of shellLocal
# and ansible provisioners run) without Docker or a registry, as tests/env/image.sh
# builds kiln's own: a root filesystem of this Debian 12 machine's files, an OCI
# layout made with umoci, tagged as the Helm chart's default runner image
# (runner.repository:runner.tag, the appVersion by default) and, if the cluster
# mode's containerd of this environment runs, imported into it (namespace k8s.io).
# tests/env/up.sh runs it in cluster mode (--cached) and writes the reference to
# env.sh as KILN_POD_RUNNER_IMAGE.
#
#   bash tests/env/runner-image.sh
#
# What goes in, mirroring Dockerfile.runner's final stage (debian:12-slim plus
# apt-get install python3 openssh-client git ca-certificates, and ansible-core in a
# virtualenv at /opt/ansible):
# - busybox (busybox-static) as /bin/sh and its applets (the usual utilities);
# - Debian's /usr/bin/python3.11 and /usr/lib/python3.11 (less the test suite,
#   tkinter, idle, lib2to3, ensurepip, distutils, the static library);
# - ansible-core at the Dockerfile's ARG ANSIBLE_CORE_VERSION and its dependencies,
#   wheels from PyPI (cached by version: <cache>/runner-wheels; later builds are
#   offline), installed by Debian's pip into the virtualenv /opt/ansible;
# - ssh, scp, sftp, ssh-keygen, ssh-keyscan, ssh-add, ssh-agent and ssh_config;
# - git, its helpers in /usr/lib/git-core (git-remote-http[s] for http(s):// clones;
#   no git-daemon, http-backend, http-push, imap-send, shell, scalar, no Perl
#   scripts) and templates;
# - every shared library that ldd lists for any ELF file in the image (the wheels'
#   and lib-dynload's extension modules included), the C.UTF-8 locale, the CA
#   bundle, /etc/passwd and /etc/group with nonroot (65532, home /tmp),
#   /etc/nsswitch.conf, /etc/os-release.
# USER, WORKDIR, ENV, CMD and LABELs come from the Dockerfile's final stage (ENV
# over debian:12-slim's PATH), and its apt-get install must name only packages this
# script provides: an instruction or package it does not know is an error.
# tests/image.rs checks the result against Dockerfile.runner.
#
# Options:
#   --layout DIR    the OCI layout to write (default: <state>/cluster/images/kiln-runner)
#   --no-import     do not import into containerd (default: import if this
#                   environment's containerd runs; --import: fail if it does not)
#   --cached        keep DIR if it was built from the same inputs (DIR.key: the
#                   Dockerfile, this script, the Debian packages' versions), and skip
#                   the import if containerd has the same image under the reference
#   --dockerfile F  mirror F instead of the repository's Dockerfile.runner (tests)
#   --ref           print the image reference (from charts/kiln) and exit
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=cluster.sh
source "$KILN_ENV_DIR/cluster.sh"

BASES=(docker.io/library/debian:12-slim debian:12-slim)
BASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin # debian:12-slim's Env
# The Debian packages the Dockerfile's final stage may install: this script provides them.
KNOWN_PACKAGES=(python3 openssh-client git ca-certificates)
PY=/usr/bin/python3.11 # Debian's, not another python3.11 on PATH
VENV=/opt/ansible
layout='' import=auto cached='' dockerfile=$KILN_REPO_ROOT/Dockerfile.runner
while (($#)); do
	case $1 in
	--layout) layout=$2 && shift ;;
	--no-import) import=no ;;
	--import) import=yes ;;
	--cached) cached=1 ;;
	--dockerfile) dockerfile=$2 && shift ;;
	--ref) import=ref ;;
	*) die "usage: $0 [--layout DIR] [--no-import|--import] [--cached] [--dockerfile FILE] [--ref]" ;;
	esac
	shift
done
layout=$(realpath -m "${layout:-$CL/images/kiln-runner}")

# ---------------------------------------------------------------- the reference
# The chart's default runner image: runner.repository and runner.tag (empty:
# appVersion); runner.image, when set, overrides it at install time.
REF=$(chart_ref runner)
tag=${REF##*:}
if [[ $import == ref ]]; then
	echo "$REF"
	exit 0
fi

for t in umoci ldd tar sha256sum; do
	command -v "$t" >/dev/null || die "$t is missing (tests/env/up.sh installs umoci)"
done
[[ -x $PY ]] || die "no $PY (apt-get install python3.11)"
"$PY" -m pip --version >/dev/null 2>&1 || die "no pip for $PY (apt-get install python3-pip)"
"$PY" -c 'import venv' 2>/dev/null || die "no venv module for $PY (apt-get install python3-venv)"
[[ -x /bin/busybox ]] || die "no /bin/busybox (apt-get install busybox-static)"
for f in /usr/bin/ssh /usr/bin/git /usr/lib/git-core/git-remote-http /etc/ssl/certs/ca-certificates.crt /usr/lib/locale/C.utf8/LC_CTYPE; do
	[[ -e $f ]] || die "no $f (apt-get install openssh-client git ca-certificates)"
done
grep -qx 'VERSION_ID="12"' /etc/os-release || log "warning: this is not Debian 12; the image mirrors debian:12-slim"
T0=$(now)

# ------------------------------------------------------------- the Dockerfile
# One line per fact: base IMAGE, version V (ARG ANSIBLE_CORE_VERSION), package P
# (apt-get install of the final stage), user U, workdir D, env K=V, cmd JSON,
# entrypoint JSON, label KEY<TAB>VALUE.
facts=$(python3 - "$dockerfile" "$VENV" <<'EOF'
import json, re, shlex, sys

text = open(sys.argv[1]).read()
venv = sys.argv[2]
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

def fail(msg):
    print("Dockerfile.runner: " + msg, file=sys.stderr)
    sys.exit(1)

glob, stages = [], []
for l in lines:
    word, _, rest = l.partition(" ")
    word, rest = word.upper(), rest.strip()
    if word == "FROM":
        stages.append([])
    (stages[-1] if stages else glob).append((word, rest))
if not stages:
    fail("no FROM")

# ansible-core's version: the one ARG with a default.
versions = [r.split("=", 1)[1] for w, r in glob + [i for s in stages for i in s]
            if w == "ARG" and r.startswith("ANSIBLE_CORE_VERSION=")]
if len(versions) != 1 or not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", versions[0].strip('"')):
    fail("want one ARG ANSIBLE_CORE_VERSION=X.Y.Z, got %r" % versions)
out = ["version " + versions[0].strip('"')]
if not re.search(r'ansible-core==\$\{?ANSIBLE_CORE_VERSION\}?', text):
    fail("no pip install of ansible-core==${ANSIBLE_CORE_VERSION}")

out_env, copies = [], 0
for word, rest in stages[-1]:
    if word == "FROM":
        out.append("base " + rest.split()[0])
    elif word == "RUN":
        # The Debian packages: the words after each apt-get install (options dropped).
        for m in re.finditer(r"apt-get\s+install\s+([^;&|]*)", rest):
            for p in shlex.split(m.group(1)):
                if not p.startswith("-"):
                    out.append("package " + p)
    elif word == "COPY":
        args = shlex.split(rest)
        if args != ["--from=build", venv, venv]:
            fail("COPY %s: only COPY --from=build %s %s (the virtualenv) is mirrored" % (rest, venv, venv))
        copies += 1
    elif word == "ENV":
        words = shlex.split(rest)
        if not words or not all("=" in w for w in words):
            fail("ENV %s: only the KEY=VALUE form is mirrored" % rest)
        for w in words:
            if "$" in w or "\n" in w:
                fail("ENV %s: no variable references or newlines (not mirrored)" % w)
            out.append("env " + w)
    elif word == "USER":
        out.append("user " + rest)
    elif word == "WORKDIR":
        out.append("workdir " + rest)
    elif word in ("ENTRYPOINT", "CMD"):
        try:
            v = json.loads(rest)
            assert isinstance(v, list) and all(isinstance(x, str) for x in v)
        except Exception:
            fail("%s %s: only the exec (JSON array) form is mirrored" % (word, rest))
        out.append("%s %s" % (word.lower(), json.dumps(v)))
    elif word == "LABEL":
        for kv in shlex.split(rest):
            k, eq, v = kv.partition("=")
            if not eq:
                fail("LABEL %s: only KEY=VALUE is mirrored" % rest)
            if "\t" in k or "\n" in v:
                fail("LABEL %s: no tabs in keys, no newlines in values" % rest)
            out.append("label %s\t%s" % (k, v))
    elif word == "ARG":
        pass
    else:
        fail("%s in the final stage: tests/env/runner-image.sh does not know how to mirror it" % word)
if copies != 1:
    fail("the final stage must COPY the virtualenv %s from the build stage" % venv)
if not any(l.startswith(("cmd ", "entrypoint ")) for l in out):
    fail("no CMD or ENTRYPOINT: the base's CMD is bash, which the local image does not have")
print("\n".join(out))
EOF
) || die "cannot mirror $dockerfile (above)"

version='' user='' workdir=/ env=("PATH=$BASE_PATH") config=() packages=()
setenv() { # setenv K=V: replaces K in env (in place) or appends it, as Docker does
	local i
	for i in "${!env[@]}"; do
		if [[ ${env[i]%%=*} == "${1%%=*}" ]]; then
			env[i]=$1
			return
		fi
	done
	env+=("$1")
}
while IFS= read -r line; do
	case $line in
	"base "*)
		[[ " ${BASES[*]} " == *" ${line#base } "* ]] ||
			die "the final stage of $dockerfile is FROM ${line#base }; this script mirrors ${BASES[0]} only"
		;;
	"version "*) version=${line#version } ;;
	"package "*)
		packages+=("${line#package }")
		[[ " ${KNOWN_PACKAGES[*]} " == *" ${line#package } "* ]] ||
			die "$dockerfile installs ${line#package }: this script provides ${KNOWN_PACKAGES[*]} only (teach it the package)"
		;;
	"user "*) user=${line#user } ;;
	"workdir "*) workdir=${line#workdir } ;;
	"env "*) setenv "${line#env }" ;;
	"entrypoint "*) while IFS= read -r a; do config+=("--config.entrypoint=$a"); done < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "${line#entrypoint }") ;;
	"cmd "*) while IFS= read -r a; do config+=("--config.cmd=$a"); done < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "${line#cmd }") ;;
	"label "*)
		line=${line#label }
		config+=("--config.label=${line%%$'\t'*}=${line#*$'\t'}")
		;;
	esac
done <<<"$facts"
for p in "${KNOWN_PACKAGES[@]}"; do
	[[ " ${packages[*]} " == *" $p "* ]] || die "$dockerfile does not apt-get install $p, which this script puts in the image"
done
[[ $user =~ ^([0-9]+)(:([0-9]+))?$ ]] || die "USER $user: want numeric UID[:GID] (runAsNonRoot needs a numeric user)"
UID_=${BASH_REMATCH[1]} GID_=${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}
home=/tmp
for kv in "${env[@]}"; do [[ ${kv%%=*} != HOME ]] || home=${kv#*=}; done

# ------------------------------------------------------------------ the cache
CACHE=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/kiln}
pkgs=(busybox-static python3.11 python3.11-minimal libpython3.11-stdlib libpython3.11-minimal
	openssh-client git ca-certificates libc6 libcurl3-gnutls libssl3)
key=$({
	cat "$dockerfile" "${BASH_SOURCE[0]}"
	echo "OCI_BUILD=$OCI_BUILD ref=$REF"
	dpkg-query -W -f='${Package}=${Version}\n' "${pkgs[@]}" 2>/dev/null || true
} | sha256sum | cut -c1-16)

layout_digest() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$1/index.json"; }

import_layout() {
	local digest
	[[ $import != no ]] || return 0
	if pid_of containerd >/dev/null && ctr -a "$CTR_SOCK" version >/dev/null 2>&1; then
		digest=$(layout_digest "$layout")
		if [[ -n $cached && $(image_id "$REF") == "$digest" ]]; then
			log "runner image $REF: containerd has it ($digest)"
			return 0
		fi
		local t
		t=$(now)
		oci_import "$layout" "$REF" || die "importing $REF into containerd ($CTR_SOCK) failed"
		log "runner image $REF: imported into containerd ($CTR_SOCK, namespace k8s.io) in $(since "$t")"
	elif [[ $import == yes ]]; then
		die "containerd of $STATE does not run (KILN_CLUSTER=1 bash tests/env/up.sh)"
	fi
}

if [[ -n $cached && -f $layout/index.json && $(cat "$layout.key" 2>/dev/null) == "$key" ]]; then
	log "runner image $REF: layout $layout is up to date ($key)"
	import_layout
	exit 0
fi

# ansible-core and its dependencies as wheels, downloaded once per version.
wheels=$CACHE/runner-wheels/ansible-core-$version-py3.11
if [[ ! -f $wheels/.complete ]]; then
	t=$(now)
	mkdir -p "$(dirname "$wheels")"
	rm -rf "$wheels.tmp.$$"
	"$PY" -m pip download --quiet --only-binary=:all: --dest "$wheels.tmp.$$" "ansible-core==$version" ||
		die "pip download ansible-core==$version failed (PyPI unreachable?)"
	touch "$wheels.tmp.$$/.complete"
	rm -rf "$wheels"
	mv "$wheels.tmp.$$" "$wheels"
	log "ansible-core $version: wheels downloaded in $(since "$t") ($wheels)"
fi

# ---------------------------------------------------------------- the rootfs
mkdir -p "$(dirname "$layout")"
work=$(mktemp -d "$(dirname "$layout")/.kiln-runner-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
R=$work/rootfs
# Merged /usr, as Debian 12.
mkdir -p "$R"/usr/{bin,sbin,lib,lib64} "$R"/etc/ssl/certs "$R/tmp" "$R/opt" "$R/root" "$R/usr/lib/locale"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$R/$d"; done
chmod 1777 "$R/tmp"
chmod 700 "$R/root"

# Users: root, nobody and the image's USER (nonroot), home /tmp: ssh looks for
# ~/.ssh in the passwd entry of the current uid.
cat >"$R/etc/passwd" <<-EOF
	root:x:0:0:root:/root:/bin/sh
	nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
	nonroot:x:$UID_:$GID_:nonroot:$home:/bin/sh
EOF
cat >"$R/etc/group" <<-EOF
	root:x:0:
	nogroup:x:65534:
	nonroot:x:$GID_:
EOF
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' >"$R/etc/nsswitch.conf"
cp -L /etc/os-release "$R/etc/os-release"
cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
# OpenSSL's default paths, as Debian links them.
mkdir -p "$R/usr/lib/ssl"
ln -s /etc/ssl/certs "$R/usr/lib/ssl/certs"
ln -s /etc/ssl/certs/ca-certificates.crt "$R/usr/lib/ssl/cert.pem"
cp -a /usr/lib/locale/C.utf8 "$R/usr/lib/locale/"

# Python 3.11: Debian's interpreter and standard library.
cp -a "$PY" "$R/usr/bin/python3.11"
ln -s python3.11 "$R/usr/bin/python3"
tar -C /usr/lib --exclude=python3.11/test --exclude=python3.11/idlelib --exclude=python3.11/tkinter \
	--exclude=python3.11/turtledemo --exclude=python3.11/lib2to3 --exclude=python3.11/ensurepip \
	--exclude=python3.11/distutils --exclude='python3.11/config-3.11-*' --exclude=python3.11/site-packages \
	--exclude=python3.11/dist-packages -cf - python3.11 | tar -C "$R/usr/lib" -xf -
mkdir -p "$R/etc/python3.11"
[[ ! -f /etc/python3.11/sitecustomize.py ]] || cp /etc/python3.11/sitecustomize.py "$R/etc/python3.11/"

# ansible-core in a virtualenv, as the Dockerfile's build stage makes it: wheels
# only, no pip or setuptools in it. Paths under $R become /opt/ansible.
"$PY" -m venv --without-pip "$R$VENV"
PIP_LOG=$work/pip.log
"$PY" -m pip --isolated --python "$R$VENV/bin/python3" install --no-index --find-links "$wheels" \
	--only-binary=:all: --no-compile --no-warn-script-location "ansible-core==$version" >"$PIP_LOG" 2>&1 || {
	cat "$PIP_LOG" >&2
	die "pip install ansible-core==$version into the image failed"
}
rm -f "$R$VENV"/bin/activate* "$R$VENV"/bin/Activate.ps1
sed -i -e "s|$R$VENV|$VENV|g" -e "s|^command = .*|command = /usr/bin/python3 -m venv $VENV|" "$R$VENV/pyvenv.cfg"
for f in "$R$VENV"/bin/*; do
	[[ -f $f && ! -L $f ]] || continue
	[[ $(head -c4 "$f") != $'\x7fELF' ]] || continue
	sed -i "s|$R$VENV|$VENV|g" "$f"
done
# Byte code, as pip compiles it in the Docker build (the image cannot write it:
# PYTHONDONTWRITEBYTECODE and a read-only root), with the image's paths in it.
if ! "$PY" -m compileall -q -j 0 -s "$R" -p / "$R$VENV/lib" >"$work/compileall.log" 2>&1; then
	log "compileall: some files did not compile (pip skips them too):"
	sed -n 1,5p "$work/compileall.log" >&2
fi
if left=$(grep -rlF "$R" "$R$VENV" | head -5) && [[ -n $left ]]; then
	die "build paths left in the virtualenv: $left"
fi

# OpenSSH client.
for f in ssh scp sftp ssh-keygen ssh-keyscan ssh-add ssh-agent; do
	cp -a "/usr/bin/$f" "$R/usr/bin/$f"
done
mkdir -p "$R/etc/ssh/ssh_config.d"
cp /etc/ssh/ssh_config "$R/etc/ssh/ssh_config"

# git and the helpers a clone, fetch or submodule needs.
mkdir -p "$R/usr/share/git-core"
cp -a /usr/lib/git-core "$R/usr/lib/git-core"
(cd "$R/usr/lib/git-core" && rm -rf git-daemon git-http-backend git-http-push git-imap-send git-shell scalar \
	git-instaweb git-web--browse git-add--interactive mergetools git-mergetool git-mergetool--lib git-difftool--helper)
# Perl is not there: drop what needs it.
for f in "$R"/usr/lib/git-core/*; do
	if [[ -f $f && ! -L $f ]] && head -n1 "$f" | grep -q perl; then rm -f "$f"; fi
done
ln "$R/usr/lib/git-core/git" "$R/usr/bin/git" # one file, as hard links (the layer stores it once)
cp -a /usr/share/git-core/templates "$R/usr/share/git-core/templates"

# busybox as /bin/sh and the utilities: its applets, where no real program is.
cp /bin/busybox "$R/usr/bin/busybox"
while IFS= read -r a; do
	[[ $a == */* && $a != linuxrc ]] || continue
	[[ -e $R/$a || -L $R/$a ]] || ln -s /usr/bin/busybox "$R/$a"
done < <(/bin/busybox --list-full)
[[ -L $R/usr/bin/sh ]] || die "busybox has no sh applet"

# Shared libraries: what ldd lists for every ELF file in the image (the wheels'
# libraries, found through their RPATH in the image, are there already).
elfs=0
declare -A libs=()
while IFS= read -r -d '' f; do
	[[ $(head -c4 "$f") == $'\x7fELF' ]] || continue
	elfs=$((elfs + 1))
	if ! out=$(ldd "$f" 2>&1); then
		[[ $out == *"not a dynamic executable"* ]] && continue
		die "ldd ${f#"$R"}: $out"
	fi
	[[ $out != *"statically linked"* ]] || continue
	if [[ $out == *"not found"* ]]; then
		die "ldd ${f#"$R"}: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ' | head -3)"
	fi
	while IFS= read -r l; do
		[[ -n $l && $l != "$R"/* ]] && libs[$l]=1
	done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
done < <(find "$R" -type f \( -perm -u+x -o -name '*.so' -o -name '*.so.*' \) -print0)
for l in "${!libs[@]}"; do
	[[ -e $R$l ]] && continue
	mkdir -p "$R$(dirname "$l")"
	cp -L "$l" "$R$l"
done
log "runner image: ${#libs[@]} shared libraries for $elfs ELF files"

chown -R 0:0 "$R" 2>/dev/null || true

# ------------------------------------------------------------------ the image
args=(--config.user="$user" --config.workingdir="$workdir")
for kv in "${env[@]}"; do args+=("--config.env=$kv"); done
rm -f "$layout.key"
oci_build "$layout" "$tag" "$R" "${args[@]}" "${config[@]}" >"$work/umoci.log" 2>&1 || {
	cat "$work/umoci.log" >&2
	die "umoci failed"
}
echo "$key" >"$layout.key"
log "runner image $REF (ansible-core $version): OCI layout $layout ($(du -sh "$layout" | cut -f1), $(du -sh "$R" | cut -f1) unpacked; manifest $(layout_digest "$layout")) in $(since "$T0")"
import_layout
