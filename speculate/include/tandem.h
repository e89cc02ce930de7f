/* tandem.h — speculative decoding for any inference engine, through a C ABI.
 *
 * The engine supplies its model as two callbacks over one sequence's context: `forward` runs
 * n tokens after the context and returns their logits, `rollback` shrinks the context. tandem
 * drafts tokens (by prompt lookup, or with a second engine model as the draft), verifies them
 * with ONE forward call of up to draft_max + 1 tokens, keeps the longest prefix the verifier
 * agrees with, rolls the verifier back to it, and adapts the draft length to acceptance and
 * cost. tandem_generate is greedy: the tokens delivered are exactly the engine's own greedy
 * decoding. tandem_generate_with takes a TandemConfig and also samples (rejection sampling: the
 * engine's own sampling distribution, reproducible by seed).
 *
 * Link with -ltandem_speculate (libtandem_speculate.so, built by
 * `cargo build --release -p tandem-speculate`).
 */
#ifndef TANDEM_H
#define TANDEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct TandemModel {
    void *user;
    /* Run tokens[0..n) after the current context (the context grows by n) and write
     * n * vocab_size floats to logits: row i scores the token that follows tokens[i].
     * Return 0 on success; anything else aborts the generation with an error. */
    int (*forward)(void *user, const uint32_t *tokens, size_t n, float *logits);
    /* Keep only the first len positions of the context (len <= current length). */
    void (*rollback)(void *user, size_t len);
    /* 1 .. 2^24; a draft's must equal the verifier's. */
    size_t vocab_size;
    /* Most positions the context can hold (>= 1); generation stops cleanly there. */
    size_t context_limit;
} TandemModel;

typedef struct TandemStats {
    size_t generated;
    size_t drafted;
    size_t accepted;
    size_t verifier_passes;
    double draft_seconds;
    double verify_seconds;
    double total_seconds;
} TandemStats;

/* Greedy speculative generation of up to max_tokens after prompt (the verifier's context must
 * start empty). draft: NULL for prompt-lookup (n-gram) drafts, or a second model with the same
 * vocabulary. Generation ends at any token in eos[0..n_eos) (not delivered), at max_tokens or
 * at the context limit. on_token (may be NULL) receives each accepted token in order; a
 * non-zero return stops generation. adaptive != 0 lets tandem pick the draft length (down to
 * 0, i.e. plain decoding, when drafts do not pay). stats may be NULL.
 * forward and rollback must both be set (a NULL one is refused before any call: rejected
 * drafts must leave the engine's context). tandem allocates the logits buffer itself, of
 * n * vocab_size floats; a request over 2^30 floats is refused.
 * Returns the number of tokens delivered, or -1 (see tandem_last_error). */
int64_t tandem_generate(const TandemModel *verifier, const TandemModel *draft,
                        const uint32_t *prompt, size_t n_prompt, size_t max_tokens,
                        const uint32_t *eos, size_t n_eos, size_t draft_max, int adaptive,
                        int (*on_token)(void *user, uint32_t token), void *on_token_user,
                        TandemStats *stats);

/* How to speculate, for tandem_generate_with. */
typedef struct TandemConfig {
    /* Most tokens drafted per verifier pass. */
    size_t draft_max;
    /* != 0: tandem picks the draft length (down to 0 when drafts do not pay). */
    int adaptive;
    /* 0: greedy (exactly the engine's own greedy decoding). > 0: sampled at this temperature;
     * rejection sampling keeps the verifier's own distribution, and `seed` reproduces a run. */
    float temperature;
    /* Keep only the top_k most likely tokens (0 = off), the nucleus of top_p (1 = off). */
    size_t top_k;
    float top_p;
    uint64_t seed;
    /* A draft model stops drafting below this top probability (0 = never). */
    float draft_p_min;
    /* A draft step's time over a verifier step's (their weight bytes' ratio, say; 0 for
     * prompt lookup): a sampled adaptive run adapts on it rather than on the clock, so the
     * seed alone decides its output. */
    double draft_cost;
} TandemConfig;

/* tandem_generate with the settings of *config (not NULL): greedy or sampled. The draft model,
 * when given, samples its proposals on a stream of its own (derived from seed). Returns as
 * tandem_generate does; an out-of-range setting (temperature < 0, top_p outside (0, 1], ...)
 * is refused before any call. */
int64_t tandem_generate_with(const TandemModel *verifier, const TandemModel *draft,
                             const uint32_t *prompt, size_t n_prompt, size_t max_tokens,
                             const uint32_t *eos, size_t n_eos, const TandemConfig *config,
                             int (*on_token)(void *user, uint32_t token), void *on_token_user,
                             TandemStats *stats);

/* The last error on this thread, "" if none. Valid until the next tandem call. */
const char *tandem_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* TANDEM_H */
