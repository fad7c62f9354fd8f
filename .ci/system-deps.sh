#!/usr/bin/env bash
# Install the Debian packages FFCV compiles against, if any is missing.
# As root this uses apt; otherwise it stops with one line saying what to install.
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages for FFCV: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi
echo "error: FFCV needs system packages: run 'sudo apt-get install ${missing[*]}' (or, with conda: 'conda install -c conda-forge pkg-config libjpeg-turbo opencv') and retry" >&2
exit 2
