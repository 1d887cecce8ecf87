"""What an artifact's peak RSS is made of: the process's RSS (and peak) after each stage of loading and running it
on the CPU EP, 2 threads, in the order the runtime loads it: the runtime imported, the tokenizer loaded, the engine
loaded, a 36-token prompt, a long prompt, decode steps. With --engine-first, the engine is loaded before the
tokenizer (the order before 2026-11-29). BENCHMARKS.md's peak-RSS breakdown.

    python docs/probes/rss_stages.py ARTIFACT [LONG_PROMPT_TOKENS] [--engine-first]    (default 4000)
"""
import sys


def rss() -> str:
    status = open("/proc/self/status").read()
    now, peak = (int(status.split(f"{key}:")[1].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))
    return f"{now} MiB (peak {peak} MiB)"


print("start", rss())
from runtime.providers import share_threads  # noqa: E402

share_threads(2)
from runtime.engine import Engine  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

print("runtime imported", rss())
args = [a for a in sys.argv[1:] if a != "--engine-first"]
stages = ["engine", "tokenizer"] if "--engine-first" in sys.argv else ["tokenizer", "engine"]
for stage in stages:
    if stage == "tokenizer":
        Tokenizer.from_dir(args[0])
    else:
        engine = Engine(args[0], slots=1, threads=2)
    print(f"{stage} loaded", rss())
engine.forward(0, list(range(100, 136)))
print("36-token prompt", rss())
engine.reset(0)
long = int(args[1]) if len(args) > 1 else 4000
engine.forward(0, [100 + i % 1000 for i in range(long)])
print(f"{long}-token prompt", rss())
for _ in range(8):
    engine.forward(0, [5])
print("8 decode steps", rss())
