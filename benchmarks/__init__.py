"""Benchmark harness: the gateway against a naive aiohttp proxy, both in front of a fast local upstream.

Run with ``python -m benchmarks --help``. This is a measuring tool, not a test: nothing here asserts on speed.
"""
