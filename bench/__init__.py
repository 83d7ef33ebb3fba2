"""Benchmark harnesses (`pld bench ...` and the scripts beside them). Outside the library: they use the
public interfaces of pld_core, tasks and flows only."""
