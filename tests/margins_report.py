"""``make margins``' table: every learned effect the suite asserts (``conftest.assert_effect``),
on each world seed, beside its bound, with the least slack over seeds: the effect that comes
closest to failing on some machine shows here first."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(folder: str) -> int:
    recs = [json.loads(x) for f in sorted(Path(folder).glob("seed*.jsonl")) for x in f.read_text().splitlines()
            if x.strip()]
    if not recs:
        print(f"no records under {folder}: did the learned-effect tests run?")
        return 1
    by: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in recs:
        by[r["test"], r["effect"]][r["world_seed"]] = r
    seeds = sorted({r["world_seed"] for r in recs})
    print(f"| test | effect | bound | {' | '.join(f'seed {s}' for s in seeds)} | least slack |")
    print("|---|---|---|" + "---|" * len(seeds) + "---|")
    failed = 0
    for (test, effect), per in sorted(by.items()):
        any_r = next(iter(per.values()))
        sign = 1 if any_r["above"] else -1
        slack = [sign * (per[s]["value"] - per[s]["bound"]) for s in seeds if s in per]
        failed += sum(x <= 0 for x in slack) + (len(seeds) - len(per))
        cells = [f"{per[s]['value']:.3f}" if s in per else "missing" for s in seeds]
        op = ">" if any_r["above"] else "<"
        print(f"| {test.split('::')[-1]} | {effect} | {op} {any_r['bound']:g} | {' | '.join(cells)} | "
              f"{min(slack):+.3f} |")
    print(f"\n{len(by)} effects on seeds {seeds}: {failed} (effect, seed) below its bound or missing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/margins"))
