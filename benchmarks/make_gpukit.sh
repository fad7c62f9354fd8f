#!/usr/bin/env bash
# Build .gpukit/ in the project root: FFCV and the shared libraries it links, ready to
# carry to a GPU machine without network that has torch & co. but no FFCV, no
# libturbojpeg and no Debian OpenCV (README.md, "Speed").
#   make gpukit     # from the project root: make setup, then this script
# There: source .gpukit/activate && python fasttt/train.py RECIPE.toml ...
set -euo pipefail

MAX_BYTES=$((40 * 1000 * 1000))
KIT=.gpukit
# Every glibc distribution has these: never bundled (a second libc/libstdc++ would clash).
BASE_RE='^(ld-linux.*|linux-vdso.*|lib(c|m|dl|rt|pthread|stdc\+\+|gcc_s|z)\.so(\..*)?)$'
ROOT_LIBS=(libturbojpeg.so.0 libopencv_core.so.406 libopencv_imgproc.so.406)
# Python tags the extension is also copied under. It imports only PyModule_Create2
# (stable ABI), so the file built for one CPython 3 loads under another.
PY_TAGS=(311 312)
# Pure-Python packages ffcv itself depends on: assertpy and terminaltables are used only by
# ffcv.benchmarks, pytorch_pfn_extras only by NormalizeImage on the GPU (with cupy), and
# fastargs by none of ffcv's modules; fasttt uses none of these, so none is bundled.
# Name one here if that changes (copied from the venv's site-packages with its dist-info).
EXTRA_PACKAGES=()

die() { echo "error: $*" >&2; exit 2; }

[ -f pyproject.toml ] && [ -d fasttt ] || die "run this from the project root (where pyproject.toml and fasttt/ are)"
py=.venv/bin/python
[ -x "$py" ] || die "no .venv here: run 'make setup' first"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -f "$site/ffcv/__init__.py" ] || die "ffcv is not installed in .venv: run 'make setup' first"
exts=("$site"/ffcv/_libffcv.cpython-*.so)
[ ${#exts[@]} -eq 1 ] && [ -f "${exts[0]}" ] || die "expected one compiled ffcv/_libffcv.cpython-*.so in $site"
ext=${exts[0]}
platform_tag=$(basename "$ext" .so | sed -E 's/^_libffcv\.cpython-[0-9]+-//')  # x86_64-linux-gnu

# soname -> path, for the roots as the extension resolves them, then everything they need.
declare -A lib_path=()
add_ldd() {  # add_ldd FILE: every "soname => path" that ldd resolves for FILE
    local out line name path
    out=$(ldd "$1") || die "ldd $1 failed"
    if grep -q 'not found' <<<"$out"; then
        die "$1 has unresolved libraries: $(grep 'not found' <<<"$out" | xargs)"
    fi
    while read -r line; do
        [[ $line == *" => "* ]] || continue
        name=${line%% =>*}
        path=${line#*=> }
        path=${path%% (*}
        [[ $name =~ $BASE_RE ]] && continue
        lib_path[$name]=$path
    done <<<"$out"
}
add_ldd "$ext"
for root in "${ROOT_LIBS[@]}"; do
    [ -n "${lib_path[$root]:-}" ] || die "$(basename "$ext") does not link $root (ldd: $(ldd "$ext" | xargs))"
done
for name in "${!lib_path[@]}"; do add_ldd "${lib_path[$name]}"; done  # ldd is transitive

rm -rf "$KIT"
mkdir -p "$KIT/lib" "$KIT/site"

for name in $(printf '%s\n' "${!lib_path[@]}" | sort); do
    cp -L "${lib_path[$name]}" "$KIT/lib/$name"
done

cp -r "$site/ffcv" "$KIT/site/ffcv"
find "$KIT/site" -name __pycache__ -type d -prune -exec rm -rf {} +
for tag in "${PY_TAGS[@]}"; do
    target="$KIT/site/ffcv/_libffcv.cpython-$tag-$platform_tag.so"
    [ -e "$target" ] || cp "$ext" "$target"
done
# Python 3.12 has no distutils (only setuptools' shim, when setuptools is installed), and
# ffcv imports an unused name from it: fall back to warnings' warn when it is missing.
graph="$KIT/site/ffcv/pipeline/graph.py"
if grep -qx 'from distutils.log import warn' "$graph"; then
    sed -i 's/^from distutils\.log import warn$/try:\n    from distutils.log import warn  # gpukit: guarded, see make-kit.sh\nexcept ImportError:\n    from warnings import warn/' "$graph"
fi
for pkg in "${EXTRA_PACKAGES[@]}"; do
    cp -r "$site/$pkg" "$KIT/site/"
done

{
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -1)"
    echo "ffcv $("$py" -c 'import importlib.metadata as m; print(m.version("ffcv"))') from $site, extension also as cpython-{$(IFS=,; echo "${PY_TAGS[*]}")}"
    for name in $(printf '%s\n' "${!lib_path[@]}" | sort); do
        echo "lib/$name <- $(readlink -f "${lib_path[$name]}")"
    done
} >"$KIT/manifest.txt"

cat >"$KIT/activate" <<'ACTIVATE'
# Source this with bash: FFCV and the shared libraries it links, from this folder.
#   source .gpukit/activate && python fasttt/train.py recipes/digits_d06.toml
# Sets LD_LIBRARY_PATH and PYTHONPATH (this folder's site/ and the project root), then
# prints one check line (python, torch and CUDA, ffcv and where its libraries came from,
# CPU cores) and returns 1 if ffcv does not import. GPUKIT_CHECK=0 skips the check;
# GPUKIT_PYTHON names the python to check (default: python3). The check alone: gpukit_check
GPUKIT_DIR=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" >/dev/null && pwd)
export GPUKIT_DIR
case ":${LD_LIBRARY_PATH:-}:" in
    *":$GPUKIT_DIR/lib:"*) ;;
    *) export LD_LIBRARY_PATH="$GPUKIT_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
case ":${PYTHONPATH:-}:" in
    *":$GPUKIT_DIR/site:"*) ;;
    *) export PYTHONPATH="$GPUKIT_DIR/site:$(dirname -- "$GPUKIT_DIR")${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

