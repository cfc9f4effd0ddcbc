#!/bin/bash
# Make DeepSpeed build its CPU ops (CPU Adam, the shm comm op) for a portable x86-64 target.
#
# Why: DeepSpeed's op builder (op_builder/builder.py: cpu_arch, simd_width) compiles CPU ops with
# -march=native and picks AVX-512 code when the *build* machine has it. An image built on a new
# CPU then dies with SIGILL (illegal instruction) in zero3-offload on the older nodes of the same
# cluster. No setting overrides this (deepspeedai/DeepSpeed#5451), so this rewrites the builder:
# -march=$CPU_OPS_MARCH and SIMD code for $CPU_OPS_SIMD (defaults: x86-64-v3 = AVX2+FMA, every
# x86 server CPU since 2013-2015, with DeepSpeed's AVX2 path).
#
# Usage: portable-cpu-ops.sh DIR...   each DIR an op_builder directory (installed, or in the sdist).
# Fails when there is nothing to rewrite: a DeepSpeed that picks its flags another way must be
# looked at, not silently built for the build machine again.
set -euo pipefail
march="${CPU_OPS_MARCH:-x86-64-v3}"
simd="${CPU_OPS_SIMD:-AVX256}"
if [ "$(uname -m)" != x86_64 ]; then
  echo "portable-cpu-ops: $(uname -m): DeepSpeed's own flags kept (only x86-64 is rewritten)"
  exit 0
fi
[ "$#" -gt 0 ] || { echo "usage: portable-cpu-ops.sh OP_BUILDER_DIR..." >&2; exit 2; }
for dir in "$@"; do
  f="$dir/builder.py"
  if ! grep -q -- "-march=native" "$f" || ! grep -q -- "-D__AVX512__" "$f"; then
    echo "portable-cpu-ops: $f picks no -march=native / -D__AVX512__: DeepSpeed changed how it" \
         "chooses CPU flags (cpu_arch, simd_width); update docker/portable-cpu-ops.sh" >&2
    exit 1
  fi
  sed -i -e "s/\(['\"]\)-march=native\(['\"]\)/\1-march=${march}\2/g" \
         -e "s/\(['\"]\)-D__AVX512__\(['\"]\)/\1-D__${simd}__\2/g" "$f"
  echo "portable-cpu-ops: $f now builds CPU ops with -march=${march} -D__${simd}__"
done
