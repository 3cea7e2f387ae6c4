"""SecretRandom: the random source every DP guarantee of this app rests on.

Why: a DP mechanism is private only if the adversary cannot predict its noise (or its
sampling). Noise drawn from a generator seeded with the public run ``seed`` can be replayed
and subtracted, so its epsilon is infinite. Every draw a guarantee relies on (server noise,
client sampling, DP-SGD batches and noise, local-DP noise) comes from this class instead; the
run ``seed`` is kept for non-private things only (data split, model init, shuffles).

Generator: the keystream of AES-256 in CTR mode (``cryptography``, OpenSSL), keyed with 32
bytes from ``os.urandom`` on the machine that adds the noise. Block i of the keystream is
AES_k(i), i a 16-byte big-endian counter starting at 0 (a zero nonce is fine: a key serves one
stream). Without the key the keystream of a secure block cipher is indistinguishable from
uniform random bytes (AES as a pseudo-random permutation/function); the key never leaves the
machine, so nobody else can replay the draws. ``position`` counts the keystream bytes used, so
``state_dict``/``from_state_dict`` resume the same stream exactly (counter p // 16, drop
p % 16 bytes). The state holds the key: it is as secret as the unnoised aggregate it protects
(store it like that, never in a public file; pickling is refused for this reason).

Conversions (all vectorised): uniform = top 53 bits of a little-endian uint64 times 2^-53, in
[0, 1). Bernoulli(p) = uniform < p (P(True) = p rounded up to a multiple of 2^-53). Integers
below b by rejection (arc4random_uniform: reject r < 2^64 mod b, then r mod b): exactly
uniform. Normals by Marsaglia's polar method on pairs of signed 53-bit integers, i.e. uniforms on
the 2^-52 grid of [-1, 1) (exact in real arithmetic; ``_fill_normals`` states each step).

Floating-point attacks (Mironov 2012; Jin et al. 2022 on Gaussian samplers) read the input
from the low-order bits of ``x + noise`` because the float noise cannot reach every float.
* ``gaussian`` uses Opacus's secure_mode mitigation after Holohan & Braghin 2021 (section
  5.1): the sum of 4 independent N(0, std^2) draws divided by 2, still N(0, std^2), computed
  as (z1 + z2 + z3 + z4) * (std / 2) from 4 standard normals (the same value up to one
  rounding). By their and Opacus's analysis this raises the cost of the known attack from
  ~2^53 to ~2^159 (2^(p(2n-1)), p = 53 random bits per uniform, n = 2). It is a mitigation,
  not a proof of exact DP on floats. The sum is done in float64; a float32 tensor gets one
  final rounding of the result.
* ``discrete_laplace`` returns integers: noise added to a value on a grid g (as g * integer)
  gives an integer multiple of g, whose low-order bits carry nothing about the input. Floats
  remain only in the geometric inverse CDF G = floor(-scale * ln u), u on the 2^-53 grid of
  (0, 1]: each tail probability P(G >= k) is off by a few 2^-53 (grid, ln rounding), and G is
  cut at -scale * ln 2^-53 ~ 36.7 * scale. These distortions do not depend on the data; outside
  a tail of mass ~2^-53 / eta they move the probability ratio of neighbouring outputs by at
  most a factor e^eta (eta = 1e-3: tail ~1e-13), i.e. a negligible extra delta.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from typing import TYPE_CHECKING, Sequence, TypeVar

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
KEY_BYTES = 32
BLOCK = 16
CHUNK = 1 << 18  # keystream bytes per cipher call: stays in cache, ~4x faster than one big call
_ZEROS = bytes(CHUNK)
NORMAL_BLOCK = 1 << 16  # polar-method candidate pairs per pass (1 MiB of keystream): the fastest of 2^13..2^18
GAUSSIAN_BLOCK = 1 << 14  # coordinates per pass of ``gaussian``: 2^16 normals, one pass of <= NORMAL_BLOCK pairs


Size = int | Sequence[int]  # an array shape, or one dimension (NumPy's ``size``)

# The normal sampler's working arrays, kept per thread and grown on demand: fresh arrays of this size
# are page-faulted in on every call once the allocator has handed them back to the system, which cost
# 2-4x the arithmetic at 10^4-10^5 coordinates per call. Per thread, so concurrent draws never share
# one; they hold only the last pass's values, in this process's memory like the key itself.
_SCRATCH = threading.local()


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """This thread's working array ``name``: the first ``size`` elements of a buffer kept between calls."""
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=dtype)
        setattr(_SCRATCH, name, buffer)
    return buffer[:size]


def _count(size: Size) -> tuple[tuple[int, ...], int]:
    shape = tuple(int(s) for s in size) if isinstance(size, Sequence) else (int(size),)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in {size!r}")
    return shape, math.prod(shape)


