"""tandem drafters in Hugging Face transformers' assisted generation.

transformers' assisted generation asks a ``CandidateGenerator`` for candidate tokens, checks
them with one forward pass of the model and keeps the prefix the model agrees with (greedy:
identical to plain ``generate``). :class:`CandidateGenerator` is that interface over a
:class:`tandem.Drafter`; :func:`assisted_generate` plugs it into ``model.generate`` through
``custom_generate`` (a callable that runs the decoding loop after generate prepared the
inputs, as transformers documents):

    import tandem, tandem.transformers
    drafter = tandem.Drafter.self_draft("smollm2/", "q8_0", attention=True)
    out = model.generate(**inputs, max_new_tokens=128, do_sample=False,
                         custom_generate=tandem.transformers.assisted_generate(drafter))

``model.generate(..., assistant_model=...)`` takes a transformers (torch) model; tandem's
drafters enter through ``custom_generate`` instead.
"""

from typing import Any, Iterable, Optional, Union

import torch
from transformers.generation.candidate_generator import CandidateGenerator as _Base

from ._tandem import Drafter


class CandidateGenerator(_Base):
    """Candidates from a :class:`tandem.Drafter` (batch size 1, as assisted generation is).

    ``num_tokens``: most candidates per step; ``max_length``: the generation's total length
    limit (candidates never run past it); ``eos_token_id``: candidates end at the first EOS
    (so a sequence never continues past one).
    """

    def __init__(
        self,
        drafter: Drafter,
        num_tokens: int = 8,
        max_length: Optional[int] = None,
        eos_token_id: Union[int, Iterable[int], None] = None,
    ):
        if num_tokens < 1:
            raise ValueError("num_tokens must be at least 1")
        self.drafter = drafter
        self.num_tokens = num_tokens
        self.max_length = max_length
        if eos_token_id is None:
            self.eos = set()
        elif isinstance(eos_token_id, int):
            self.eos = {eos_token_id}
        else:
            self.eos = {int(t) for t in eos_token_id}
        self.proposed = 0
        self.accepted = 0

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any):
        if input_ids.shape[0] != 1:
            raise ValueError("tandem candidates: assisted generation runs one sequence at a time")
        k = self.num_tokens
        if self.max_length is not None:
            k = min(k, self.max_length - input_ids.shape[1] - 1)
        if k <= 0:
            return input_ids, None
        tokens = self.drafter.propose(input_ids[0].tolist(), k)
        for i, t in enumerate(tokens):
            if t in self.eos:
                tokens = tokens[: i + 1]
                break
        if not tokens:
            return input_ids, None
        self.proposed += len(tokens)
        extra = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, extra], dim=1), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: Any, num_matches: int):
        n = int(num_matches)
        self.accepted += n
        self.drafter.accept(n)


def assisted_generate(drafter: Drafter, num_tokens: int = 8):
    """A ``custom_generate`` callable: transformers' assisted decoding loop with tandem's
    candidates. The callable's ``generator`` attribute holds the last run's
    :class:`CandidateGenerator` (its ``proposed`` / ``accepted`` counts)."""

    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config,
               synced_gpus=False, streamer=None, **model_kwargs):
        gen = CandidateGenerator(
            drafter,
            num_tokens=num_tokens,
            max_length=generation_config.max_length,
            eos_token_id=generation_config.eos_token_id,
        )
        decode.generator = gen
        # The assisted loop asks the model for its candidate generator; this run answers
        # with tandem's (an attribute on the instance, removed afterwards).
        model._get_candidate_generator = lambda *args, **kwargs: gen
        try:
            return type(model)._assisted_decoding(
                model,
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        finally:
            del model._get_candidate_generator

    decode.generator = None
    return decode
