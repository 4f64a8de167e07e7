"""Helpers shared by the end-to-end tests (`tests/e2e`) and the benchmarks (`bench/`).

- `platform`: start a real `wrenn up` on its own data dir, port and network-slot range, wait until
  it serves, stop it and check that nothing is left behind.
- `waits`: poll a capsule until it reaches a status.
- `envd`: the host ↔ envd wire protocol (length-prefixed frames) and a probe for raw VMs.
- `qemu`: QEMU processes and command lines, and the raw-QEMU baseline's network namespace.
- `qmp`: a minimal QMP client.

Imports work from the repository root: pytest gets it on `sys.path` from `pytest.ini`
(`pythonpath = .`), the benchmarks run as modules (`python3 -m bench.lifecycle`).
"""
