"""Execution kernels shared by attention mechanisms."""
