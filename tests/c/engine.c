/* A toy inference engine driving tandem's C ABI (tandem.h): its "model" scores the next token
 * from the last token and its position, so wrong rollbacks or misordered logits change the
 * output. Checks that speculative generation returns exactly the engine's own greedy tokens
 * with prompt-lookup drafts and with a second (partly wrong) draft model, that on_token can
 * stop generation, that a config runs sampled speculation reproducibly, and that an engine
 * error comes back as -1 with a message. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tandem.h"

#define VOCAB 64
#define LIMIT 512

typedef struct {
    uint32_t ctx[LIMIT];
    size_t len;
    int noisy;      /* the draft model: wrong at every 5th position */
    int fail_after; /* forward fails after this many calls (0 = never) */
    int calls;
} Toy;

static uint32_t next_of(uint32_t tok, size_t pos, int noisy) {
    /* Short cycles (so prompt lookup finds repeats), shifted every 100 positions. */
    uint32_t n = (tok * 5 + 1 + (uint32_t)(pos / 100)) % 13;
    if (noisy && pos % 5 == 3) n = (n + 1) % VOCAB;
    return n;
}

static int toy_forward(void *user, const uint32_t *tokens, size_t n, float *logits) {
    Toy *t = user;
    if (t->fail_after && ++t->calls > t->fail_after) return 7;
    if (t->len + n > LIMIT) return 1;
    for (size_t i = 0; i < n; i++) {
        size_t pos = t->len;
        t->ctx[t->len++] = tokens[i];
        uint32_t best = next_of(tokens[i], pos, t->noisy);
        for (size_t j = 0; j < VOCAB; j++) logits[i * VOCAB + j] = -(float)((j + VOCAB - best) % VOCAB);
        logits[i * VOCAB + best] = 1.0f;
    }
    return 0;
}

static void toy_rollback(void *user, size_t len) {
    Toy *t = user;
    if (len < t->len) t->len = len;
}

typedef struct { uint32_t toks[LIMIT]; size_t n; size_t stop_after; } Out;

static int collect(void *user, uint32_t tok) {
    Out *o = user;
    o->toks[o->n++] = tok;
    return o->stop_after && o->n >= o->stop_after;
}

static TandemModel model_of(Toy *t) {
    TandemModel m = { t, toy_forward, toy_rollback, VOCAB, LIMIT };
    return m;
}

static int fail(const char *what) { fprintf(stderr, "FAIL: %s\n", what); return 1; }

