"""The leaf every layer may import: the user-facing error type and crash-safe file writes.

Nothing here imports torch, transformers or any other layer of the project.
"""