class SecretRandom:
    """A CSPRNG stream (AES-256-CTR keyed from os.urandom) with the draws DP mechanisms need."""

    def __init__(self, key: bytes | None = None, position: int = 0, debug: bool = False):
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
        if int(position) < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self._key = key
        self._position = int(position)
        self.debug = bool(debug)
        block, skip = divmod(self._position, BLOCK)
        counter = (block % 2**128).to_bytes(BLOCK, "big")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._stream.update(bytes(skip))

    @classmethod
    def from_debug_key(cls, text: str) -> "SecretRandom":
        """A stream keyed by sha256(text): reproducible for debugging, NOT private (debug=True)."""
        return cls(hashlib.sha256(text.encode()).digest(), debug=True)

    @property
    def position(self) -> int:
        """Keystream bytes consumed so far."""
        return self._position

    def random_bytes(self, n: int) -> np.ndarray:
        """The next ``n`` keystream bytes (uint8), encrypted in cache-sized chunks into one buffer."""
        return self._keystream_into(np.empty(n + BLOCK, dtype=np.uint8), n)

    def _keystream_into(self, buffer: np.ndarray, n: int) -> np.ndarray:
        """The next ``n`` keystream bytes written to ``buffer`` (uint8, >= n + 16 bytes: update_into wants
        block - 1 spare bytes); returns ``buffer[:n]``."""
        zeros, target = memoryview(_ZEROS), buffer.data  # memoryviews: slicing them copies nothing
        for start in range(0, n, CHUNK):
            length = min(CHUNK, n - start)
            self._stream.update_into(zeros[:length], target[start : start + length + BLOCK - 1])
        self._position += n
        return buffer[:n]

    def _uint64(self, count: int) -> np.ndarray:
        return self.random_bytes(8 * count).view("<u8").astype(np.uint64, copy=False)

    def uniform(self, size: Size) -> np.ndarray:
        """float64 in [0, 1), each with 53 random bits: (r >> 11) * 2^-53."""
        shape, count = _count(size)
        words = self._uint64(count)
        np.right_shift(words, np.uint64(11), out=words)
        out = words.astype(np.float64)  # exact: < 2^53
        out *= 2.0**-53
        return out.reshape(shape)

    def bernoulli(self, p: float, size: Size) -> np.ndarray:
        """bool array with P(True) = p (to 2^-53), e.g. Poisson sampling of clients or examples."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        return self.uniform(size) < p

    def below(self, bounds) -> np.ndarray:
        """Independent exactly-uniform integers in [0, b) per bound b >= 1 (rejection sampling)."""
        bounds = np.asarray(bounds, dtype=np.uint64)
        if np.any(bounds == 0):
            raise ValueError("bounds must be >= 1")
        threshold = (~bounds + np.uint64(1)) % bounds  # 2^64 mod b
        out = self._uint64(bounds.size).reshape(bounds.shape)
        reject = out < threshold
        while reject.any():  # probability < b / 2^64 per draw
            out[reject] = self._uint64(int(reject.sum()))
            reject = out < threshold
        return out % bounds

    def choice_without_replacement(self, items: Sequence[T], k: int) -> list[T]:
        """A uniformly random k-subset of ``items`` (partial Fisher-Yates with exact integers)."""
        pool = list(items)
        if not 0 <= k <= len(pool):
            raise ValueError(f"k must be in [0, {len(pool)}], got {k}")
        offsets: np.ndarray | list[int] = self.below(np.arange(len(pool), len(pool) - k, -1)) if k else []
        for i, offset in enumerate(offsets):
            j = i + int(offset)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def _fill_normals(self, out: np.ndarray) -> None:
        """Fill the 1-D float64 ``out`` (even length) with N(0, 1) draws, Marsaglia's polar method.

        Candidate pairs (U, V): keystream words as little-endian signed int64, shifted right 11
        bits (arithmetic), i.e. integers uniform in [-2^52, 2^52) (a pass of c candidates reads
        16c bytes: the first c words are the U's, the next c the V's, paired in order); (u, v) =
        (U, V) * 2^-52 is uniform on the 2^-52 grid of the square [-1, 1)^2. A pair is kept if 0 < S = U^2 + V^2 < 2^104,
        i.e. 0 < s = u^2 + v^2 = S * 2^-104 < 1 (probability pi/4; the rejections depend only on
        the keystream, never on data); then u * sqrt(-2 ln s / s) and v * sqrt(-2 ln s / s) are
        independent N(0, 1), the first filling the front half of ``out``, the second the back.
        The scale 2^-52 is applied once, inside the square root: f = sqrt(-2^-103 ln(s) / s) =
        2^-52 sqrt(-2 ln s / s) and U * f = u * sqrt(-2 ln s / s), equal as floats too, since
        multiplying by a power of two (and taking the root of a power of four) is exact here.
        Box-Muller would need cos and sin (no SIMD float64 kernels in numpy, ~10 ns each).
        """
        pairs = len(out) // 2
        filled = 0
        while filled < pairs:  # blocks of <= NORMAL_BLOCK candidates: bounded temporaries, few Python calls
            need = pairs - filled
            candidates = min(int(1.3 * need) + 32, NORMAL_BLOCK)
            keystream = self._keystream_into(_scratch("keystream", 16 * candidates + BLOCK, np.uint8), 16 * candidates)
            words = keystream.view("<i8")
            np.right_shift(words, 11, out=words)  # U, V: integers in [-2^52, 2^52)
            uv = _scratch("uv", 2 * candidates, np.float64)
            uv[:] = words  # exact: |U| <= 2^52
            u, v = uv[:candidates], uv[candidates:]
            big_s = np.multiply(u, u, out=_scratch("big_s", candidates, np.float64))
            big_s += np.multiply(v, v, out=_scratch("v2", candidates, np.float64))  # S 2^-104 = u*u + v*v exactly
            keep_mask = np.less(big_s, 2.0**104, out=_scratch("keep", candidates, np.bool_))
            keep_mask &= np.greater(big_s, 0.0, out=_scratch("positive", candidates, np.bool_))
            keep = np.flatnonzero(keep_mask)[:need]
            kept = len(keep)
            s = big_s.take(keep, out=_scratch("s", kept, np.float64))
            s *= 2.0**-104  # exact: s = u^2 + v^2 in (0, 1)
            factor = np.log(s, out=_scratch("factor", kept, np.float64))
            factor *= -(2.0**-103)
            factor /= s
            np.sqrt(factor, out=factor)  # 2^-52 sqrt(-2 ln s / s)
            first, second = out[filled : filled + kept], out[pairs + filled : pairs + filled + kept]
            u.take(keep, out=first)
            first *= factor
            v.take(keep, out=second)
            second *= factor
            filled += kept

    def standard_normal(self, size: Size) -> np.ndarray:
        """float64 N(0, 1) by Marsaglia's polar method, both outputs of each pair used (:meth:`_fill_normals`)."""
        shape, count = _count(size)
        out = np.empty(count + count % 2)
        self._fill_normals(out)
        return out[:count].reshape(shape)

    def gaussian(self, shape: Size, std: float) -> np.ndarray:
        """float64 N(0, std^2) per coordinate as (z1 + z2 + z3 + z4) * (std / 2), zi ~ N(0, 1) (see module).

        z1..z4 are four independent standard normals (:meth:`_fill_normals`), so the sum is
        N(0, 4) and the result N(0, std^2); std / 2 is exact, so this equals (std z1 + ... + std z4) / 2
        up to one rounding. Drawn GAUSSIAN_BLOCK coordinates at a time (4x as many normals), the
        sum accumulated in place: the temporaries stay in cache whatever the size.
        """
        if not std >= 0.0:
            raise ValueError(f"std must be >= 0, got {std}")
        shape, count = _count(shape)
        if std == 0.0:
            return np.zeros(shape)
        out = np.empty(count)
        draws = _scratch("draws", 4 * min(count, GAUSSIAN_BLOCK), np.float64)
        for start in range(0, count, GAUSSIAN_BLOCK):
            n = min(GAUSSIAN_BLOCK, count - start)
            z = draws[: 4 * n]
            self._fill_normals(z)
            block = np.add(z[:n], z[n : 2 * n], out=out[start : start + n])
            block += z[2 * n : 3 * n]
            block += z[3 * n :]
            block *= std / 2.0
        return out.reshape(shape)

    def discrete_laplace(self, shape: Size, scale: float) -> np.ndarray:
        """int64 with P(k) ~ exp(-|k| / scale): G1 - G2, G geometric with P(G >= k) = exp(-k / scale)."""
        if not scale >= 0.0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        shape, count = _count(shape)
        if scale == 0.0:
            return np.zeros(shape, dtype=np.int64)
        u = 1.0 - self.uniform((2, count))  # (0, 1]
        geometric = np.floor(-scale * np.log(u)).astype(np.int64)
        return (geometric[0] - geometric[1]).reshape(shape)

    def torch_gaussian_like(self, reference: "torch.Tensor", std: float) -> "torch.Tensor":
        """``gaussian`` noise with the shape, dtype and device of ``reference``."""
        import torch

        noise = torch.from_numpy(self.gaussian(tuple(reference.shape), std))
        return noise.to(dtype=reference.dtype, device=reference.device)

    def state_dict(self) -> dict:
        """Plain JSON {"key", "position", "debug"}. SECRET: as secret as the unnoised aggregate."""
        return {"key": self._key.hex(), "position": self._position, "debug": self.debug}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SecretRandom":
        """Continue exactly the stream a ``state_dict`` was taken from."""
        return cls(bytes.fromhex(state["key"]), int(state["position"]), bool(state.get("debug", False)))

    def __reduce__(self):
        raise TypeError("SecretRandom holds a secret key and is never pickled; use state_dict() for secret storage")

    def __repr__(self) -> str:
        return f"SecretRandom(position={self._position}, debug={self.debug})"
