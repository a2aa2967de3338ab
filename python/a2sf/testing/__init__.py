"""Test helpers: tiny random GGUF models (:mod:`.tiny_gguf`) and a numpy
reference of attention and eviction scores (:mod:`.reference`)."""
