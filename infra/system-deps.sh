#!/usr/bin/env bash
# The system packages the tests need, installed from Debian when missing (root; no-op when present):
# site images (podman's Docker API, buildah, runc, a debootstrap base), the hospital egress test
# (tinyproxy, socat, network namespaces via iproute2), PACS tests (Orthanc + DICOMweb, run by the
# tests in a network namespace bridged to loopback by socat). No init system is assumed: apt starts
# no Orthanc service, and tinyproxy's system service (all interfaces) is stopped: the tests start
# their own on 127.0.0.1.
set -euo pipefail
need=()
for tool in podman buildah runc debootstrap tinyproxy socat ip; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "system packages missing for the tests: ${need[*]}"
cmd1="apt-get install -yq podman buildah runc debootstrap tinyproxy socat iproute2"
cmd2="apt-get install -yq --no-install-recommends orthanc orthanc-dicomweb"
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (or with sudo): apt-get update && $cmd1 && $cmd2" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
$cmd1
$cmd2
invoke-rc.d tinyproxy stop >/dev/null 2>&1 || true
