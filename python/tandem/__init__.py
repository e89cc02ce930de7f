"""tandem: quantize, evaluate and speculatively decode open LLMs on your own hardware.

    import tandem
    m = tandem.Model("smollm2/")                      # a Hugging Face folder or a GGUF file
    m.generate("The capital of France is", max_tokens=8)
    m.chat("Explain speculative decoding in one sentence.")
    tandem.quantize("smollm2/", "q4.gguf", scheme="q4_0", method="gptq")
    tandem.evaluate(reference="smollm2/", models=["q4.gguf"], text="wiki.test.raw", ctx=512)

Drafters for other engines: ``tandem.llama_cpp.Draft`` (llama-cpp-python's
``draft_model``), ``tandem.transformers.CandidateGenerator`` / ``assisted_generate``
(transformers' assisted generation) and ``tandem.vllm`` (a proposer for vLLM).
"""

from ._tandem import (
    Drafter,
    Model,
    SpeculativeDecoder,
    TandemError,
    __version__,
    evaluate,
    quantize,
    set_threads,
    threads,
)

__all__ = [
    "Drafter",
    "Model",
    "SpeculativeDecoder",
    "TandemError",
    "__version__",
    "evaluate",
    "quantize",
    "set_threads",
    "threads",
]
