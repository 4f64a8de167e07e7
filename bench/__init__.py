"""Benchmarks of the platform against raw QEMU in the same run (see bench/README.md).

Run them as modules from the repository root, as root: `sudo python3 -m bench.lifecycle`.
They share the tests' helpers (`tests.support`).
"""
