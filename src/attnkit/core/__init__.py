"""The bottom layer: shared types, the mechanism base class, capabilities, the registry, validation.

Nothing here imports another attnkit layer (``tests/test_layers.py`` checks it): masks,
positions, kernels, mechanisms and models build on these pieces, never the reverse.
Importing this package imports nothing heavy; import the submodules you need.
"""
