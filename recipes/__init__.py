"""Experiments built on Tessera's entry points; each recipe runs them as subprocesses and is not library code."""
