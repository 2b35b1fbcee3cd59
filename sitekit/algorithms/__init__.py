"""Federated optimisation algorithms, one module each, named after their papers.

Each module's docstring cites the paper and writes the update rule it implements, and its
test (``tests/algorithms/``) checks that rule on tiny tensors. Engine glue (how OpenFL calls
them) lives in ``sitekit/engine``; nothing here imports OpenFL.

Tensors are dicts of NumPy arrays keyed by parameter name, the form every engine can hand over.
"""
