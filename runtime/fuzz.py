"""`tandem fuzz`: schemathesis generates requests from the server's own OpenAPI schema, valid and not.

Checks on every response: no 5xx (`not_a_server_error`), schema-invalid data is refused with a 4xx
(`negative_data_rejection`), and every error is in OpenAI's envelope (`openai_error_envelope`, below; schemathesis
loads this module through SCHEMATHESIS_HOOKS). Afterwards the server must still answer /health.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import schemathesis

from runtime.server_process import ServerProcess

KEY = "fuzz"
CHECKS = "not_a_server_error,negative_data_rejection,openai_error_envelope"


@schemathesis.check
def openai_error_envelope(ctx, response, case) -> None:
    """An error answer is {"error": {"message": non-empty, "type", "param", "code"}}."""
    if response.status_code < 400:
        return
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{response.status_code} without OpenAI's error envelope: {response.content[:200]!r}") from None
    if set(error) != {"message", "type", "param", "code"} or not error["message"]:
        raise AssertionError(f"malformed error envelope: {error}")


def fuzz(artifact: Path, max_examples: int, seconds: int, seed: int = 0, threads: int = 1) -> dict:
    """Fuzz a `tandem serve` of `artifact` within `max_examples` per operation and `seconds` overall.

    The server generates at most 32 tokens a request (more is a 400), so the budget goes to many requests rather
    than to a few long generations."""
    server = ServerProcess(artifact, "--api-key", KEY, "--threads", str(threads), "--max-tokens", "32")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--checks", CHECKS,
             "-H", f"Authorization: Bearer {KEY}", "--max-examples", str(max_examples), "--max-time", str(seconds),
             "--seed", str(seed), "--workers", "1", "--no-color"],
            capture_output=True, text=True, check=False, env={**os.environ, "SCHEMATHESIS_HOOKS": __name__},
        )
        alive = server.proc.poll() is None and server.request("GET", "/health")[0] == 200
    finally:
        server.stop()
    counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    return {
        "artifact": str(artifact), "max_examples": max_examples, "seconds_budget": seconds, "seed": seed,
        "generated": int(counts[1]) if counts else 0, "passed": int(counts[2]) if counts else 0,
        "schemathesis_exit": proc.returncode, "server_alive": alive,
        "output_tail": (proc.stdout + proc.stderr)[-4000:],
    }
