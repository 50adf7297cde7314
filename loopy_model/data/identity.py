"""Identity-aware selection: identity-disjoint train/val splits and identity-balanced epochs.

Both read ``identities.parquet`` at the dataset root (written by ``python jobs/identities.py DIR``:
one row per clip, ``key`` -> ``identity_id``, plus ``cluster_size`` and ``identity_model``, which
the loader does not need). Only the columns in ``IDENTITY_COLUMNS`` are read and checked.

Split (``split="train:0.02"`` / ``"val:0.02"``): identity ``i`` is on the val side iff
``u(i) < fraction``, ``u(i)`` = BLAKE2b-64(domain || int64 LE i), its top 53 bits as a number in
[0, 1). It depends on the identity id only (not on the seed, the selection or the machine), so
every clip of an identity is on one side, the val set is the same in every run, and a larger
fraction only adds identities to val (the val side of 0.01 is inside that of 0.02).

Balance (``balance="identity"``): an epoch is ``N`` draws, ``N`` = the number of selected clips
(so an epoch has as many steps as without balancing). Identity ``i`` with ``n_i`` selected clips
gets probability ``p_i ∝ n_i ** (1 / T)`` (``balance_temperature=T``; ``None`` = T -> infinity =
uniform over identities, T = 1 = the natural clip distribution). Its number of draws is
``N p_i`` rounded by systematic sampling (floor or ceil, exactly N in all, identities visited in
a random order), so identity frequencies are within one draw of their target in every epoch, not
only in expectation. The draws of an identity cycle through a random permutation of its clips
(each clip floor or ceil of ``draws / n_i`` times). Everything is seeded by (seed, epoch), so
the drawn multiset and then the order (partition.py, which takes repeated ids) are the same
in every process: resume, elasticity and the rank/worker split work unchanged.

Clips of the selection missing from identities.parquet (or with a null identity_id) are each
treated as an identity of their own (a singleton; for the split their key is hashed instead of
an id). The count is logged: re-run jobs/identities.py after adding clips.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter

import numpy as np
import pyarrow as pa

from .index import DatasetIndex
from .select import read_table

log = logging.getLogger(__name__)

IDENTITIES_FILE = "identities.parquet"
IDENTITY_COLUMNS = ("key", "identity_id")  # what the loader reads from IDENTITIES_FILE
BALANCE_MODES = ("identity",)
SPLIT_SIDES = ("train", "val")
_SPLIT_DOMAIN_ID = b"loopy-identity-split/id/"
_SPLIT_DOMAIN_KEY = b"loopy-identity-split/key/"
_SALT_BALANCE = 0x42414C41  # "BALA": the balanced draws' random stream, apart from the order's


# ---------------------------------------------------------------------------- options
def parse_split(split: str | None) -> tuple[str, float] | None:
    """``"val:0.02"`` -> ("val", 0.02); None -> None (no split)."""
    if split is None:
        return None
    side, sep, frac = str(split).partition(":")
    try:
        fraction = float(frac)
    except ValueError:
        fraction = float("nan")
    if not sep or side not in SPLIT_SIDES or not 0 < fraction < 1:
        raise ValueError(f"split={split!r}: expected 'train:FRACTION' or 'val:FRACTION' with 0 < FRACTION < 1 "
                         "(the fraction of identities held out for validation), e.g. 'train:0.02'")
    return side, fraction


def check_balance(balance: str | None, temperature: float | None) -> None:
    if balance is not None and balance not in BALANCE_MODES:
        raise ValueError(f"balance={balance!r}: expected None or one of {BALANCE_MODES}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"balance_temperature={temperature!r}: expected a finite T > 0 "
                         "(p(identity) ∝ clips ** (1/T)), or None for uniform over identities")
    if temperature is not None and balance is None:
        raise ValueError("balance_temperature needs balance='identity'")


# ---------------------------------------------------------------------------- the table
def sample_keys(index: DatasetIndex, gids: np.ndarray, why: str) -> list[str]:
    if any(s.keys is None for s in index.shards):
        raise ValueError(f"{index.uri}/index.json has shards without 'keys'; {why} needs them to join "
                         f"{index.uri}/{IDENTITIES_FILE}")
    every = [k for s in index.shards for k in s.keys]  # one list: key_of per sample is slow at millions
    return [every[g] for g in gids.tolist()]


def identity_groups(index: DatasetIndex, gids: np.ndarray, why: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(identity id, known, key) per selected gid, from ``IDENTITIES_FILE``.

    ``known`` is False for clips the table does not list (or lists with a null id); their id
    is meaningless and they count as singletons (module docstring).
    """
    path = f"{index.uri}/{IDENTITIES_FILE}"
    table = read_table(index.uri, IDENTITIES_FILE, index.storage_options)
    if table is None:
        raise ValueError(f"{why} needs {path}, which does not exist; make it with "
                         f"`python jobs/identities.py {index.uri}`")
    missing = [c for c in IDENTITY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing} (has {table.column_names}); "
                         f"re-run `python jobs/identities.py {index.uri}`")
    if not pa.types.is_integer(table.schema.field("identity_id").type):
        raise ValueError(f"{path}: identity_id is {table.schema.field('identity_id').type}, expected int64")
    listed = table["key"].to_pylist()
    if len(set(listed)) != len(listed):
        dup = [k for k, n in Counter(listed).items() if n > 1]
        raise ValueError(f"{path}: {len(dup)} keys listed more than once (a clip in two identities?), e.g. {dup[:3]}")
    ids = table["identity_id"].to_numpy(zero_copy_only=False)
    valid = table["identity_id"].is_valid().to_numpy(zero_copy_only=False)
    of_key = {k: int(i) for k, i, ok in zip(listed, ids, valid) if ok}
    keys = sample_keys(index, gids, why)
    known = np.array([k in of_key for k in keys], dtype=bool)
    identity = np.array([of_key.get(k, -1) for k in keys], dtype=np.int64)
    if not known.all():
        log.warning("%s: %d of %d selected clips are not in %s; each counts as its own identity "
                    "(re-run jobs/identities.py to cluster them)", index.uri, int((~known).sum()), len(gids), path)
    return identity, known, keys


