"""Content hashes: the function that turns a feature's bytes into its item hash
(names: vocab.HASHES).

SGLang hashes with sha256 and keeps the first 8 bytes as a big-endian int
(`mm_utils.data_hash`). mmdiag's `xxh3` is xxh3_128 from the `xxhash` package, cut
the same way (first 8 digest bytes), so a hash stays a content address of the same
width: equal bytes give equal hashes in every process, different bytes differ, and
repeated images keep sharing prefix-cache entries, at memory speed instead of
sha256's 0.5-0.8 GB/s. The hash a process uses is process-wide, as SGLang's
module-level `data_hash` is: a replay rank and the tokenizer stage pick it once
with `use()`.
"""
from __future__ import annotations

import hashlib
from typing import Callable

from ..errors import MmdiagError
from ..vocab import DEFAULT_HASH, HASHES


def _sha256(data) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], byteorder="big", signed=False)


def _xxh3(data) -> int:
    import xxhash  # a real dependency; imported here so `mmdiag --help` stays light
    return int.from_bytes(xxhash.xxh3_128(data).digest()[:8], byteorder="big", signed=False)


FUNCTIONS: dict[str, Callable[[object], int]] = {"sha256": _sha256, "xxh3": _xxh3}
assert tuple(FUNCTIONS) == HASHES, "hash functions and vocabulary disagree"

# How a tensor's bytes reach the hash where no release says otherwise. sha256 as 0.5.4-0.5.9
# feed it: flatten, concatenate and copy through .tobytes() (two copies of every feature, page
# faults included; 0.5.10+ feed it a zero-copy uint8 view: `use(..., in_place=True)`); xxh3 as
# mmdiag's patch feeds it on every release: a zero-copy view.
ZERO_COPY = {"sha256": False, "xxh3": True}
assert tuple(ZERO_COPY) == HASHES

# What each hash keeps of the prefix cache, for recommend and the report. A random hash
# (SGLANG_MM_SKIP_COMPUTE_HASH) is not a content hash: repeated images stop matching.
PREFIX_CACHE = {"sha256": "content hash kept", "xxh3": "content hash kept", "random": "random: repeated images miss"}


def prefix_cache(name: str | None = None, skip: bool = False) -> str:
    """A configuration's prefix-cache property: `content hash kept (xxh3)`, or random where
    SGLANG_MM_SKIP_COMPUTE_HASH (replay --skip-hash) draws the hashes."""
    if skip:
        return PREFIX_CACHE["random"]
    return f"{PREFIX_CACHE[name or DEFAULT_HASH]} ({name or DEFAULT_HASH})"


def prefix_cache_of(config) -> str | None:
    """The same for a Run's replay config (its `hash`, `skip_hash`); None where it is not a replay's."""
    if config is None or not hasattr(config, "skip_hash"):
        return None
    return prefix_cache(config.setting("hash"), bool(config.skip_hash))

# Each hash as an incremental hasher (module, constructor): objects with update() and
# digest(), whose first 8 digest bytes are the hash. `mmdiag apply NAME` puts NAME's in place
# of sha256 where an SGLang install hashes; SGLang's own (the default) needs no patch.
HASHERS = {"sha256": ("hashlib", "sha256"), "xxh3": ("xxhash", "xxh3_128")}
assert tuple(HASHERS) == HASHES, "hashers and vocabulary disagree"
PATCHABLE = tuple(h for h in HASHES if h != DEFAULT_HASH)

_current = DEFAULT_HASH
_in_place = ZERO_COPY[DEFAULT_HASH]


def check(name: str, where: str = "--hash") -> str:
    if name not in FUNCTIONS:
        raise MmdiagError(f"unknown content hash {name!r}", where=where, fix=f"choose from: {', '.join(HASHES)}")
    module = HASHERS[name][0]
    try:
        __import__(module)
    except ImportError:
        raise MmdiagError(f"the {name} content hash needs the {module} package, which this Python cannot import",
                          where=where, fix=f"pip install {module}, or use --hash {DEFAULT_HASH}") from None
    return name


def use(name: str, in_place: bool = False) -> None:
    """Make `name` this process's content hash (every data_hash after this uses it); in_place:
    the release hashes a feature where it lies (sglang.facts.hashes_in_place)."""
    global _current, _in_place
    _current = check(name)
    _in_place = ZERO_COPY[name] or in_place


def current() -> str:
    return _current


def zero_copy() -> bool:
    return _in_place


def data_hash(data) -> int:
    """The 64-bit content hash of a bytes-like object, by this process's hash."""
    return FUNCTIONS[_current](data)
