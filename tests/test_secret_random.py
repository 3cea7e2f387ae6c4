"""SecretRandom: AES-256-CTR layout, exact resume, secrecy, and the distributions it draws.

Statistical checks use fresh OS-keyed streams (the generator the app really uses) and bounds
of 6 standard errors (two-sided false-alarm probability ~2e-9 per check) or goodness-of-fit
p-values above 1e-6: sample sizes are chosen so these bounds are tight, never loosened.
"""

import copy
import json
import math
import pickle

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from common.privacy.secret_random import CHUNK, SecretRandom

Z = 6.0  # standard errors
P_MIN = 1e-6  # smallest goodness-of-fit p-value accepted
KEY = bytes(range(32))


def _aes_blocks(key: bytes, first: int, count: int) -> bytes:
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return ecb.update(b"".join((first + i).to_bytes(16, "big") for i in range(count)))


def _within(estimate: float, expected: float, std_error: float) -> bool:
    return abs(estimate - expected) <= Z * std_error


def test_keystream_is_aes256_of_a_big_endian_block_counter():
    assert SecretRandom(KEY).random_bytes(64).tobytes() == _aes_blocks(KEY, 0, 4)
    # A position whose counter carries out of its low 64 bits, 5 bytes into a block.
    start = (2**64 - 1) * 16 + 5
    expected = _aes_blocks(KEY, 2**64 - 1, 3)[5:45]
    assert SecretRandom(KEY, position=start).random_bytes(40).tobytes() == expected


@pytest.mark.parametrize("position", [0, 1, 15, 16, 17, CHUNK - 3, CHUNK + 5])
def test_any_position_resumes_the_same_keystream(position):
    whole = SecretRandom(KEY).random_bytes(position + CHUNK + 40)
    assert np.array_equal(SecretRandom(KEY, position=position).random_bytes(CHUNK + 40), whole[position:])
    split = SecretRandom(KEY)  # read sizes do not change the stream
    parts = [split.random_bytes(n) for n in (position, 7, CHUNK + 33)]
    assert np.array_equal(np.concatenate(parts), whole) and split.position == len(whole)


def _draw_everything(rng: SecretRandom) -> list[np.ndarray]:
    return [
        rng.random_bytes(3),
        rng.uniform(5),
        rng.bernoulli(0.3, (3, 7)),
        np.array(rng.choice_without_replacement(range(50), 9)),
        rng.standard_normal(11),
        rng.gaussian((4, 3), 1.7),
        rng.discrete_laplace(13, 2.5),
        rng.torch_gaussian_like(__import__("torch").zeros(3, 2), 0.5).numpy(),
        rng.below([3, 2**63 + 1, 1]),
    ]


def test_state_dict_continues_the_stream_bit_identically():
    original = SecretRandom()
    _draw_everything(original)
    assert original.position % 16 != 0  # resumes in the middle of a block
    state = json.loads(json.dumps(original.state_dict()))  # plain JSON
    assert set(state) == {"key", "position", "debug"} and state["debug"] is False
    resumed = SecretRandom.from_state_dict(state)
    for ours, theirs in zip(_draw_everything(original), _draw_everything(resumed)):
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
    assert resumed.position == original.position


def test_fresh_streams_differ_and_only_a_debug_key_repeats():
    assert SecretRandom().uniform(4).tobytes() != SecretRandom().uniform(4).tobytes()
    first, second = SecretRandom.from_debug_key("x"), SecretRandom.from_debug_key("x")
    assert first.debug and second.debug and not SecretRandom().debug
    assert first.gaussian(100, 1.0).tobytes() == second.gaussian(100, 1.0).tobytes()
    assert SecretRandom.from_debug_key("y").uniform(4).tobytes() != SecretRandom.from_debug_key("x").uniform(4).tobytes()
    assert SecretRandom.from_state_dict(first.state_dict()).debug


def test_the_key_is_never_shown_or_pickled():
    rng = SecretRandom()
    key = rng.state_dict()["key"]
    assert key not in repr(rng) and key not in str(rng)
    for leak in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError):
            leak(rng)


