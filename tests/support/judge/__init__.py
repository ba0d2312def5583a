"""Helpers for the MLLM judge tests and benchmark (loopback server, image layouts)."""
