"""tandem drafters as a vLLM speculative proposer (vLLM's ``custom_class`` method).

vLLM (0.33 on PyPI as written) loads a proposer class named by its import path and calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None)`` each
step: for every request in the batch, the tokens so far are ``token_ids_cpu[i, :n]`` and the
proposer returns up to ``num_speculative_tokens`` draft tokens. vLLM's rejection sampler
verifies them, so the output is the target model's.

    from vllm import LLM
    import os
    os.environ["TANDEM_VLLM_DRAFT"] = "self:q4_0"     # or "ngram" (the default)
    llm = LLM(model="smollm2/", speculative_config={
        "method": "custom_class", "model": "tandem.vllm.Proposer",
        "num_speculative_tokens": 4})

Unverified inside vLLM until run on a GPU (``scripts/gpu-check.sh``); the interface is
exercised by the Python tests with vLLM's call shape.
"""

import os
from typing import Any, Dict, List, Optional

from ._tandem import Drafter


def _drafter(spec: str, model_path: str) -> Drafter:
    if spec == "ngram":
        return Drafter.ngram()
    if spec.startswith("self:"):
        ty = spec[len("self:"):]
        attention = ty.endswith("@all")
        return Drafter.self_draft(model_path, ty[: -len("@all")] if attention else ty, attention)
    return Drafter.model(spec)


class Proposer:
    """Drafts for each request in vLLM's batch with a tandem drafter.

    The drafter comes from ``TANDEM_VLLM_DRAFT``: ``ngram`` (default), ``self:<type>[@all]``
    (vLLM's target model folder quantized in memory) or a draft model path. Each batch row
    has its own drafter (a model draft keeps that row's context cached).
    """

    def __init__(self, vllm_config: Any, draft: Optional[str] = None):
        spec_config = vllm_config.speculative_config
        self.k = int(spec_config.num_speculative_tokens)
        model_config = vllm_config.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.spec = draft or os.environ.get("TANDEM_VLLM_DRAFT", "ngram")
        self.model_path = str(model_config.model)
        self._template: Optional[Drafter] = None
        self._rows: Dict[int, Drafter] = {}

    def _row(self, i: int) -> Drafter:
        d = self._rows.get(i)
        if d is None:
            # One model (quantized or loaded once), a drafter state per row.
            if self._template is None:
                self._template = _drafter(self.spec, self.model_path)
            d = self._template.fork()
            self._rows[i] = d
        return d

    def propose(self, sampled_token_ids: List[List[int]], num_tokens_no_spec: Any,
                token_ids_cpu: Any, slot_mappings: Any = None, **kwargs: Any) -> List[List[int]]:
        out: List[List[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            if not sampled or n >= self.max_model_len:
                out.append([])
                continue
            k = min(self.k, self.max_model_len - n)
            context = [int(t) for t in token_ids_cpu[i, :n]]
            out.append(self._row(i).propose(context, k))
        return out

    # vLLM calls these on some proposers; a CPU drafter has nothing to load or warm up.
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        pass

    def dummy_run(self, *args: Any, **kwargs: Any) -> None:
        pass
