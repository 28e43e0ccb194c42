"""How often the bad-data rule stops a run, by true share of bad samples: BadSamples itself, fed batches
whose bad samples are drawn at random (2,000 simulated runs of 200,000 samples each, batches of 128).

    .venv/bin/python experiments/bad_fraction_rule.py   # ~30 s; writes results-bad-fraction-rule.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vlp.data.sources import BadSamples, DataError, Skipped

BATCH, SAMPLES, RUNS, LIMIT = 128, 200_000, 2000, 0.05
REASON = Skipped("unreadable_image", "simulated")


def stop_rate(share: float, min_samples: int, rng: np.random.Generator) -> tuple[float, float | None]:
    """(share of runs stopped, mean samples drawn before the stop of those that stopped)."""
    stops, drawn = 0, []
    for _ in range(RUNS):
        bad = BadSamples(max_fraction=LIMIT, min_samples=min_samples)
        for failed in rng.binomial(BATCH, share, size=SAMPLES // BATCH):
            try:
                bad.update(BATCH - int(failed), [REASON] * int(failed))
            except DataError:
                stops += 1
                drawn.append(bad.drawn)
                break
    return stops / RUNS, (float(np.mean(drawn)) if drawn else None)


def main() -> None:
    logging.getLogger("vlp.data").setLevel(logging.ERROR)  # no warning per simulated bad sample
    rng = np.random.default_rng(0)
    results = {}
    for min_samples in (50, 2000):
        for share in (0.035, 0.04, 0.07):
            rate, drawn = stop_rate(share, min_samples, rng)
            results[f"min_samples={min_samples} bad={share}"] = {"stopped": rate, "mean_drawn_at_stop": drawn}
            print(f"min_samples {min_samples:5d}, {share:.1%} bad: {rate:.2%} of runs stop"
                  + (f", after {drawn:,.0f} samples on average" if drawn else ""))
    out = Path(__file__).with_name("results-bad-fraction-rule.json")
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
