"""Wrenn's Python tests and their shared helpers (`tests.support`).

A regular package, so `import tests.support` from the repository root can never pick up some
other distribution's top-level `tests` package instead.
"""
