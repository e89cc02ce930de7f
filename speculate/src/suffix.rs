//! Suffix decoding across requests: drafts copied from what came after the longest earlier
//! occurrence of the context's tail, in this sequence or in any earlier one of the session
//! (as vLLM's suffix decoding does, with an index of bigram positions instead of a suffix
//! tree). Chat answers repeat themselves across requests (phrasings, list scaffolding, code
//! idioms, the template's own tokens) far more than within one short answer, which is where
//! plain prompt lookup finds nothing.

use crate::drafter::{gate_lookup, longest_context_match, Draft, DraftGate, Drafter};
use crate::Result;
use std::collections::HashMap;

/// Ends every stored sequence (no real token id): a match never runs from one into the next.
const SEPARATOR: u32 = u32::MAX;

/// Earlier sequences of a session, indexed by bigram.
#[derive(Debug, Default, Clone)]
pub struct SuffixCache {
    tokens: Vec<u32>,
    /// Bigram → positions in `tokens` where it starts (ascending).
    index: HashMap<(u32, u32), Vec<usize>>,
    /// Oldest tokens are forgotten above this many (0 = unlimited).
    pub max_tokens: usize,
}

impl SuffixCache {
    pub fn new(max_tokens: usize) -> Self {
        SuffixCache {
            max_tokens,
            ..Default::default()
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Stores one finished sequence (prompt and answer).
    pub fn add(&mut self, seq: &[u32]) {
        if seq.len() < 2 {
            return;
        }
        if self.max_tokens > 0 && self.tokens.len() + seq.len() + 1 > self.max_tokens {
            // Keep the newest half and rebuild the index: amortized O(1) per token.
            let keep = self.max_tokens / 2;
            let from = self.tokens.len().saturating_sub(keep);
            let rest = self.tokens.split_off(from);
            self.tokens.clear();
            self.index.clear();
            // Restart at a sequence boundary so no stored match starts mid-sequence.
            let start = rest
                .iter()
                .position(|&t| t == SEPARATOR)
                .map_or(rest.len(), |p| p + 1);
            for s in rest[start..]
                .split(|&t| t == SEPARATOR)
                .filter(|s| !s.is_empty())
            {
                self.push(s);
            }
        }
        self.push(seq);
    }

    fn push(&mut self, seq: &[u32]) {
        let base = self.tokens.len();
        self.tokens.extend_from_slice(seq);
        self.tokens.push(SEPARATOR);
        for (i, w) in seq.windows(2).enumerate() {
            self.index.entry((w[0], w[1])).or_default().push(base + i);
        }
    }

    /// The longest match (at most `max_ngram` tokens, at least 2) of `context`'s tail in the
    /// stored sequences: (its length, up to `k` tokens that followed it). The latest
    /// occurrence wins among equally long ones.
    pub fn lookup(&self, context: &[u32], max_ngram: usize, k: usize) -> (usize, Vec<u32>) {
        self.lookup_many(context, max_ngram, k, 1)
            .pop()
            .unwrap_or((0, Vec::new()))
    }

    /// Up to `paths` matches (each at least 2 tokens long) with distinct continuations,
    /// longest first, the latest first among equally long ones: (match length, up to `k`
    /// tokens that followed it). The candidates of a token-tree draft.
    pub fn lookup_many(
        &self,
        context: &[u32],
        max_ngram: usize,
        k: usize,
        paths: usize,
    ) -> Vec<(usize, Vec<u32>)> {
        let n = context.len();
        if n < 2 || k == 0 || paths == 0 {
            return Vec::new();
        }
        let Some(starts) = self.index.get(&(context[n - 2], context[n - 1])) else {
            return Vec::new();
        };
        // (match length, where the continuation starts), latest occurrence first.
        let mut found: Vec<(usize, usize)> = Vec::new();
        for &s in starts.iter().rev() {
            // The bigram occupies s, s+1; extend the match backwards.
            let mut len = 2;
            while len < max_ngram
                && len < n
                && s + 2 > len
                && self.tokens[s + 1 - len] == context[n - 1 - len]
                && self.tokens[s + 1 - len] != SEPARATOR
            {
                len += 1;
            }
            found.push((len, s + 2));
            // Enough full-length matches: older ones cannot rank higher.
            if found.iter().filter(|f| f.0 >= max_ngram).count() >= paths {
                break;
            }
        }
        // Longest first; the sort is stable, so the latest stays first among equals.
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut out: Vec<(usize, Vec<u32>)> = Vec::new();
        for (len, end) in found {
            let follow: Vec<u32> = self.tokens[end..]
                .iter()
                .take_while(|&&t| t != SEPARATOR)
                .take(k)
                .copied()
                .collect();
            if !follow.is_empty() && !out.iter().any(|(_, f)| *f == follow) {
                out.push((len, follow));
                if out.len() == paths {
                    break;
                }
            }
        }
        out
    }
}

/// Drafts from the longest earlier occurrence of the context's tail, in the context itself
/// or in the session's earlier sequences ([`SuffixCache`]); a context that does not continue
/// the previous one starts a new request, and the previous sequence joins the cache.
#[derive(Debug, Clone)]
pub struct SuffixDrafter {
    pub cache: SuffixCache,
    /// Longest tail matched (longer matches predict better).
    pub max_ngram: usize,
    /// Propose nothing for a shorter match (a hybrid's model draft then proposes instead).
    pub min_match: usize,
    /// The sequence being decoded (the last context seen).
    current: Vec<u32>,
    /// Most distinct continuations proposed at once, as a token tree (1 = a chain: the best
    /// match only). Lookup candidates cost nothing to draft, only a verifier row each.
    pub paths: usize,
}

impl Default for SuffixDrafter {
    fn default() -> Self {
        SuffixDrafter {
            // ~1M tokens of history: 4 MB of ids plus the index.
            cache: SuffixCache::new(1 << 20),
            max_ngram: 8,
            min_match: 1,
            current: Vec::new(),
            paths: 1,
        }
    }
}

impl SuffixDrafter {
    /// Matching tails of up to `max_ngram` tokens, with the default history bound.
    pub fn new(max_ngram: usize) -> Self {
        SuffixDrafter {
            max_ngram,
            ..Default::default()
        }
    }

    /// Ends the current sequence: it joins the cache.
    pub fn finish_sequence(&mut self) {
        let seq = std::mem::take(&mut self.current);
        self.cache.add(&seq);
    }

    /// Ends the current sequence as `seq` (the whole of it: its last tokens were never a
    /// draft's context), which joins the cache.
    pub fn end_sequence(&mut self, seq: &[u32]) {
        self.current.clear();
        self.cache.add(seq);
    }
}

impl Drafter for SuffixDrafter {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        let continues = context.len() >= self.current.len()
            && context[..self.current.len()] == self.current[..];
        if !continues {
            self.finish_sequence();
        }
        // Only the tokens since the last call are new.
        let seen = self.current.len();
        self.current.extend_from_slice(&context[seen..]);
        // The context's own match first, then the history's, longest first (the context's
        // wins a tie: the same request predicts itself best).
        let mut candidates = vec![longest_context_match(context, self.max_ngram, k)];
        candidates.extend(
            self.cache
                .lookup_many(context, self.max_ngram, k, self.paths.max(1)),
        );
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let paths: Vec<Vec<u32>> = candidates
            .into_iter()
            .filter(|(n, t)| *n >= self.min_match.max(1) && !t.is_empty())
            .map(|(_, t)| t)
            .take(self.paths.max(1))
            .collect();
        Ok(trie(&paths))
    }
    fn propose_gated(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
    ) -> Result<Draft> {
        Ok(gate_lookup(self.propose(context, k)?, gate))
    }
}

/// The token tree of `paths` (shared prefixes merged; the first path is the main chain), or
/// the chain of the one path.
fn trie(paths: &[Vec<u32>]) -> Draft {
    let mut d = Draft::default();
    let mut parents: Vec<Option<usize>> = Vec::new();
    for path in paths {
        let mut node: Option<usize> = None;
        for &t in path {
            let existing = (0..d.tokens.len()).find(|&i| parents[i] == node && d.tokens[i] == t);
            node = Some(existing.unwrap_or_else(|| {
                d.tokens.push(t);
                parents.push(node);
                d.tokens.len() - 1
            }));
        }
    }
    if paths.len() > 1 {
        d.parents = Some(parents);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_longest_latest_match_and_stops_at_a_sequence_end() {
        let mut c = SuffixCache::new(0);
        c.add(&[1, 2, 3, 4, 5]);
        c.add(&[9, 2, 3, 7, 8, 6]);
        // Tail (2, 3): latest occurrence continues 7, 8, 6 and ends there.
        assert_eq!(c.lookup(&[0, 2, 3], 8, 5), (2, vec![7, 8, 6]));
        // Tail (1, 2, 3): the first sequence matches longer.
        assert_eq!(c.lookup(&[1, 2, 3], 8, 2), (3, vec![4, 5]));
        assert_eq!(c.lookup(&[4, 4], 8, 2), (0, vec![]));
        // Nothing follows a sequence's last bigram.
        assert_eq!(c.lookup(&[8, 6], 8, 2), (0, vec![]));
    }

    #[test]
    fn sequences_join_the_cache_when_a_new_request_starts() {
        let mut d = SuffixDrafter::default();
        assert!(d.propose(&[5, 6, 7, 8], 3).unwrap().tokens.is_empty());
        assert!(d.propose(&[5, 6, 7, 8, 1, 2], 3).unwrap().tokens.is_empty());
        // A new request: the previous one is now history.
        assert_eq!(d.propose(&[40, 7, 8], 3).unwrap().tokens, vec![1, 2]);
        // In-context matches still count, and win ties.
        assert_eq!(
            d.propose(&[40, 7, 8, 3, 7, 8], 3).unwrap().tokens,
            vec![3, 7, 8]
        );
    }

    #[test]
    fn the_history_is_bounded() {
        let mut c = SuffixCache::new(20);
        for i in 0..50u32 {
            c.add(&[i, i + 1, i + 2]);
        }
        assert!(c.len() <= 20);
        assert_eq!(c.lookup(&[49, 50], 4, 1), (2, vec![51]));
        assert_eq!(c.lookup(&[1, 2], 4, 1), (0, vec![]));
    }

    #[test]
    fn several_continuations_make_a_token_tree() {
        let mut d = SuffixDrafter {
            paths: 3,
            ..Default::default()
        };
        // Three earlier requests continue "7 8" differently (two share a first token).
        d.end_sequence(&[7, 8, 1, 2]);
        d.end_sequence(&[7, 8, 1, 3]);
        d.end_sequence(&[5, 7, 8, 4]);
        let draft = d.propose(&[5, 7, 8], 2).unwrap();
        // The longest match (5 7 8 → 4) is the main chain; then the latest (1 3), then (1 2).
        assert_eq!(draft.main_chain().tokens, vec![4]);
        assert_eq!(draft.tokens, vec![4, 1, 3, 2]);
        assert_eq!(draft.parents, Some(vec![None, None, Some(1), Some(1)]));
        // One path is a chain.
        d.paths = 1;
        let chain = d.propose(&[6, 7, 8], 2).unwrap();
        assert!(chain.parents.is_none());
        assert_eq!(chain.tokens, vec![4]);
    }
}
