"""Data: readers for the real formats, the synthetic set, templates, the feature cache, batching."""
