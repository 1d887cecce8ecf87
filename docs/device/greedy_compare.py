"""Greedy decoding of one prompt on several artifacts (placements of the same graphs): how many tokens each shares
with the first, and the largest logits difference over those. Usage: greedy_compare.py TOKENS ARTIFACT ARTIFACT..."""
import json
import sys

import numpy as np

from runtime.generate import Generator

count, artifacts = int(sys.argv[1]), sys.argv[2:]
runs = []
for artifact in artifacts:
    gen = Generator.load(artifact)
    logits = [gen.engine.forward(0, gen.tokenizer.encode("Write a Python function that checks whether a number is prime."))]
    tokens = []
    for _ in range(count):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(gen.engine.forward(0, [tokens[-1]]))
    runs.append((tokens, logits))
    del gen
reference_tokens, reference_logits = runs[0]
for artifact, (tokens, logits) in zip(artifacts[1:], runs[1:]):
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), count)
    print(json.dumps({"artifact": artifact, "reference": artifacts[0], "greedy_tokens_equal": same, "of": count,
                      "max_abs_logits_difference": max(float(np.abs(logits[i] - reference_logits[i]).max()) for i in range(same + 1)),
                      "max_abs_logit": float(np.abs(reference_logits[0]).max())}))