def _unit_hash(data: bytes) -> float:
    """A stable hash in [0, 1): the top 53 bits of BLAKE2b-64 (little endian) / 2**53, exact in a
    float (never Python's hash(), which is salted per process)."""
    return (int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 11) / 2.0 ** 53


def identity_unit(identity_id: int) -> float:
    return _unit_hash(_SPLIT_DOMAIN_ID + int(identity_id).to_bytes(8, "little", signed=True))


def split_mask(identity: np.ndarray, known: np.ndarray, keys: list[str], side: str, fraction: float) -> np.ndarray:
    """True for the clips on ``side``: val iff the identity's unit hash < fraction."""
    unique, inverse = np.unique(identity[known], return_inverse=True)
    u = np.empty(len(identity))
    u[known] = np.array([identity_unit(i) for i in unique])[inverse] if len(unique) else []
    u[~known] = [_unit_hash(_SPLIT_DOMAIN_KEY + keys[j].encode()) for j in np.flatnonzero(~known)]
    val = u < fraction
    return val if side == "val" else ~val


def dense_groups(identity: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Identity ids -> 0..K-1; every unknown clip gets a group of its own."""
    group = np.empty(len(identity), dtype=np.int64)
    unique, inverse = np.unique(identity[known], return_inverse=True)
    group[known] = inverse
    group[~known] = len(unique) + np.arange(int((~known).sum()))
    return group


# ---------------------------------------------------------------------------- balanced epochs
def identity_probabilities(sizes: np.ndarray, temperature: float | None) -> np.ndarray:
    """p_i ∝ n_i ** (1/T); None = uniform (the T -> infinity limit)."""
    if temperature is None:
        return np.full(len(sizes), 1.0 / len(sizes))
    log_n = np.log(sizes.astype(np.float64))
    w = np.exp((log_n - log_n.max()) / temperature)  # n ** (1/T), scaled so that a small T cannot overflow
    return w / w.sum()


def systematic_counts(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Integers c_i in {floor(n p_i), ceil(n p_i)} summing to n (systematic resampling).

    Identities are laid out in a random order and one uniform offset picks the boundaries, so
    which identities get the ceil changes from epoch to epoch without bias.
    """
    order = rng.permutation(len(p))
    edges = np.floor(np.concatenate([[0.0], np.cumsum(p[order] * n)]) + rng.random())
    edges[-1] = n  # edges[0] is 0; the float cumsum may miss n by an ulp
    counts = np.empty(len(p), dtype=np.int64)
    counts[order] = np.diff(edges).astype(np.int64)
    return counts


class IdentityBalance:
    """The drawn multiset of clip ids of each epoch (module docstring)."""

    def __init__(self, gids: np.ndarray, group: np.ndarray, temperature: float | None):
        order = np.argsort(group, kind="stable")
        self.gids, self.group = gids[order], group[order]  # grouped by identity
        self.sizes = np.bincount(self.group)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.p = identity_probabilities(self.sizes, temperature)
        self.temperature, self.num_samples = temperature, len(gids)

    def counts(self, seed: int, epoch: int) -> np.ndarray:
        """Draws per identity (0..K-1) in this epoch."""
        return systematic_counts(self.p, self.num_samples, self._rng(seed, epoch))

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's ``N`` clip ids (with repeats), sorted; partition.py orders them."""
        rng = self._rng(seed, epoch)
        counts = systematic_counts(self.p, self.num_samples, rng)
        # a random permutation of the clips inside each identity, then cycle through it
        perm = np.lexsort((rng.random(len(self.gids)), self.group))
        group_of_draw = np.repeat(np.arange(len(counts)), counts)
        j = np.arange(len(group_of_draw)) - np.repeat(np.cumsum(counts) - counts, counts)
        picked = perm[self.starts[group_of_draw] + j % self.sizes[group_of_draw]]
        return np.sort(self.gids[picked])

    @staticmethod
    def _rng(seed: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, _SALT_BALANCE])

    def fingerprint_bytes(self) -> bytes:
        """What a resume must match: the grouping and the temperature (hashed into the fingerprint)."""
        t = -1.0 if self.temperature is None else float(self.temperature)
        return (b"balance=identity;" + np.float64(t).tobytes() + np.ascontiguousarray(self.gids, "<i8").tobytes()
                + np.ascontiguousarray(self.group, "<i8").tobytes())
