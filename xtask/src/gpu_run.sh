#!/usr/bin/env bash
# Runs what `cargo xtask gpu-bundle` packed, on the GPU machine, from the repository root:
#
#   bash .gpu/run.sh tests PART [test-binary args...]   one part's test binaries on $VULNMAP_DEVICE
#   bash .gpu/run.sh bench [--quick]                    vulnmap-bench and torch_reference.py
#
# The machine has no Rust and a copy of the working tree at another path: the binaries are
# unpacked in place, and the folder they were built in is linked to this one, so the paths the
# tests were compiled with (fixtures, CARGO_TARGET_TMPDIR, the CLI binary) resolve here. Logs and
# JSON go to $OUT (the device tool's output folder), a summary line per test binary to stdout.
set -u
mode=${1:?usage: run.sh tests PART [args...] | run.sh bench [--quick]}
shift
root=$PWD
out=${OUT:-$root/.gpu/out}
mkdir -p "$out"

built_at=$(cat .gpu/root)
if [ "$built_at" != "$root" ] && [ ! -e "$built_at" ]; then
    mkdir -p "$(dirname "$built_at")" && ln -s "$root" "$built_at"
fi

# CUDA's libraries from PyTorch's pip wheels (cuBLAS 13, cuRAND 10, cudart 13, cuDNN 9).
libdirs=$(find / \( -path /proc -o -path /sys \) -prune -o \( -name 'libcublas.so.13' \
    -o -name 'libcurand.so.10' -o -name 'libcudart.so.13' -o -name 'libcudnn.so.9' \) -print 2>/dev/null |
    xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"

unpack() {
    python3 - "$1" <<'EOF'
import lzma, pathlib, sys
part = pathlib.Path(".gpu") / sys.argv[1]
if not part.is_dir():
    sys.exit(f"no {part}: carry it (see `cargo xtask gpu-bundle`)")
for packed in sorted(part.rglob("*.xz")):
    dest = packed.relative_to(part).with_suffix("")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(lzma.decompress(packed.read_bytes()))
    dest.chmod(0o755)
EOF
}

case "$mode" in
tests)
    part=${1:?which part?}
    shift
    unpack "$part" || exit 1
    mkdir -p target/cuda/tmp # CARGO_TARGET_TMPDIR, which cargo would have made
    export VULNMAP_DEVICE=${VULNMAP_DEVICE:-cuda}
    export VULNMAP_ASSETS=${VULNMAP_ASSETS:-$root/shared}
    export VULNMAP_REQUIRE_ASSETS=1
    status=0
    while read -r kind in_part exe package; do
        [ "$kind" = test ] && [ "$in_part" = "$part" ] || continue
        name=$(basename "$exe")
        (cd "$package" && CARGO_MANIFEST_DIR="$root/$package" "$root/$exe" "$@") >"$out/$name.log" 2>&1
        rc=$?
        echo "$name rc=$rc $(grep -E '^test result' "$out/$name.log" | tail -1)"
        [ $rc -eq 0 ] || status=1
    done <.gpu/manifest.txt
    exit $status
    ;;
bench)
    unpack bench || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    device=${VULNMAP_DEVICE:-cuda}
    quick=${1:-}
    target/cuda/release/vulnmap-bench ${quick:+"$quick"} --device "$device" --json "$out/vulnmap.json" || exit 1
    python3 bench/torch_reference.py ${quick:+"$quick"} --device "$device" >"$out/torch.json" || exit 1
    echo "then, here: cargo xtask bench --from <the fetched folder>"
    ;;
*)
    echo "unknown mode $mode: tests PART | bench" >&2
    exit 2
    ;;
esac
