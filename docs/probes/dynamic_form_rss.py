"""    python docs/probes/dynamic_form_rss.py ARTIFACT COPY

Runtime peak RSS (verify's probe: load, a 256-token prompt, 16 tokens) of an artifact as compiled (the CPU
runs a static graph's phases on one session of its dynamic form) and of a copy whose manifest names no dynamic
forms (a session per fixed form, as before)."""
import shutil, sys
from pathlib import Path
import yaml
from compiler.runtime_runs import runtime_peak_rss

artifact, copy = Path(sys.argv[1]), Path(sys.argv[2])
if not copy.exists():
    shutil.copytree(artifact, copy)
    m = yaml.safe_load((copy / "manifest.yaml").read_text())
    for g in m["graphs"]:
        g.pop("dynamic", None)
    (copy / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
for name, d in (("dynamic form, one session", artifact), ("fixed forms, two sessions", copy), ("dynamic form, one session", artifact)):
    print(f"{name}: {runtime_peak_rss(d) / 2**20:.0f} MiB", flush=True)
