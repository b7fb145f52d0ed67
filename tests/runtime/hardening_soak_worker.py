"""One process of the soak test (tests/runtime/test_hardening_soak.py): loads one archive, as every worker of a
server does when they start together, then calls it from several threads with a mix of good and bad calls until
the time is up. Prints one JSON line: the counts, and every call that went wrong.

    python -m tests.runtime.hardening_soak_worker ARCHIVE EXPECTED.pt SECONDS THREADS
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time

import torch

import kernl


def bad_calls() -> list[dict]:
    """Calls every bundle of the soak must refuse, each with an InputError."""
    return [
        {"input_ids": torch.full((1, 5), -1)},
        {"input_ids": torch.full((2, 9), 99)},  # the vocabulary's size: one past its last id
        {"input_ids": torch.full((1, 3), 10**9)},
        {"input_ids": torch.ones(1, 5, dtype=torch.bool)},
        {"input_ids": torch.ones(1, 5, dtype=torch.uint8)},
        {"input_ids": torch.ones(1, 5, dtype=torch.long, device="meta")},
        {"input_ids": torch.ones(1, 5)},
        {"input_ids": torch.ones(9, 9, dtype=torch.long)},  # beyond every bucket
        {"input_ids": torch.ones(1, 5, dtype=torch.long), "labels": torch.ones(1, 5, dtype=torch.long)},
    ]


def main(archive: str, expected_path: str, seconds: float, threads: int) -> None:
    expected = torch.load(expected_path)  # [(inputs, last_hidden_state)]
    start = time.monotonic()
    bundle = kernl.load(archive)
    load_s = time.monotonic() - start
    bad = bad_calls()
    counts = {"good": 0, "bad": 0}
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def work(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                if rng.random() < 0.5:
                    inputs, want = rng.choice(expected)
                    got = bundle(**inputs).last_hidden_state
                    ok = got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
                    with lock:
                        counts["good"] += 1
                        if not ok:
                            problems.append(f"good call {tuple(inputs['input_ids'].shape)}: wrong output")
                else:
                    call = rng.choice(bad)
                    try:
                        bundle(**call)
                        with lock:
                            problems.append(f"bad call {sorted(call)} was accepted")
                    except kernl.InputError:
                        with lock:
                            counts["bad"] += 1
            except Exception as err:  # noqa: BLE001 - reported, so that the test names it
                with lock:
                    problems.append(f"{type(err).__name__}: {err}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps({**counts, "load_s": round(load_s, 3), "problems": problems[:20]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