def test_bad_arguments_are_refused():
    for call in (
        lambda: SecretRandom(b"short"),
        lambda: SecretRandom(position=-1),
        lambda r: r.bernoulli(1.5, 3),
        lambda r: r.gaussian(3, -1.0),
        lambda r: r.discrete_laplace(3, -1.0),
        lambda r: r.choice_without_replacement([1, 2], 3),
        lambda r: r.below([0]),
    ):
        with pytest.raises(ValueError):
            call(SecretRandom()) if call.__code__.co_argcount else call()


@pytest.mark.parametrize("size", [(), 0, 1, 7, (3, 5), (2, 0, 4)])
def test_shapes_and_dtypes(size):
    rng, shape = SecretRandom(), np.empty(size).shape
    for draw, dtype in (
        (rng.uniform(size), np.float64),
        (rng.bernoulli(0.5, size), np.bool_),
        (rng.standard_normal(size), np.float64),
        (rng.gaussian(size, 2.0), np.float64),
        (rng.discrete_laplace(size, 2.0), np.int64),
    ):
        assert draw.shape == shape and draw.dtype == dtype
    assert not rng.gaussian(size, 0.0).any() and not rng.discrete_laplace(size, 0.0).any()


def test_torch_noise_takes_the_reference_dtype_shape_and_scale():
    import torch

    rng = SecretRandom()
    for dtype in (torch.float32, torch.float64):
        noise = rng.torch_gaussian_like(torch.zeros(500, 400, dtype=dtype), 3.0)
        assert noise.dtype == dtype and noise.shape == (500, 400)
        var, n = noise.double().var().item(), noise.numel()
        assert _within(var, 9.0, math.sqrt(2 * 81.0 / n))


@pytest.mark.parametrize("n", [1_000, 2_000_000])
def test_uniform_mean_variance_fit_and_53_bits(n):
    u = SecretRandom().uniform(n)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert _within(u.mean(), 0.5, math.sqrt(1 / 12 / n))
    assert _within(u.var(), 1 / 12, math.sqrt((1 / 80 - 1 / 144) / n))  # mu4 = 1/80
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    bits = (u * 2.0**53).astype(np.uint64)
    assert np.array_equal(bits.astype(np.float64), u * 2.0**53)  # on the 2^-53 grid
    for bit in (0, 26, 52):  # lowest, middle, highest of the 53 bits: each fair
        ones = ((bits >> np.uint64(bit)) & np.uint64(1)).sum()
        assert _within(ones / n, 0.5, math.sqrt(0.25 / n))


