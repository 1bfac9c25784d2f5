"""Benchmarks of the device stack, each figure beside a baseline measured in the same run.

Not part of the installed package: run from the repository root with ``python -m benchmarks.run``
(``make bench`` does that after installing what is needed). See ``benchmarks/README.md``.
"""
