"""Relax graph passes (TVM >= 0.20 replaced Relay by Relax; the folder keeps the design
card's name): integer lowering, WAPS group splitting, channel permutation. Built by the
compiler-core issue; nothing here yet."""
