#!/usr/bin/env bash
# Compile every CUDA source in csrc/ with nvcc alone (no CUDA build of torch needed) for sm_80 and
# sm_90a, with warnings as errors, and check that real SASS comes out. When torch's headers are
# importable, also syntax-check the torch binding csrc/ops.cpp against them.
#   usage: bash .ci/compile_csrc.sh        (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
ARCHS=(80 90a)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

command -v "$NVCC" >/dev/null || { echo "compile_csrc: nvcc not found" >&2; exit 2; }
echo "compile_csrc: $("$NVCC" --version | tail -n 2 | head -n 1)"

shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "compile_csrc: no csrc/*.cu files" >&2
    exit 1
fi

# Reads a cubin (ELF) and prints its kernels' SASS sizes; fails when there is no code.
check_cubin() {
    "$PYTHON" - "$1" <<'PY'
import struct, sys
path = sys.argv[1]
data = open(path, "rb").read()
if data[:4] != b"\x7fELF" or data[4] != 2:
    sys.exit(f"{path}: not a 64-bit ELF cubin")
machine = struct.unpack_from("<H", data, 18)[0]
if machine != 190:  # EM_CUDA
    sys.exit(f"{path}: ELF machine {machine}, expected EM_CUDA (190)")
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
strtab = sections[shstrndx]
def name(off):
    start = strtab[4] + off
    return data[start:data.index(b"\0", start)].decode()
text = [(name(s[0]), s[5]) for s in sections if name(s[0]).startswith(".text.")]
if not text or any(size == 0 for _, size in text):
    sys.exit(f"{path}: no kernel code (.text sections: {text})")
for sec, size in text:
    print(f"    {sec[6:][:90]}: {size} bytes of SASS")
PY
}

for src in "${sources[@]}"; do
    base=$(basename "$src" .cu)
    gencode=()
    for arch in "${ARCHS[@]}"; do
        gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
    done
    echo "compile_csrc: $src -> object with SASS for$(printf ' sm_%s' "${ARCHS[@]}")"
    mkdir -p "$work/$base"
    "$NVCC" -std=c++17 -O3 -Icsrc -c "$src" -o "$work/$base.o" "${gencode[@]}" \
        --keep --keep-dir "$work/$base" \
        --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas -warn-spills,-Werror
    for arch in "${ARCHS[@]}"; do
        cubin="$work/$base/$base.compute_${arch}.cubin"
        [ -f "$cubin" ] || { echo "compile_csrc: nvcc left no cubin for sm_${arch}" >&2; exit 1; }
        echo "  sm_${arch}:"
        if command -v cuobjdump >/dev/null; then
            n=$(cuobjdump -sass "$cubin" | grep -c '/\*[0-9a-f]\{4\}\*/' || true)
            [ "$n" -gt 0 ] || { echo "compile_csrc: no SASS in $cubin" >&2; exit 1; }
            echo "    cuobjdump: $n SASS instructions"
        fi
        check_cubin "$cubin"
    done
done

# The binding needs torch's headers; a CPU build of torch lacks one generated CMake header of
# c10/cuda, which a syntax check can stand in for.
if [ -f csrc/ops.cpp ] && "$PYTHON" -c "import torch" 2>/dev/null; then
    cuda_home=$(dirname "$(dirname "$(command -v "$NVCC")")")
    [ -f "$cuda_home/include/cuda_runtime_api.h" ] || cuda_home=/usr/local/cuda
    mapfile -t torch_inc < <("$PYTHON" -c "
import sysconfig, torch.utils.cpp_extension as c
for p in c.include_paths() + [sysconfig.get_paths()['include']]: print(p)")
    sys_inc=()
    for p in "${torch_inc[@]}" "$cuda_home/include"; do sys_inc+=(-isystem "$p"); done
    found=0
    for p in "${torch_inc[@]}"; do [ -f "$p/c10/cuda/impl/cuda_cmake_macros.h" ] && found=1; done
    if [ $found -eq 0 ]; then
        mkdir -p "$work/stub/c10/cuda/impl"
        printf '#pragma once\n' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
        sys_inc+=(-isystem "$work/stub")
    fi
    echo "compile_csrc: csrc/ops.cpp -> syntax check against torch headers"
    "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror "${sys_inc[@]}" -Icsrc \
        -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H csrc/ops.cpp
fi
echo "compile_csrc: OK (${#sources[@]} CUDA source(s))"
