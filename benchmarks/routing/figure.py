"""A text figure of PGR against strong-call share from routellm.py's JSON (for the README).

python benchmarks/routing/figure.py benchmarks/routing/results/routellm.json mmlu
"""

from __future__ import annotations

import json
import re
import sys

import plotext as plt

ROUTERS = ("random", "knn", "linucb", "oracle")


def figure(path: str, dataset: str, width: int = 90, height: int = 22) -> str:
    data = json.loads(open(path, encoding="utf-8").read())
    grid = [100 * c for c in data["grid"]]
    routers = data["datasets"][dataset]["routers"]
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    for name in ROUTERS:
        r = routers.get(name)
        if r and r.get("curve"):
            apgr = r["apgr"]["mean"]
            plt.plot(grid, r["curve"], label=f"{name} (APGR {apgr:.2f})", marker="braille")
    plt.hline(0.5)
    plt.ylim(0, 1.3)
    plt.xlabel("share of calls to the strong model, %")
    plt.title(f"{dataset}: performance gap recovered vs cost")
    return re.sub(r"\x1b\[[0-9;]*m", "", plt.build())


if __name__ == "__main__":
    print(figure(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mmlu"))
