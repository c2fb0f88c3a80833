"""Storage on any fsspec URI: safetensors range reads, artifact writing, manifests.

Imports nothing of lamina's other packages.
"""

from storage.fs import StorageError

__all__ = ["StorageError"]
