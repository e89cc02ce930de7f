"""The Python API: the same results as the CLI, errors as exceptions, the lock released."""

import json
import subprocess
import threading
import time

import pytest

import tandem
from conftest import cli


def test_generate_is_the_clis_output(stories, tandem_bin):
    m = tandem.Model(stories)
    for prompt in ["Once upon a time", "The little dog"]:
        text = m.generate(prompt, max_tokens=40)
        out = cli(tandem_bin, "generate", "--model", stories, "--prompt", prompt, "--max-tokens", 40)
        assert out.rstrip("\n") == prompt + text


def test_chat_is_the_clis_output(smol, smollm2, tandem_bin):
    q = "Name three primary colors."
    text = smol.chat(q, max_tokens=40)
    out = cli(tandem_bin, "generate", "--model", smollm2, "--chat", "--prompt", q, "--max-tokens", 40)
    assert text.strip() and text.strip() in out
    rendered = smol.apply_chat_template([{"role": "user", "content": q}])
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    assert smol.chat([{"role": "user", "content": q}], max_tokens=40) == text


def test_score_matches_the_clis_logprobs(smol, smollm2, tandem_bin):
    prompt = "The capital of France is"
    r = subprocess.run(
        [str(tandem_bin), "generate", "--model", str(smollm2), "--prompt", prompt,
         "--max-tokens", "6", "--logprobs"], capture_output=True, text=True, check=True)
    (row,) = [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]
    tokens, expected = row["tokens"], row["logprobs"]
    assert len(tokens) == 6 == len(expected)
    ids = smol.tokenize(prompt) + tokens
    got = smol.score(ids)
    assert len(got) == len(ids) - 1
    for a, b in zip(got[-6:], expected):
        assert abs(a - b) < 2e-3, (got[-6:], expected)
    assert smol.generate_tokens(prompt, max_tokens=6) == tokens


def test_drafters_propose_and_decode_losslessly(smol, smollm2, chat_prompts):
    ng = tandem.Drafter.ngram()
    assert ng.propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]
    ng.accept(2)
    assert ng.stats == {"proposed": 3, "accepted": 2}
    draft = tandem.Drafter.self_draft(smollm2, "q8_0", attention=True)
    assert draft.vocab_size == smol.vocab_size
    ids = smol.tokenize("The capital of France is")
    proposal = draft.propose(ids, 4)
    assert len(proposal) == 4
    # The verifier's greedy continuation starts with the draft's most likely tokens here.
    assert smol.generate_tokens(ids, max_tokens=1) == proposal[:1]
    # A fixed k: the adaptive controller reads the clock, so its counts vary run to run.
    dec = tandem.SpeculativeDecoder(smol, draft, adapt=False)
    for q in chat_prompts[:4]:
        p = smol.apply_chat_template(q)
        plain = smol.generate(p, max_tokens=48, add_bos=False)
        assert dec.generate(p, max_tokens=48, add_bos=False) == plain
        assert smol.generate(p, max_tokens=48, add_bos=False, draft=ng) == plain
    st = dec.stats
    assert st["drafted"] > 0 and 0 < st["accepted"] <= st["drafted"]
    assert st["tokens_per_verifier_pass"] > 1.0
    # Sampling (coupled): the same tokens as plain sampling with the same seed.
    s = dec.generate("Once upon a time", max_tokens=16, temperature=0.8, seed=3)
    assert s == smol.generate("Once upon a time", max_tokens=16, temperature=0.8, seed=3)
    fork = draft.fork()
    assert fork.propose(ids, 2) == proposal[:2]
    # Suffix lookup remembers earlier requests; a hybrid asks its model where lookup fails.
    sx = tandem.Drafter.suffix()
    first = smol.tokenize("The quick brown fox jumps over the lazy dog")
    assert sx.propose(first, 3) == []
    assert sx.propose(smol.tokenize("Then the quick brown fox"), 3) == first[4:7]
    hy = tandem.Drafter.hybrid(tandem.Drafter.suffix(), draft)
    assert hy.propose(ids, 4) == proposal
    p = smol.apply_chat_template(chat_prompts[0])
    assert smol.generate(p, max_tokens=48, add_bos=False, draft=hy) == smol.generate(p, max_tokens=48, add_bos=False)


