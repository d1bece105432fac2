"""Developer tools of the petl repository (not installed with the package).

Run them from the repository root as modules, e.g. ``python -m tools.train_embedded_model``.
"""
