"""Benchmarks of cocos_kernels against the materialised reference (see benchmarks/README.md)."""