gpukit_check() {
    "${GPUKIT_PYTHON:-python3}" - <<'PY'
import os, platform, sys

kit_lib = os.path.join(os.environ["GPUKIT_DIR"], "lib") + os.sep
parts, ok = [f"python {platform.python_version()} ({sys.executable})"], True
try:
    import torch
    cuda = torch.cuda.is_available()
    gpus = f" ({torch.cuda.device_count()}x {torch.cuda.get_device_name(0)})" if cuda else ""
    parts.append(f"torch {torch.__version__} CUDA {'available' if cuda else 'NOT available'}{gpus}")
except Exception as e:
    ok = False
    parts.append(f"torch FAILED: {type(e).__name__}: {e}")
try:
    import ffcv.libffcv  # noqa: F401  (loads the extension and its libraries)

    maps = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line}
    outside = [name for name in ("libopencv_core", "libopencv_imgproc", "libturbojpeg")
               if not any(p.startswith(kit_lib) and os.path.basename(p).startswith(name + ".")
                          for p in maps)]
    where = "its libraries from the kit" if not outside else f"NOT from the kit: {outside}"
    parts.append(f"ffcv OK ({os.path.dirname(ffcv.__file__)}, {where})")
except Exception as e:
    ok = False
    parts.append(f"ffcv FAILED: {type(e).__name__}: {e}")
parts.append(f"{len(os.sched_getaffinity(0))} CPU cores")
print("gpukit: " + " | ".join(parts), flush=True)
sys.exit(0 if ok else 1)
PY
}

if [ "${GPUKIT_CHECK:-1}" != 0 ]; then
    gpukit_check || return 1
fi
ACTIVATE

exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/$KIT/" "$exclude" 2>/dev/null || echo "/$KIT/" >>"$exclude"
else
    echo "note: not a git work tree: $KIT/ is not excluded from git" >&2
fi

bytes=$(du -sb "$KIT" | cut -f1)
echo "$KIT: $(ls "$KIT/lib" | wc -l) libraries, ffcv$([ ${#EXTRA_PACKAGES[@]} -eq 0 ] || echo " + ${EXTRA_PACKAGES[*]}"); $(du -sh "$KIT" | cut -f1) ($bytes bytes)"
if [ "$bytes" -gt "$MAX_BYTES" ]; then
    echo "error: $KIT is $bytes bytes, over the $MAX_BYTES limit" >&2
    exit 1
fi
