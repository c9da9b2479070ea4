"""Where a search request's time goes: py-spy's raw samples of the server, by stage.

Reads the collapsed stacks ``py-spy record --format raw`` writes (one ``frame;frame;... count``
per line, idle threads left out) and charges each sample to waiting when its innermost
frame waits, else to the first stage of ``STAGES`` with a marker in its stack.
``serve_load.py --profile`` records and calls it.

Run:  python benchmarks/profile_breakdown.py PROFILE.txt
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

#: (stage, markers), in order of precedence.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("catch up: replay the changes log / rebuild", ("_catch_up", "_replay", "_rebuild")),
    ("FAISS search", ("VectorGroup.search", "Index.search", "replacement_search",
                      "_search_flat_with_dead", "_search_live")),
    ("exact rescoring", ("exact_scores",)),
    ("hits' metadata (SQLite read)", ("fetch_hits",)),
    ("collection state (token check, SQLite read)", ("SearchCache.state", "_db_state")),
    ("collection / version lookups (SQLite)", ("get_collection", "search_batch",
                                               "IndexStore.collection")),
    ("batcher (gather, hand-off)", ("SearchBatcher",)),
    ("serialisation of the response", ("to_response", "serialize_response", "jsonable_encoder",
                                       "search_response", "JSONResponse", "dumps")),
    ("request validation", ("request_body_to_args", "_validate", "validate_json",
                            "solve_dependencies", "validate_python")),
    ("HTTP, ASGI and middleware", ("uvicorn", "h11", "starlette", "fastapi", "asyncio",
                                   "anyio", "compatkit/index/service")),
)


def breakdown(profile: Path) -> list[tuple[str, int, float]]:
    """(stage, samples, share) for the samples in ``profile``, largest first."""
    counts: Counter[str] = Counter()
    for line in profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")[::-1]
        counts[_stage(frames)] += int(n)
    total = sum(counts.values()) or 1
    return [(stage, n, n / total) for stage, n in counts.most_common()]


#: Innermost frames of a thread that waits (thread-pool queue, epoll, a lock), not works.
WAITING = ("Condition.wait", "EpollSelector.select", "Event.wait", "Lock.acquire")


def _stage(frames: list[str]) -> str:
    if any(w in frames[0] for w in WAITING):
        return "waiting (thread-pool queue, epoll, locks)"
    for stage, markers in STAGES:
        for frame in frames:
            if any(m in frame for m in markers):
                return stage
    return "other (threads, GC, imports)"


def print_breakdown(profile: Path) -> None:
    """Print the breakdown of ``profile`` as a Markdown table."""
    rows = breakdown(profile)
    print(f"\n| stage (py-spy samples of the server, {sum(r[1] for r in rows)} in all) | "
          "samples | share |")
    print("|---|---:|---:|")
    for stage, n, share in rows:
        print(f"| {stage} | {n} | {100 * share:.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    print_breakdown(p.parse_args().profile)


if __name__ == "__main__":
    main()
