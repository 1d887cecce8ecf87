"""Where a decode step of a split artifact goes (`python3 docs/device/split_profile.py DIR [THREADS] [own]`): per
step, the wall time, the time inside each EP's session runs, and the rest (our loop and the host copies of the
hidden state). THREADS: the intra-op pool (0: one per core); `own`: every session its own pool, with spinning off,
instead of the process-wide pool the commands use. One configuration per process (the shared pool is for good)."""
from __future__ import annotations

import sys
import time

import numpy as np

from runtime.engine import Engine
from runtime.providers import share_threads

STEPS = 48


def main(directory: str, threads: int = 0, own: bool = False) -> None:
    if own:
        import runtime.providers as providers

        base = providers.session_options

        def no_spin(count: int, provider: str):
            options = base(count, provider)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return options

        providers.session_options = no_spin
    else:
        share_threads(threads)
    engine = Engine(directory, slots=1, threads=threads)
    token = int(np.argmax(engine.forward(0, list(range(100, 132)))))
    for _ in range(4):
        token = int(np.argmax(engine.forward(0, [token])))
    before = {id(g): g.seconds for g in engine.graphs}
    start = time.perf_counter()
    for _ in range(STEPS):
        token = int(np.argmax(engine.forward(0, [token])))
    wall = (time.perf_counter() - start) / STEPS
    by: dict[str, float] = {}
    for g in engine.graphs:
        kind = "+".join(sorted({b.split(".")[0] for b in g.spec.blocks}))
        key = f"{kind} on {g.placement.provider}"
        by[key] = by.get(key, 0.0) + (g.seconds - before[id(g)]) / STEPS
    inside = sum(by.values())
    parts = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(by.items()))
    print(f"{directory} threads={threads} {'own pools, no spinning' if own else 'shared pool'}: "
          f"{wall * 1e3:.2f} ms a step ({1 / wall:.1f} tok/s): {parts}, outside the runs {(wall - inside) * 1e3:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, len(sys.argv) > 3 and sys.argv[3] == "own")
