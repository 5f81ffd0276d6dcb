"""Generation: batched local sampling (:mod:`~alignkit.generation.sampling`), the engines the
prepare stages sample with (:mod:`~alignkit.generation.backends`: local HF, any
OpenAI-compatible server, offline vLLM) and ``alignkit serve`` (:mod:`~alignkit.generation.serve`)."""
