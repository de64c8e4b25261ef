"""Portable C99 for a waps-tvm integer program (the C fallback's kernels and emitter).

``emit_c(program)`` writes one self-contained translation unit over ``waps_kernels.h``;
``build_shared(program, path)`` compiles it with gcc. The BYOC wrapper that places these
kernels inside a TVM exported module builds on this."""
