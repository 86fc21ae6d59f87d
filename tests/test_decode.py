"""Beam and greedy search against fake models whose next-token distributions are known exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pcm.decode import beam_search, decode_features, greedy_decode

BOS, EOS = 0, 1


class TableModel:
    """A fake PCM-Net: next-token log-probs are a function of (image, prefix) only.

    `encode` puts the image index into the memory so `decode` can tell the images of a batch
    apart after the beams were expanded; `table(image, prefix)` gives the next-token logits.
    """

    training = False

    def __init__(self, table, vocab_size: int) -> None:
        self.table, self.V = table, vocab_size
        self.encode_calls = 0

    def encode(self, global_feat, patches):
        self.encode_calls += 1
        memory = global_feat[:, None, :1].clone()                    # [B, 1, 1]: the image index
        return memory, torch.zeros(memory.shape[:2], dtype=torch.bool)

    def decode(self, tokens, memory, memory_pad):
        N, L = tokens.shape
        out = torch.zeros(N, L, self.V)
        for n in range(N):
            image = int(memory[n, 0, 0])
            for t in range(L):
                out[n, t] = torch.as_tensor(self.table(image, tuple(tokens[n, 1: t + 1].tolist())))
        return out


def feats(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4)  # [n, 4], row i holds i
    return g, torch.zeros(n, 3, 5)


def log(p: list[float]) -> list[float]:
    return [math.log(x) if x > 0 else -1e9 for x in p]


# Tokens: 0 BOS, 1 EOS, 2 "a", 3 "b". Greedy takes "a" (0.5) and then the best it can is 0.34;
# beam search finds "b" EOS: 0.4 * 0.9 = 0.36 > 0.5 * 0.34 = 0.17.
def trap(image, prefix):
    if prefix == ():
        return log([0.0, 0.1, 0.5, 0.4])
    if prefix[-1] == 2:
        return log([0.0, 0.34, 0.33, 0.33])
    return log([0.0, 0.9, 0.05, 0.05])


def test_beam_finds_the_better_caption_that_greedy_misses():
    model = TableModel(trap, 4)
    g, p = feats(2)
    assert greedy_decode(model, g, p, bos=BOS, eos=EOS) == [[2], [2]]
    assert beam_search(model, g, p, bos=BOS, eos=EOS, beam_size=3) == [[3], [3]]
    assert model.encode_calls == 2  # once per call, not per step


def random_table(seed: int, V: int):
    """Deterministic pseudo-random logits per (image, prefix); BOS is never predicted."""
    def table(image, prefix):
        gen = torch.Generator().manual_seed(hash((seed, image, prefix)) % (2**31))
        logits = torch.randn(V, generator=gen) * 2
        logits[BOS] = -1e9
        return logits.tolist()
    return table


def seq_logprob(table, image, seq, max_len):
    """Sum of log-probs of `seq` (+ EOS unless cut at max_len)."""
    full = list(seq) + ([EOS] if len(seq) < max_len else [])
    total = 0.0
    for i, tok in enumerate(full):
        total += torch.log_softmax(torch.tensor(table(image, tuple(full[:i]))), 0)[tok].item()
    return total


def brute_force(table, image, V, max_len, length_penalty=0.0):
    words = range(2, V)
    best, best_seq = -math.inf, None
    for n in range(max_len + 1):
        for seq in itertools.product(words, repeat=n):
            steps = n + 1 if n < max_len else n
            s = seq_logprob(table, image, seq, max_len) / (steps ** length_penalty)
            if s > best:
                best, best_seq = s, list(seq)
    return best_seq


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_is_exhaustive_and_batched_images_stay_independent(seed, length_penalty):
    # With 2 words and max_len 3 there are at most 8 live prefixes: beam 8 explores all of them,
    # so it must return the exact argmax; each image of the batch has its own distribution.
    V, max_len = 4, 3
    table = random_table(seed, V)
    model = TableModel(table, V)
    g, p = feats(3)
    got = beam_search(model, g, p, bos=BOS, eos=EOS, beam_size=8, max_len=max_len, length_penalty=length_penalty)
    assert got == [brute_force(table, i, V, max_len, length_penalty) for i in range(3)]


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_beam_one_equals_greedy(seed):
    model = TableModel(random_table(seed, 6), 6)
    g, p = feats(4)
    assert beam_search(model, g, p, bos=BOS, eos=EOS, beam_size=1, max_len=6) == \
        greedy_decode(model, g, p, bos=BOS, eos=EOS, max_len=6)


def test_beam_result_matches_single_image_runs():
    model = TableModel(random_table(7, 7), 7)
    g, p = feats(5)
    batched = beam_search(model, g, p, bos=BOS, eos=EOS, beam_size=3, max_len=5)
    alone = [beam_search(model, g[i:i + 1], p[i:i + 1], bos=BOS, eos=EOS, beam_size=3, max_len=5)[0]
             for i in range(5)]
    assert batched == alone


def never_ends(image, prefix):
    return log([0.0, 0.01, 0.9, 0.09])


def ends_at_once(image, prefix):
    return log([0.0, 0.9, 0.05, 0.05])


@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
def test_max_len_and_eos_are_respected(decode):
    g, p = feats(2)
    assert decode(TableModel(never_ends, 4), g, p, bos=BOS, eos=EOS, max_len=4) == [[2, 2, 2, 2]] * 2
    assert decode(TableModel(ends_at_once, 4), g, p, bos=BOS, eos=EOS, max_len=4) == [[], []]


def test_finished_hypotheses_are_kept_against_longer_live_ones():
    # "b" EOS (0.45 * 0.9) finishes at step 2; "a" continues with 0.55 * 0.6 per step and
    # would still be the top live beam at step 2 (0.33 < 0.405 though): the finished one wins.
    def table(image, prefix):
        if prefix == ():
            return log([0.0, 0.0, 0.55, 0.45])
        if prefix[0] == 3:
            return log([0.0, 0.9, 0.05, 0.05])
        return log([0.0, 0.2, 0.6, 0.2])
    g, p = feats(1)
    assert beam_search(TableModel(table, 4), g, p, bos=BOS, eos=EOS, beam_size=2, max_len=10) == [[3]]


def test_errors_name_the_problem():
    model = TableModel(trap, 4)
    g, p = feats(1)
    model.training = True
    with pytest.raises(ValueError, match="eval mode"):
        beam_search(model, g, p, bos=BOS, eos=EOS)
    model.training = False
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, g, p, bos=BOS, eos=EOS, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, g, p, bos=BOS, eos=EOS, max_len=0)


def test_banned_tokens_are_never_generated():
    # "a" (2) is the most likely word everywhere; banned, the searches must pick "b" (3) instead.
    def likes_a(image, prefix):
        return log([0.0, 0.1, 0.6, 0.3]) if len(prefix) < 2 else log([0.0, 0.8, 0.1, 0.1])

    model = TableModel(likes_a, 4)
    g, p = feats(2)
    assert greedy_decode(model, g, p, bos=BOS, eos=EOS) == [[2, 2], [2, 2]]
    assert greedy_decode(model, g, p, bos=BOS, eos=EOS, banned=(2,)) == [[3, 3], [3, 3]]
    for k in (1, 3):
        ids = beam_search(model, g, p, bos=BOS, eos=EOS, beam_size=k, banned=(BOS, 2))
        assert all(2 not in row for row in ids), ids


class WordVocab:
    """The vocabulary interface decode_features uses: special ids, banned ids, ids -> text."""

    bos, eos, banned = BOS, EOS, ()

    def decode(self, ids: list[int]) -> str:
        return " ".join("ab"[i - 2] for i in ids)


def test_decode_features_names_each_caption_by_its_image_across_batches():
    # The trap table: greedy says "a", a beam of 3 finds "b"; the image ids come from the batches.
    model, (g, p) = TableModel(trap, 4), feats(3)
    batches = [(["x", "y"], g[:2], p[:2]), (["z"], g[2:], p[2:])]
    beam = decode_features(model, WordVocab(), batches, beam_size=3, max_len=5, length_penalty=0.0)
    assert beam == {"x": "b", "y": "b", "z": "b"} and list(beam) == ["x", "y", "z"]
    greedy = decode_features(model, WordVocab(), batches, beam_size=1, max_len=5, length_penalty=0.0)
    assert greedy == {"x": "a", "y": "a", "z": "a"}
