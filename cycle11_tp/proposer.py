"""The n-gram proposer (vLLM's "ngram" method, also called prompt lookup): draft tokens for free.

Text that copies from its context (a quote, an edit of given code, a summary that reuses the
prompt's words) repeats n-grams it has seen. So: take the last n tokens of the sequence, find the
latest earlier place where the same n tokens occur, and propose the k tokens that followed them
there. Longer n-grams are tried first (prompt_lookup_max down to prompt_lookup_min): a longer
match is better evidence. No model runs: the proposal costs a scan of the token list.

    [1, 2, 3, 4, 2, 3], n = 2: the suffix [2, 3] occurred at positions 1-2, followed by
    [4, 2, 3]: with k = 3 that is the proposal (k = 4: [4, 2, 3, 4], the copy goes on).

Adaptive: a sequence whose proposals keep being rejected costs k extra query rows a step for
nothing. After each verification the next draft is at most one longer than what was accepted,
and a verification that accepted nothing turns proposing off for the next SKIP_AFTER_MISS steps.
"""

SKIP_AFTER_MISS = 4   # decode steps without proposals after a verification that accepted nothing


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min} and {prompt_lookup_max}")
        self.k = num_speculative_tokens
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, token_ids: list[int], k: int | None = None) -> list[int]:
        """Up to k (default: num_speculative_tokens) tokens that followed the latest earlier
        occurrence of the sequence's last n tokens, the longest n that matches; [] if none does."""
        k = self.k if k is None else k
        if k <= 0:
            return []
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = token_ids[length - n:]
            # Latest first: the most recent context is the likeliest to be copied next. A match
            # must end before the last token (start + n < length), so something follows it.
            for start in range(length - n - 1, -1, -1):
                if token_ids[start + n - 1] == suffix[-1] and token_ids[start:start + n] == suffix:
                    return self._copy(token_ids, start + n, k)
        return []

    @staticmethod
    def _copy(token_ids: list[int], first: int, k: int) -> list[int]:
        """k tokens copied from `first` on; a copy that reaches the end goes on with what it has
        just copied (as LZ77 does), so a repeating pattern is proposed k tokens deep: for [7, 7, 7]
        the latest match of [7] is followed by one token only, and [7] * k is proposed."""
        out = []
        for i in range(k):
            position = first + i
            out.append(token_ids[position] if position < len(token_ids) else out[position - len(token_ids)])
        return out

    def draft_len(self, seq) -> int:
        """How many tokens to propose for this sequence now (the adaptive rule above)."""
        if seq.spec_skip > 0:
            seq.spec_skip -= 1
            return 0
        return self.k if seq.spec_draft_len is None else min(self.k, seq.spec_draft_len)

    def record(self, seq, num_proposed: int, num_accepted: int) -> None:
        """Adapt the sequence's next draft length to what this verification accepted."""
        seq.spec_draft_len = num_accepted + 1
        if num_accepted == 0 and num_proposed > 0:
            seq.spec_skip = SKIP_AFTER_MISS
