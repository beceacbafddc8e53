"""Benchmarks (``make bench``). A package so the parts that run inside network namespaces can be
started as ``python -m bench.sides`` / ``python -m bench.linksend`` from the repository root."""
