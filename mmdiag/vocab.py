"""The one vocabulary of mmdiag: phase and strategy names.

Every collector (replay, live profile), analysis, patch and renderer uses these
names and no others, so a live profile and a replay compare key for key.
"""
from __future__ import annotations

# Scheduler-side phases of one rank, in the order a request meets them.
#   recv       recv_requests: the entry rank's intake plus the broadcast_pyobj that
#              every SGLang version uses to hand each request (mm_inputs included)
#              to all TP ranks. Baseline transport, present in every strategy.
#   from_dict  MultimodalInputs materialization: validation + sha256 feature hashing.
#   pickle     serializing mm inputs for the strategy's own collective(s).
#   broadcast  waiting in the strategy's own collective(s) (broadcast_object_list).
#   unpickle   deserializing what that collective delivered.
CONTRACT_PHASES = ("recv", "from_dict", "pickle", "broadcast", "unpickle")

# Extra phases the replay measures (the live profiler maps to these too).
#   forward    the per-iteration model step stand-in (sleep + tiny all_reduce sync).
#   other      scheduler work outside the phases above.
#   idle       waiting for the next arrival with nothing to do.
PHASES = CONTRACT_PHASES + ("forward", "other", "idle")

# Phases the shared-memory transport adds on every rank (SGLang 0.5.10+'s path; the
# live profiler maps the real frames to them):
#   shm_open   opening each feature's segment (ShmPointerMMData's handle -> fd)
#   shm_sync   the barrier until every rank has opened, and the all_reduce(MAX) that
#              makes every rank reject the same failed requests (_finalize_shm_features)
#   shm_map    mapping the pages copy-on-write, or copying them out (0.5.10 .. 0.5.20's clone),
#              and unlinking the segment (materialize)
SHM_PHASES = ("shm_open", "shm_sync", "shm_map")
PHASES = PHASES + SHM_PHASES

# Time spent before the scheduler (the tokenizer manager): the precompute strategy
# moves hashing there. Reported separately, never folded into a scheduler phase.
# The shared-memory transport's write of each feature into its segment (tokenizer_shm)
# is tokenizer-side too.
TOKENIZER_PHASES = ("tokenizer_hash", "tokenizer_shm")

# The server as a pipeline of stages (a live profile's `stages[]`, mmdiag.live.stages):
#   tokenizer  the server's main process (TokenizerManager), its tokenizer_worker processes
#              and the hash pool's threads (0.5.21+): tokenizer_hash, tokenizer_shm,
#              other (the rest of its preprocessing: processor, tokenizing, sending) and
#              idle (waiting for work in its event loop or pool queue)
#   scheduler  the scheduler loop: the TP ranks, in PHASES
STAGES = ("tokenizer", "scheduler")
STAGE_PHASES = {"tokenizer": TOKENIZER_PHASES + ("other", "idle"), "scheduler": PHASES}

# How feature bytes reach the TP ranks:
#   pickle  inside the recv broadcast (broadcast_pyobj pickles every request), SGLang <= 0.5.9
#   shm     written once into a POSIX shared segment by the tokenizer; the recv broadcast
#           carries a handle (name, shape, dtype), every rank maps the pages (0.5.10+)
TRANSPORT_PICKLE = "pickle"   # also a phase's name (CONTRACT_PHASES): say which with the constant
TRANSPORT_SHM = "shm"         # also a strategy's name (STRATEGY_SHM): say which with the constant
TRANSPORTS = (TRANSPORT_PICKLE, TRANSPORT_SHM)
# How a rank takes a feature out of the release's segment: clone (a copy per rank, 0.5.10 ..
# 0.5.20) or cow (a copy-on-write map, 0.5.21+).
SHM_MAPS = ("clone", "cow")

# Content hashes: what turns a feature's bytes into its item hash (mmdiag.mmpath.hashing).
#   sha256  SGLang's (every release 0.5.4-0.5.23), 0.5-0.8 GB/s on these CPUs
#   xxh3    xxh3_128 (the xxhash package), memory speed; a content hash all the same
HASHES = ("sha256", "xxh3")
DEFAULT_HASH = "sha256"

# How the shm transport's writer gets a segment for each feature (mmdiag.mmpath.shm):
#   fresh  a new segment per feature, as every release 0.5.10-0.5.23 writes them (page faults)
#   pool   reused, pre-faulted segments, released when every rank has let go (mmdiag's remedy)
SEGMENTS_FRESH, SEGMENTS_POOL = "fresh", "pool"
SEGMENTS = (SEGMENTS_FRESH, SEGMENTS_POOL)
DEFAULT_SEGMENTS = SEGMENTS_FRESH
# `mmdiag apply pool` (SEGMENTS_POOL) patches the pool into a release's own writer (0.5.10+):
# mmdiag.sglang.patches.pool; it stacks on a strategy and a content hash.

# The replay's axes with a setting: each is a `mmdiag replay` option of the same name
# (mmdiag.replay.options), recorded in a Run's config under that name, and compared when Runs
# merge; the value is what a Run written before the axis existed ran.
AXES = {"hash": DEFAULT_HASH, "segments": DEFAULT_SEGMENTS}

# Strategy names, in the order they are shown. Descriptions live with each
# strategy module (mmdiag.strategies); this tuple is the canonical order.
STRATEGIES = ("revert", "commit", "dict", "batch", "precompute", "async", "cond", "dict_async", "shm")
# The names other floors have to spell (release steps, patches): bound here, read there.
# Code that asks what a strategy does reads its properties (mmdiag.strategies.base.Strategy:
# hashes_in_tokenizer, transport, cost_class), never a list of these.
STRATEGY_REVERT, STRATEGY_PRECOMPUTE, STRATEGY_SHM = "revert", "precompute", "shm"

# Which of them `mmdiag apply` can patch in is said by each strategy's module (its `patch`):
# mmdiag.strategies.PATCHABLE.

# /2: each rank's collector fields in a typed part (`replay` / `profile`), a profile's
# collection under `live`, no stored findings; /1 Runs are read and converted (mmdiag.run).
REPLAY_SCHEMA = "mmdiag.replay/2"
PROFILE_SCHEMA = "mmdiag.profile/2"
TRACE_SCHEMA = "mmdiag.trace/1"

# Process titles: SGLang's scheduler ranks and mmdiag's replay ranks. The live
# profiler discovers ranks by these prefixes.
SGLANG_SCHEDULER_TITLE = "sglang::scheduler"
# The tokenizer side: with --tokenizer-worker-num > 1, workers titled
# sglang::tokenizer_worker:{pid}; else the server's main process is the TokenizerManager.
SGLANG_TOKENIZER_WORKER_TITLE = "sglang::tokenizer_worker"
REPLAY_RANK_TITLE = "mmdiag::scheduler"
