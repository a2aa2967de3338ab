"""The parts of :class:`a2sf.Llama`, one concern per module.

``a2sf.llama.Llama`` combines them over ``llama_cpp.Llama``::

    Llama -> InputGuards -> PositionLimit -> PrefixReuse -> GrowingSequence -> PolicyBase -> llama_cpp.Llama

* :mod:`.base`: the policy in force (``a2sf_active``), the engine bindings;
* :mod:`.guards`: closed-object and input checks (a clear Python exception,
  never a crash in C);
* :mod:`.positions`: learned absolute positions (OPT, GPT-2) are a hard limit;
* :mod:`.prefix`: never reuse a cached prefix that eviction punched holes in;
* :mod:`.growth`: the sequence outgrows ``n_ctx`` (``input_ids``/``scores``
  grow, the completion API's context window is ``max_positions``);
* :mod:`.batch`: ``n_ctx``/``n_batch``/``n_ubatch`` that fit beside the
  protected cells.

Model-file reading and diagnosis are in :mod:`a2sf.gguf_header`.
"""
