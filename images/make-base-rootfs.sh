#!/usr/bin/env bash
# The base root filesystem every fedward image starts FROM: Debian 12 (bookworm) with python3 and
# venv, made with debootstrap because no registry can be reached. Kept as one tar, reused when present.
#   images/make-base-rootfs.sh [OUT.tar]      (default .tools/images/debian-bookworm-python.tar)
# DEBIAN_MIRROR overrides the mirror (a hospital builds from its own mirror or a cached tar).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.tools/images/debian-bookworm-python.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -s "$out" ] && { echo "base rootfs: $out (cached)"; exit 0; }
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "base rootfs: debootstrap bookworm from $mirror (about a minute) ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$tmp/root" "$mirror" > "$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
# What an image never needs: package caches and lists, docs, man pages, locales.
rm -rf "$tmp/root"/var/cache/apt/archives/*.deb "$tmp/root"/var/lib/apt/lists/* \
       "$tmp/root"/usr/share/doc/* "$tmp/root"/usr/share/man/* "$tmp/root"/usr/share/locale/* \
       "$tmp/root"/usr/share/info/* "$tmp/root"/var/log/*.log "$tmp/root"/var/cache/debconf/*-old
tar -C "$tmp/root" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "base rootfs: $out ($(du -h "$out" | cut -f1))"
