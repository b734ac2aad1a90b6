#!/usr/bin/env bash
# The Debian packages the local node and the image build need, installed when
# missing: containerd, runc, the CNI plugins, debootstrap, iptables.
# (kubelet, kube-scheduler and crictl are built from Go modules by build.sh.)
set -euo pipefail
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/loopback ] || need+=(containernetworking-plugins)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v iptables >/dev/null || need+=(iptables)
command -v findmnt >/dev/null || need+=(util-linux)
[ ${#need[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || { echo "node-deps.sh: installing ${need[*]} needs root" >&2; exit 1; }
echo "[node-deps] installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3 4 5 6; do
  # another apt run may hold the dpkg lock for a while: wait and retry
  if apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/kubetasks-node-apt.log 2>&1; then
    echo "[node-deps] installed"; exit 0
  fi
  if [ "$attempt" = 1 ]; then apt-get update -q >/dev/null 2>&1 || true; fi
  sleep $(( attempt * 5 ))
done
tail -20 /tmp/kubetasks-node-apt.log >&2
echo "node-deps.sh: could not install ${need[*]}" >&2
exit 1