@pytest.mark.parametrize("p", [0.0, 1e-3, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("n", [10, 1_000_003])
def test_bernoulli_rate(p, n):
    hits = int(SecretRandom().bernoulli(p, n).sum())
    assert stats.binomtest(hits, n, p).pvalue > P_MIN  # exact binomial test (p = 0, 1: exact)


@pytest.mark.parametrize("std", [1.0, 0.01, 2.5])
@pytest.mark.parametrize("n", [1_001, 2_000_001])
def test_normal_and_gaussian_moments_and_fit(std, n):
    rng = SecretRandom()
    for sample, scale in ((rng.standard_normal(n), 1.0), (rng.gaussian(n, std), std)):
        assert _within(sample.mean(), 0.0, scale / math.sqrt(n))
        assert _within(sample.var(), scale**2, math.sqrt(2 * scale**4 / n))  # mu4 = 3 sigma^4
        assert stats.kstest(sample, "norm", args=(0.0, scale)).pvalue > P_MIN


def _discrete_laplace_pmf(scale: float, k: np.ndarray) -> np.ndarray:
    a = math.exp(-1 / scale)
    return (1 - a) / (1 + a) * a ** np.abs(k)


@pytest.mark.parametrize("scale", [0.5, 3.0, 40.0])
@pytest.mark.parametrize("n", [1_000, 1_000_000])
def test_discrete_laplace_moments_and_fit(scale, n):
    sample = SecretRandom().discrete_laplace(n, scale)
    a = math.exp(-1 / scale)
    variance = 2 * a / (1 - a) ** 2
    support = np.arange(-int(80 * scale) - 50, int(80 * scale) + 51)  # tail beyond: < e^-80
    fourth = float((support.astype(float) ** 4 * _discrete_laplace_pmf(scale, support)).sum())
    assert _within(sample.mean(), 0.0, math.sqrt(variance / n))
    assert _within((sample.astype(float) ** 2).mean(), variance, math.sqrt((fourth - variance**2) / n))
    # Chi-square over the central values with expected count >= 5 plus the two tails.
    pmf = _discrete_laplace_pmf(scale, support)
    central = support[pmf * n >= 5]
    if len(central) < 2:
        return
    low, high = central[0], central[-1]
    observed = [np.sum(sample < low)] + [np.sum(sample == k) for k in central] + [np.sum(sample > high)]
    tail = (1 - pmf[(support >= low) & (support <= high)].sum()) / 2
    expected = np.array([tail] + list(_discrete_laplace_pmf(scale, central)) + [tail]) * n
    assert stats.chisquare(observed, expected).pvalue > P_MIN


@pytest.mark.parametrize("grid", [2.0**-7, 2.0**-20, 1.0, 8.0])
def test_laplace_location_attack_sees_only_grid_multiples(grid):
    """Mironov's attack reads the input from which floats ``x + noise`` can reach.

    Here two neighbouring inputs x0, x1 on a power-of-two grid g are released as
    g * (x / g + K), K discrete Laplace: every output is an exact multiple of g, so the
    attacker's membership test "could y have come from x?" accepts both inputs for every
    output, and the low-order mantissa bits are zero for both: nothing to read.
    """
    rng, n = SecretRandom(), 200_000
    x0, x1 = 37 * grid, 38 * grid
    outputs = {x: grid * (round(x / grid) + rng.discrete_laplace(n, 4.0)) for x in (x0, x1)}
    for y in outputs.values():
        for x in (x0, x1):
            steps = (y - x) / grid
            assert np.array_equal(steps, np.round(steps))  # possible under both inputs
        low_bits = y.view(np.uint64) & np.uint64(0xFFFF)
        assert not low_bits.any()
    # The noise still hides the shift: the outputs' distributions overlap almost entirely.
    shared = np.intersect1d(np.unique(outputs[x0]), np.unique(outputs[x1]))
    assert len(shared) > 0.8 * min(len(np.unique(outputs[x0])), len(np.unique(outputs[x1])))


def test_below_is_in_range_and_rejects_the_biased_remainder():
    rng = SecretRandom()
    bounds = np.array([1, 2, 3, 2**63 + 1] * 1000, dtype=np.uint64)
    start = rng.position
    values = rng.below(bounds)
    assert (values < bounds).all() and (values[bounds == 1] == 0).all()
    assert rng.position > start + 8 * len(bounds)  # ~half of the 2^63 + 1 draws were redrawn


def test_choice_without_replacement_edges():
    rng = SecretRandom()
    items = [object() for _ in range(6)]
    assert rng.choice_without_replacement(items, 0) == []
    full = rng.choice_without_replacement(items, 6)
    assert sorted(map(id, full)) == sorted(map(id, items))
    big = rng.choice_without_replacement(range(100_000), 50)
    assert len(set(big)) == 50 and all(0 <= b < 100_000 for b in big)


def test_choice_without_replacement_is_uniform_over_subsets():
    """All C(7, 3) = 35 subsets equally likely: chi-square with 34 df, 2000 expected each."""
    rng, items, k, per_subset = SecretRandom(), "abcdefg", 3, 2_000
    subsets = math.comb(len(items), k)
    counts: dict[frozenset, int] = {}
    for _ in range(subsets * per_subset):
        pick = frozenset(rng.choice_without_replacement(items, k))
        counts[pick] = counts.get(pick, 0) + 1
    assert len(counts) == subsets and all(len(s) == k for s in counts)
    assert stats.chisquare(list(counts.values())).pvalue > P_MIN


def test_normals_are_the_textbook_polar_method_on_the_keystream():
    """standard_normal is Marsaglia's polar method written out plainly, on the same keystream.

    One pass of c = int(1.3 * 500) + 32 candidates for 1,000 normals (500 pairs): U = the first c
    words >> 11 (signed), V = the next c, u = U 2^-52; pairs with 0 < s = u^2 + v^2 < 1 are kept
    in order, u * sqrt(-2 ln s / s) fills the front half, v * sqrt(-2 ln s / s) the back. The
    implementation's scaling (in units of 2^-52, the 2^-52 put inside the root) must give the
    same pairs and the same values (a fixed debug key: the pass has enough pairs).
    """
    pairs, candidates = 500, int(1.3 * 500) + 32
    words = SecretRandom.from_debug_key("polar").random_bytes(16 * candidates).view("<i8") >> 11
    u, v = words[:candidates] * 2.0**-52, words[candidates:] * 2.0**-52
    s = u * u + v * v
    keep = (s > 0) & (s < 1)
    assert keep.sum() >= pairs
    u, v, s = u[keep][:pairs], v[keep][:pairs], s[keep][:pairs]
    factor = np.sqrt(-2.0 * np.log(s) / s)
    expected = np.concatenate([u * factor, v * factor])
    ours = SecretRandom.from_debug_key("polar").standard_normal(2 * pairs)
    np.testing.assert_allclose(ours, expected, rtol=4e-16, atol=0)


def test_gaussian_is_the_sum_of_four_standard_normals_times_std_over_two():
    """gaussian(n, std) = (z1 + z2 + z3 + z4) * std / 2 with z = the same stream's 4n normals in four rows."""
    for n in (1, 7, 3000):
        z = SecretRandom.from_debug_key("sum").standard_normal(4 * n).reshape(4, n)
        ours = SecretRandom.from_debug_key("sum").gaussian(n, 1.5)
        assert np.array_equal(ours, (z[0] + z[1] + z[2] + z[3]) * 0.75)


def test_gaussian_larger_than_one_block_keeps_the_distribution():
    """Coordinates across GAUSSIAN_BLOCK boundaries: mean, variance and fit of each block-sized slice."""
    from common.privacy.secret_random import GAUSSIAN_BLOCK

    n = 3 * GAUSSIAN_BLOCK + 5
    sample = SecretRandom().gaussian(n, 2.0)
    for part in (sample[:GAUSSIAN_BLOCK], sample[GAUSSIAN_BLOCK : 2 * GAUSSIAN_BLOCK], sample[-GAUSSIAN_BLOCK:], sample):
        assert _within(part.mean(), 0.0, 2.0 / math.sqrt(len(part)))
        assert _within(part.var(), 4.0, math.sqrt(2 * 16.0 / len(part)))
        assert stats.kstest(part, "norm", args=(0.0, 2.0)).pvalue > P_MIN


def test_concurrent_draws_in_threads_are_the_sequential_draws():
    """The sampler's working arrays are per thread: two threads drawing at once get what each stream gives alone."""
    import threading

    sizes = (3, 5000, 70_001)

    def draws(key: str) -> list[np.ndarray]:
        rng = SecretRandom.from_debug_key(key)
        return [rng.gaussian(n, 1.0) for n in sizes] + [rng.standard_normal(n) for n in sizes]

    expected = {key: draws(key) for key in ("a", "b")}
    got: dict[str, list[np.ndarray]] = {}

    def draw(key: str) -> None:
        got[key] = draws(key)

    threads = [threading.Thread(target=draw, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in ("a", "b"):
        assert all(np.array_equal(x, y) for x, y in zip(got[key], expected[key]))


def test_draws_are_fresh_arrays_not_views_of_working_memory():
    """What a draw returns is its own: later draws (which reuse the sampler's working arrays) leave it alone."""
    rng = SecretRandom()
    first, normals = rng.gaussian((30, 40), 1.0), rng.standard_normal(1001)
    kept = first.copy(), normals.copy()
    later = [rng.gaussian(n, 1.0) for n in (1200, 30_000)] + [rng.standard_normal(5000)]
    assert np.array_equal(first, kept[0]) and np.array_equal(normals, kept[1])
    assert not any(np.shares_memory(a, b) for a in (first, normals) for b in later)
