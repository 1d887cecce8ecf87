"""Prefill on another EP against the same graphs on the CPU EP alone: logits over a prompt and greedy tokens.

python docs/device/phase_check.py PHASED PLAIN [PROMPT_TOKENS]: PHASED's roles have prefill chains, PLAIN is the
same artifact without them. Prints the logits' max abs difference over every prompt position, the argmax agreement
there, and each one's greedy continuation.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from runtime.engine import Engine
from runtime.tokenizer import Tokenizer


def main(phased: str, plain: str, count: int = 1024) -> None:
    tokenizer = Tokenizer.from_dir(plain)
    ids = (tokenizer.encode(open(__file__).read()) * count)[:count]
    results = {}
    for name in (phased, plain):
        engine = Engine(name)
        start = time.perf_counter()
        logits = engine.forward(0, ids, all_logits=True)
        prefill = time.perf_counter() - start
        tokens = [int(np.argmax(logits[-1]))]
        for _ in range(15):
            tokens.append(int(np.argmax(engine.forward(0, tokens[-1:]))))
        results[name] = logits, tokens
        print(f"{name}: prefill of {count} tokens {prefill:.2f} s; greedy {tokens}; "
              f"{', '.join(sorted({p.resolved + (' ' + p.phase if p.phase else '') for p in engine.placements}))}")
        del engine
    (a, ta), (b, tb) = results.values()
    print(f"logits over {count} positions: max abs difference {np.abs(a - b).max():.4g} (largest |logit| {np.abs(b).max():.4g}), "
          f"argmax agreement {np.mean(a.argmax(-1) == b.argmax(-1)):.2%}; greedy tokens equal for {next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))} of {len(ta)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
