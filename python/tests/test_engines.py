"""tandem drafters inside other engines: greedy output identical to the engine alone."""

import types

import numpy as np
import pytest

import tandem


def test_llama_cpp_draft_is_lossless(smol, smollm2, smol_gguf, chat_prompts):
    llama_cpp = pytest.importorskip("llama_cpp")
    import tandem.llama_cpp

    plain = llama_cpp.Llama(str(smol_gguf), n_ctx=2048, n_threads=2, verbose=False)
    drafts = {
        "ngram": tandem.llama_cpp.Draft(tandem.Drafter.ngram()),
        "self:q8_0@all": tandem.llama_cpp.Draft(
            tandem.Drafter.self_draft(smollm2, "q8_0", attention=True), num_pred_tokens=6
        ),
    }
    engines = {
        k: llama_cpp.Llama(str(smol_gguf), n_ctx=2048, n_threads=2, verbose=False, draft_model=d)
        for k, d in drafts.items()
    }
    prompts = chat_prompts[:10]
    assert len(prompts) == 10
    for q in prompts:
        p = smol.apply_chat_template(q)
        want = plain(p, max_tokens=32, temperature=0.0)["choices"][0]["text"]
        for k, llm in engines.items():
            got = llm(p, max_tokens=32, temperature=0.0)["choices"][0]["text"]
            assert got == want, (k, q)
    d = drafts["self:q8_0@all"]
    assert d.proposed > 0 and 0 < d.accepted <= d.proposed


def test_transformers_candidates_are_lossless(smol, smollm2, chat_prompts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import tandem.transformers as tt

    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    draft = tt.assisted_generate(tandem.Drafter.self_draft(smollm2, "q8_0", attention=True), 6)
    ngram = tt.assisted_generate(tandem.Drafter.ngram())
    for q in chat_prompts[:3]:
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )
        # The template tandem renders is the one transformers renders.
        assert inputs["input_ids"][0].tolist() == smol.tokenize(smol.apply_chat_template(q), add_bos=False)
        want = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        for gen in (draft, ngram):
            got = model.generate(**inputs, max_new_tokens=32, do_sample=False, custom_generate=gen)
            assert torch.equal(got, want), q
    assert draft.generator.accepted > 0


def test_vllm_proposer_answers_vllms_call(smollm2, monkeypatch):
    from tandem.vllm import Proposer

    cfg = types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=3),
        model_config=types.SimpleNamespace(model=str(smollm2), max_model_len=64),
    )
    p = Proposer(cfg)  # TANDEM_VLLM_DRAFT unset: n-gram lookup
    tokens = np.zeros((3, 64), dtype=np.int32)
    tokens[0, :8] = [1, 2, 3, 4, 5, 9, 2, 3]
    tokens[1, :4] = [7, 8, 7, 8]
    tokens[2, :4] = [5, 6, 7, 8]
    out = p.propose([[3], [], [8]], np.array([8, 4, 4]), tokens)
    assert out == [[4, 5, 9], [], []]
    monkeypatch.setenv("TANDEM_VLLM_DRAFT", "self:q8_0@all")
    p = Proposer(cfg)
    ids = tandem.Model(smollm2).tokenize("The capital of France is")
    tokens[2, : len(ids)] = ids
    out = p.propose([[], [], [ids[-1]]], np.array([0, 0, len(ids)]), tokens)
    assert out[0] == [] and out[1] == [] and len(out[2]) == 3
