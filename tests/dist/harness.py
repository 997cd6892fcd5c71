"""Kept so that `from .harness import run_distributed` goes on working: the helper lives in
tests/conftest.py with the other shared test helpers."""

from tests.conftest import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
