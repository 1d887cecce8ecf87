"""What an artifact's peak RSS is made of: the process's RSS (and peak) after each stage of loading and running it
on the CPU EP, 2 threads: the runtime imported, the engine loaded, a 36-token prompt, a long prompt, decode steps;
then the tokenizer loaded, twice. BENCHMARKS.md's peak-RSS breakdown.

    python docs/probes/rss_stages.py ARTIFACT [LONG_PROMPT_TOKENS]    (default 4000)
"""
import sys


def rss() -> str:
    status = open("/proc/self/status").read()
    now, peak = (int(status.split(f"{key}:")[1].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))
    return f"{now} MB (peak {peak} MB)"


print("start", rss())
from runtime.providers import share_threads  # noqa: E402

share_threads(2)
from runtime.engine import Engine  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

print("runtime imported", rss())
engine = Engine(sys.argv[1], slots=1, threads=2)
print("engine loaded", rss())
engine.forward(0, list(range(100, 136)))
print("36-token prompt", rss())
engine.reset(0)
long = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
engine.forward(0, [100 + i % 1000 for i in range(long)])
print(f"{long}-token prompt", rss())
for _ in range(8):
    engine.forward(0, [5])
print("8 decode steps", rss())
for load in ("tokenizer loaded", "tokenizer loaded again (as tandem bench did once per prompt length)"):
    Tokenizer.from_dir(sys.argv[1])
    print(load, rss())
