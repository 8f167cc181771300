"""Small synthetic stages that exercise the build graph without any ML toolchain.

source -> middle -> final@T (per target), plus other (independent of middle). Each reads one
config field as its params, so a test can change one stage's params and watch what re-runs.
"""
