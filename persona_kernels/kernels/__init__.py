"""Kernel implementations, one module (or package) per backend; reached through persona_kernels.dispatch."""
