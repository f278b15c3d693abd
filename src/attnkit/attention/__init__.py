"""Attention mechanisms. Each import below registers one mechanism: one line per mechanism.

Registration order is listing order (``attnkit list``, the README table, the arena): exact
first, then the sparse, hashing and kernel families. Mechanism modules never import each
other; what they share lives in the support modules ``pattern``, ``dense`` and
``reference`` (``tests/test_layers.py`` checks it).
"""

# isort: off
from attnkit.attention import full  # noqa: F401
from attnkit.attention import bigbird  # noqa: F401
from attnkit.attention import sliding_window  # noqa: F401
from attnkit.attention import fixed  # noqa: F401
from attnkit.attention import longformer  # noqa: F401
from attnkit.attention import strided  # noqa: F401
from attnkit.attention import block_local  # noqa: F401
from attnkit.attention import axial  # noqa: F401
from attnkit.attention import fan_out  # noqa: F401
from attnkit.attention import topk  # noqa: F401
from attnkit.attention import dynamic_block  # noqa: F401
from attnkit.attention import nsa  # noqa: F401
from attnkit.attention import lsh  # noqa: F401
from attnkit.attention import routing  # noqa: F401
from attnkit.attention import sinkhorn  # noqa: F401
from attnkit.attention import linear  # noqa: F401
from attnkit.attention import linformer  # noqa: F401
from attnkit.attention import nystrom  # noqa: F401
from attnkit.attention import performer  # noqa: F401

# isort: on
from attnkit.attention.reference import reference_attention

__all__ = ["reference_attention"]
