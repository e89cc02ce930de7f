"""tandem drafters inside llama-cpp-python: ``Llama(..., draft_model=tandem.llama_cpp.Draft(...))``.

llama.cpp verifies (its own model, its own sampling); tandem proposes. llama-cpp-python calls
the draft model with the whole context (prompt, accepted tokens and the token just sampled)
and evaluates what it returns in one batch, keeping the prefix its model agrees with, so the
output is exactly what the same ``Llama`` writes without a draft.

    import tandem
    from llama_cpp import Llama
    draft = tandem.llama_cpp.Draft(tandem.Drafter.self_draft("smollm2/", "q4_0"))
    llm = Llama("smollm2-f16.gguf", draft_model=draft, logits_all=True)
"""

from typing import Any, List, Optional

import numpy as np

from ._tandem import Drafter

try:  # llama-cpp-python is optional: the class works (and is tested) without it too.
    from llama_cpp.llama_speculative import LlamaDraftModel as _Base
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object  # type: ignore[misc,assignment]


class Draft(_Base):  # type: ignore[misc,valid-type]
    """A ``LlamaDraftModel`` proposing with a :class:`tandem.Drafter`.

    ``num_pred_tokens``: most tokens proposed per call (llama-cpp-python's own
    ``LlamaPromptLookupDecoding`` uses 10). Each call also tells the drafter how many of its
    previous proposal the verifier kept (read from the context llama.cpp passes next).
    """

    def __init__(self, drafter: Drafter, num_pred_tokens: int = 8):
        if num_pred_tokens < 1:
            raise ValueError("num_pred_tokens must be at least 1")
        self.drafter = drafter
        self.num_pred_tokens = num_pred_tokens
        self._last_len: Optional[int] = None
        self._last: List[int] = []
        self.proposed = 0
        self.accepted = 0
        self.calls = 0

    def __call__(self, input_ids: "np.ndarray", /, **kwargs: Any) -> "np.ndarray":
        context = [int(t) for t in input_ids]
        self._settle(context)
        self.calls += 1
        tokens = self.drafter.propose(context, self.num_pred_tokens)
        self._last_len, self._last = len(context), tokens
        self.proposed += len(tokens)
        return np.array(tokens, dtype=np.intc)

    def _settle(self, context: List[int]) -> None:
        """Counts how much of the previous proposal the context now holds."""
        if self._last_len is None or not self._last:
            return
        start = self._last_len
        if len(context) <= start:
            # A new prompt (or a rewind): nothing of the proposal was used.
            self.drafter.accept(0)
            self._last = []
            return
        # llama.cpp appended the accepted drafts and then its own next token.
        n = 0
        for i, t in enumerate(self._last):
            if start + i >= len(context) - 1 or context[start + i] != t:
                break
            n += 1
        self.drafter.accept(n)
        self.accepted += n
        self._last = []
