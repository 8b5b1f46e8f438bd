"""One table of the quality runs under a folder (benchmarks/fid_run.sh writes NAME.log and NAME.jsonl there):
images seen, steps, compile time, img/s and each FID/KID, so a device call can bring the results back as text.

    python3 benchmarks/fid_summary.py $HOME/fid
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DONE = re.compile(r"^done: step (\d+), ([\d,]+) images seen in ([\d.]+) s(?: .*?([\d.]+) s of it compiling)?")
RATE = re.compile(r"([\d,]+) img/s")


def summarize(folder: Path) -> list[str]:
    lines = ["| run | state | images seen | steps | compile s | img/s (last) | sampler | FID | KID x 1e3 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for log in sorted(folder.glob("*.log")):
        name, text = log.stem, log.read_text(errors="replace")
        state = "done" if "FID-DONE" in text else "running"
        seen = steps = comp = rate = ""
        for line in text.splitlines():
            if m := DONE.match(line):
                steps, seen, comp = m.group(1), m.group(2), m.group(4) or ""
            elif line.startswith("step ") and (r := RATE.search(line)):
                rate = r.group(1)
        results, label = [], None
        jsonl = folder / f"{name}.jsonl"
        for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
            if line.startswith("{"):
                rec = json.loads(line)
                kid, fid = rec.get("kid_mean"), rec.get("fid")
                results.append((label or "?", "failed" if fid is None else f"{fid:.2f}",
                                "" if kid is None else f"{kid * 1e3:.1f}"))
                label = None
            elif line.strip():
                label = " ".join(line.split()[1:]) or line.strip()
        if not results:
            results = [("", "", "")]
        for k, (sampler, fid, kid) in enumerate(results):
            head = [name, state, seen, steps, comp, rate] if k == 0 else ["", "", "", "", "", ""]
            lines.append("| " + " | ".join([*head, sampler, fid, kid]) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "."))))