int main(void) {
    const uint32_t prompt[] = {3, 9, 27, 17, 22};
    const size_t np = sizeof prompt / sizeof prompt[0], max = 200;
    const uint32_t eos[] = {63};
    /* The engine's own greedy decoding. */
    uint32_t want[LIMIT]; size_t nw = 0;
    { uint32_t last = prompt[np - 1]; size_t pos = np - 1;
      while (nw < max) { uint32_t t = next_of(last, pos, 0); if (t == eos[0]) break; want[nw++] = t; last = t; pos++; } }

    for (int mode = 0; mode < 3; mode++) {
        Toy v = {0}, d = {0}; d.noisy = 1;
        TandemModel vm = model_of(&v), dm = model_of(&d);
        Out o = {0};
        TandemStats st;
        int64_t n = tandem_generate(&vm, mode == 0 ? NULL : &dm, prompt, np, max, eos, 1,
                                    mode == 2 ? 3 : 6, mode != 1, collect, &o, &st);
        if (n < 0) { fprintf(stderr, "error: %s\n", tandem_last_error()); return 1; }
        if ((size_t)n != nw || o.n != nw || memcmp(o.toks, want, nw * sizeof(uint32_t)) != 0)
            return fail("speculative tokens differ from the engine's greedy tokens");
        if (st.generated != nw || st.accepted > st.drafted || st.verifier_passes == 0)
            return fail("inconsistent stats");
        if (st.accepted == 0) return fail("no draft was ever accepted");
        printf("mode %d: %zu tokens, %zu drafted, %zu accepted, %zu verifier passes\n",
               mode, st.generated, st.drafted, st.accepted, st.verifier_passes);
    }
    { /* A config: temperature 0 is the greedy run; a sampled run is reproducible by seed,
       * with lookup drafts and with a draft model, and is not the greedy output. */
        TandemConfig c = { 4, 1, 0.0f, 0, 1.0f, 0, 0.0f, 0.0 };
        Toy v = {0}; TandemModel vm = model_of(&v); Out o = {0};
        int64_t n = tandem_generate_with(&vm, NULL, prompt, np, max, eos, 1, &c, collect, &o, NULL);
        if (n != (int64_t)nw || memcmp(o.toks, want, nw * sizeof(uint32_t)) != 0)
            return fail("temperature 0 through a config is not the greedy output");
        c.temperature = 1.0f; c.seed = 42; c.draft_cost = 0.25;
        for (int with_draft = 0; with_draft < 2; with_draft++) {
            Out a = {0}, b = {0};
            for (int run = 0; run < 2; run++) {
                Toy v2 = {0}, d2 = {0}; d2.noisy = 1;
                TandemModel vm2 = model_of(&v2), dm2 = model_of(&d2);
                TandemStats st;
                int64_t m = tandem_generate_with(&vm2, with_draft ? &dm2 : NULL, prompt, np, 60,
                                                 eos, 1, &c, collect, run ? &b : &a, &st);
                if (m < 0) { fprintf(stderr, "error: %s\n", tandem_last_error()); return 1; }
                if ((size_t)m != st.generated) return fail("sampled stats");
            }
            if (a.n != b.n || memcmp(a.toks, b.toks, a.n * sizeof(uint32_t)) != 0)
                return fail("a seeded sampled run is not reproducible");
            if (a.n == (nw < 60 ? nw : 60) && memcmp(a.toks, want, a.n * sizeof(uint32_t)) == 0)
                return fail("the sampled run is the greedy output");
            printf("sampled, %s: %zu tokens, reproducible\n", with_draft ? "draft model" : "lookup", a.n);
        }
        c.temperature = -1.0f;
        if (tandem_generate_with(&vm, NULL, prompt, np, max, eos, 1, &c, NULL, NULL, NULL) != -1
            || strstr(tandem_last_error(), "temperature") == NULL)
            return fail("a negative temperature accepted");
        if (tandem_generate_with(&vm, NULL, prompt, np, max, eos, 1, NULL, NULL, NULL, NULL) != -1
            || strstr(tandem_last_error(), "config is NULL") == NULL)
            return fail("a NULL config accepted");
    }
    { /* on_token can stop generation. */
        Toy v = {0}; TandemModel vm = model_of(&v); Out o = {0}; o.stop_after = 5;
        int64_t n = tandem_generate(&vm, NULL, prompt, np, max, eos, 1, 4, 1, collect, &o, NULL);
        if (n != 5 || memcmp(o.toks, want, 5 * sizeof(uint32_t)) != 0) return fail("stop from on_token");
    }
    { /* An engine error is reported, not crashed on. */
        Toy v = {0}; v.fail_after = 3; TandemModel vm = model_of(&v);
        int64_t n = tandem_generate(&vm, NULL, prompt, np, max, eos, 1, 4, 1, NULL, NULL, NULL);
        if (n != -1 || strstr(tandem_last_error(), "returned 7") == NULL) return fail("error path");
        printf("error path: %s\n", tandem_last_error());
    }
    { /* Bad arguments. */
        if (tandem_generate(NULL, NULL, prompt, np, max, NULL, 0, 4, 1, NULL, NULL, NULL) != -1)
            return fail("NULL verifier accepted");
        /* Each bad model description is refused with a message naming the field, before
         * tandem calls the engine or sizes a buffer by it. */
        struct { const char *needle; int field; size_t value; int on_draft; } cases[] = {
            {"rollback callback is NULL", 0, 0, 0},
            {"forward callback is NULL", 1, 0, 0},
            {"vocab_size 0", 2, 0, 0},
            {"vocab_size 18446744073709551615", 2, (size_t)-1, 0},
            {"context_limit is 0", 3, 0, 0},
            {"differs from the verifier", 2, VOCAB + 1, 1},
            {"draft: the rollback callback is NULL", 0, 0, 1},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            Toy v = {0}, d = {0};
            TandemModel vm = model_of(&v), dm = model_of(&d);
            TandemModel *m = cases[i].on_draft ? &dm : &vm;
            if (cases[i].field == 0) m->rollback = NULL;
            if (cases[i].field == 1) m->forward = NULL;
            if (cases[i].field == 2) m->vocab_size = cases[i].value;
            if (cases[i].field == 3) m->context_limit = 0;
            int64_t n = tandem_generate(&vm, cases[i].on_draft ? &dm : NULL, prompt, np, max, eos,
                                        1, 4, 1, NULL, NULL, NULL);
            if (n != -1 || strstr(tandem_last_error(), cases[i].needle) == NULL) {
                fprintf(stderr, "case '%s': got %lld, '%s'\n", cases[i].needle, (long long)n,
                        tandem_last_error());
                return fail("bad model description accepted");
            }
            if (v.len != 0 || d.len != 0) return fail("the engine was called before the check");
        }
        printf("bad model descriptions: %zu refused\n", sizeof cases / sizeof cases[0]);
    }
    printf("OK\n");
    return 0;
}
