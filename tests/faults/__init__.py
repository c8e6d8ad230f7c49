"""Fault-injection tests against the real `make run` supervisor (harness: conftest.py)."""
