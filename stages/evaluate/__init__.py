"""The evaluate stage: zero-shot classification and retrieval of a checkpoint on eval sets in any store."""