def test_quantize_is_the_clis_bytes_and_evaluate_reports(stories, tandem_bin, tmp_path):
    a, b = tmp_path / "py.gguf", tmp_path / "cli.gguf"
    r = tandem.quantize(stories, a, scheme="q4_0", progress=False)
    assert r["tensors"] > 0 and r["bytes"] == a.stat().st_size
    cli(tandem_bin, "quantize", stories, "--out", b, "--scheme", "q4_0", "--quiet")
    assert a.read_bytes() == b.read_bytes()
    e, ec = tmp_path / "edges.gguf", tmp_path / "edges-cli.gguf"
    tandem.quantize(stories, e, scheme="q4_0", edge_mlp="1=q8_0", progress=False)
    cli(tandem_bin, "quantize", stories, "--out", ec, "--scheme", "q4_0", "--edge-mlp", "1=q8_0", "--quiet")
    assert e.read_bytes() == ec.read_bytes() and e.stat().st_size > a.stat().st_size
    g, gc = tmp_path / "gptq.gguf", tmp_path / "gptq-cli.gguf"
    tandem.quantize(stories, g, scheme="q4_0", method="gptq", act_order=False, calib_chunks=2, progress=False)
    cli(tandem_bin, "quantize", stories, "--out", gc, "--scheme", "q4_0", "--method", "gptq", "--act-order=false",
        "--calib-chunks", "2", "--quiet")
    assert g.read_bytes() == gc.read_bytes()
    ct = tmp_path / "ct"
    r = tandem.quantize(stories, ct, scheme="q8_0", format="compressed-tensors", progress=False)
    assert (ct / "config.json").exists() and r["quantized_layers"] > 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["Once upon a time there was a little girl who liked to play."] * 60))
    report = tandem.evaluate(stories, [a], text, ctx=64, chunks=4, speed_pp=0, progress=False)
    (m,) = report["models"]
    assert m["name"] == "py" and m["quality"]["kl"]["mean"] > 0
    assert 0 < m["quality"]["top1_agreement"] <= 1
    assert report["reference"]["ppl"] > 1
    assert not list(tmp_path.glob("*.cache"))


def test_errors_are_exceptions_with_one_line(stories, tmp_path):
    with pytest.raises(tandem.TandemError, match="no such file"):
        tandem.Model(tmp_path / "missing")
    m = tandem.Model(stories)
    with pytest.raises(tandem.TandemError, match="outside the vocabulary"):
        m.generate([10**6], max_tokens=2)
    with pytest.raises(tandem.TandemError):
        m.generate("x", temperature=-1.0)
    with pytest.raises(tandem.TandemError, match="unknown type"):
        tandem.Drafter.self_draft(stories, "q9_9")
    with pytest.raises(tandem.TandemError, match="chat template"):
        m.chat("hello")
    # A template that joins a list to itself 40 times is stopped at its memory budget instead
    # of aborting the interpreter.
    hostile = tmp_path / "hostile.jinja"
    hostile.write_text(
        "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"
    )
    with pytest.raises(tandem.TandemError, match="chat template: rendering needed more than"):
        m.apply_chat_template([{"role": "user", "content": "hi"}], template=hostile)
    out = tmp_path / "x.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(tandem.TandemError) as e:
        tandem.quantize(stories, out, scheme="q8_0", progress=False)
    assert "\n" not in str(e.value) and "--force" in str(e.value)
    assert out.read_bytes() == b"mine"
    with pytest.raises(tandem.TandemError, match="unknown type"):
        tandem.quantize(stories, tmp_path / "y.gguf", scheme="q3_x", progress=False)
    assert not (tmp_path / "y.gguf").exists()
    # Rounding to nearest reads no calibration: asking it to self-calibrate is an error.
    with pytest.raises(tandem.TandemError, match="calib_self.*method gptq"):
        tandem.quantize(stories, tmp_path / "y.gguf", scheme="q4_0", calib_self=64, progress=False)
    assert not (tmp_path / "y.gguf").exists()


def test_compute_releases_the_interpreter_lock(smol):
    # With the lock held through the call, no tick could land strictly inside it. How many
    # do land depends on how often the OS runs the ticker beside the compute threads (ten
    # in ~0.4 s on a busy 2-core machine), so the bound is low.
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    start = time.perf_counter()
    smol.generate("Tell me a story about a fox.", max_tokens=48)
    end = time.perf_counter()
    stop.set()
    t.join()
    inside = sum(1 for x in ticks if start < x < end)
    assert inside >= 3, f"{inside} ticks in {end - start:.3f} s of generate"
