#!/usr/bin/env bash
# Make sure what FFCV compiles against, and what builds the venv, is on this machine.
# Already there (by apt, conda or by hand, as pkg-config and the compiler see it): nothing
# to do. Missing and root with apt: install the Debian packages. Otherwise: one line
# naming them, exit 2.
set -uo pipefail
python=${1:-python3}
missing=()
pkg-config --exists libturbojpeg opencv4 2>/dev/null \
    || missing+=(pkg-config libturbojpeg0-dev libopencv-dev)
# The opencv-python wheel FFCV pulls in loads these at import time.
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || missing+=(libgl1)
ldconfig -p 2>/dev/null | grep -q 'libgthread-2.0.so.0' || missing+=(libglib2.0-0)
command -v g++ >/dev/null || missing+=(g++)
"$python" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null \
    || missing+=(python3-dev)
"$python" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages for FFCV: ${missing[*]}"
    log=$(mktemp)
    if apt-get update -qq >"$log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >>"$log" 2>&1; then
        rm -f "$log"
        exit 0
    fi
    echo "error: apt-get install ${missing[*]} failed (its output: $log)" >&2
    exit 2
fi
echo "error: FFCV needs system packages: run 'sudo apt-get install ${missing[*]}' (or with conda: 'conda install -c conda-forge pkg-config libjpeg-turbo opencv compilers') and retry" >&2
exit 2
