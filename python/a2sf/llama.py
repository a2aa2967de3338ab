"""`a2sf.Llama`: llama_cpp.Llama with a KV-cache eviction policy."""
from __future__ import annotations

import llama_cpp


class Llama(llama_cpp.Llama):
    """Drop-in llama_cpp.Llama. `kv_policy=None` behaves exactly like the parent."""

    def __init__(self, model_path: str, *args, kv_policy=None, **kwargs):
        self.kv_policy = kv_policy
        super().__init__(model_path, *args, **kwargs)
