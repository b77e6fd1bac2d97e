"""What the VAE-specific RPCs cost, beside Encode and Decode of the same rows, measured side by side in one run.

    python -m bench.model_rpcs --model-dir models/vae-mnist               # ~2 min
    python -m bench.model_rpcs --model-dir DIR --seconds 0.3 --rounds 1    # the smoke run the tests do

One server (`python -m serving.server`, CPU provider); for each RPC, `--concurrency` closed-loop callers send
64-image requests (bench.loadgen) for `--seconds`; the RPCs run in a shuffled order, `--rounds` times, and
the median of the rounds is reported. Score is one encoder and one decoder pass plus the score arithmetic
(BCE, KL, DEFLATE): the `vs encode+decode` column is its time per request over Encode's plus Decode's, so 1.0
means the arithmetic is free. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
from pathlib import Path

from bench.loadgen import run_load
from bench.server_process import ServerProcess

RPCS = ("encode", "decode", "score", "score-iwae8", "reconstruct", "traverse", "interpolate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_rpcs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=64, help="images (or latents) per request (default 64)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop callers (default 4)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per RPC per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="shuffled rounds; the median is reported (default 3)")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {rpc: [] for rpc in RPCS}
    p50: dict[str, list[float]] = {rpc: [] for rpc in RPCS}
    order = list(RPCS)
    with ServerProcess.vae_server("--model-dir", str(args.model_dir), "--intra-op-threads", "2") as server:
        for round_ in range(args.rounds):
            random.Random(round_).shuffle(order)
            for rpc in order:
                result = asyncio.run(
                    run_load(server.target, rpc, args.rows, args.concurrency, args.seconds, None, 0.3, 60.0)
                )
                if result.errors:
                    print(f"error: {rpc}: {result.errors}", file=sys.stderr)
                    return 1
                rates[rpc].append(result.requests_per_s)
                p50[rpc].append(result.p50_ms)
    median = {rpc: statistics.median(values) for rpc, values in rates.items()}
    both_ms = 1e3 / median["encode"] + 1e3 / median["decode"]
    rows = []
    print(f"{'rpc':<13} {'requests/s':>11} {'p50 ms':>8} {'vs encode+decode':>17}")
    for rpc in RPCS:
        ratio = (1e3 / median[rpc]) / both_ms
        rows.append({"rpc": rpc, "requests_per_s": median[rpc], "p50_ms": statistics.median(p50[rpc]), "ratio": ratio})
        print(f"{rpc:<13} {median[rpc]:11.1f} {statistics.median(p50[rpc]):8.2f} {ratio:17.2f}")
    print(json.dumps({"rows": args.rows, "concurrency": args.concurrency, "rounds": args.rounds, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
