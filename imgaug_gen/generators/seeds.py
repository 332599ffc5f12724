"""Per-image seeds: image ``i`` of a job seeded ``seed`` gets ``SeedSequence([seed, i]).generate_state(1)[0]``."""

from __future__ import annotations

import numpy as np


def per_image_seeds(seed: int, start: int, count: int) -> list[int]:
    """The seed of image ``i`` of a job seeded ``seed``: independent of batching,
    sharding and resumption, so image ``i`` is the same whoever makes it."""
    return seeds_at(seed, range(int(start), int(start) + int(count)))


def seeds_at(seed: int, indices) -> list[int]:
    """:func:`per_image_seeds` of the images ``indices``: ``SeedSequence([seed, i]).generate_state(1)[0]``
    for each ``i``, computed for all of them at once (:func:`_seed_sequence_words`; one SeedSequence per
    image costs 8-27 us, as much as the generator's forward of a small image)."""
    seed, idx = int(seed), np.asarray(indices, dtype=np.int64).reshape(-1)
    words = _uint32_words(seed)
    if len(idx) < 8 or words is None or len(words) > 3 or idx.min() < 0 or idx.max() >= 1 << 32:
        return [int(np.random.SeedSequence([seed, int(i)]).generate_state(1, np.uint32)[0]) for i in idx]
    return _seed_sequence_words(words, idx.astype(np.uint32)).tolist()


def _uint32_words(n: int) -> list[int] | None:
    """The little-endian 32-bit words numpy's SeedSequence makes of a non-negative int (0 -> [0])."""
    if n < 0:
        return None
    words = []
    while True:
        words.append(n & 0xFFFFFFFF)
        n >>= 32
        if not n:
            return words


def _seed_sequence_words(words: list[int], last: np.ndarray) -> np.ndarray:
    """``SeedSequence(entropy).generate_state(1, uint32)`` for each entropy ``[*words, last[k]]`` (at most 4
    words: numpy's pool size), vectorised over ``last``: the mixing of ``numpy.random.SeedSequence``
    (O'Neill's ``seed_seq``), step for step in wrapping uint32 arithmetic. Hand-written because numpy has
    no batched SeedSequence; tests compare it with numpy's own on seeds of 1-3 words."""
    u = np.uint32
    mult_a, mult_b, mix_l, mix_r = u(0x931E8875), u(0x58F38DED), u(0xCA01F9DD), u(0x4973F715)
    hash_const = [u(0x43B0D7E5)]

    def hashmix(value):
        value = value ^ hash_const[0]
        hash_const[0] = u(hash_const[0] * mult_a)
        value = value * hash_const[0]
        return value ^ (value >> u(16))

    def mix(x, y):
        r = mix_l * x - mix_r * y
        return r ^ (r >> u(16))

    with np.errstate(over="ignore"):
        entropy = [np.full(len(last), w, u) for w in words] + [last.astype(u)]
        entropy += [np.zeros(len(last), u)] * (4 - len(entropy))
        mixer = [hashmix(e) for e in entropy]
        for i_src in range(4):
            for i_dst in range(4):
                if i_src != i_dst:
                    mixer[i_dst] = mix(mixer[i_dst], hashmix(mixer[i_src]))
        value = mixer[0] ^ u(0x8B51F9DD)
        value = value * u(u(0x8B51F9DD) * mult_b)
        return value ^ (value >> u(16))
