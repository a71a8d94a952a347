"""clipforge stages: one subpackage per container image (download, train, evaluate, export)."""

__version__ = "0.1.0"
