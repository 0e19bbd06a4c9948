"""In-process sentence encoders: embeddings without a model server, a GPU or torch.

`type: encoder` providers serve `/v1/embeddings` and the semantic router, nothing else.
Two backends:

- `static` (the default): WordLlama's bundled static embeddings (256 dimensions, weights
  shipped inside the `wordllama` wheel, so nothing is downloaded). Token vectors averaged:
  tens of microseconds a query.
- `onnx`: a sentence-transformers model exported to ONNX (a folder with `model.onnx` and
  `tokenizer.json`, e.g. all-MiniLM-L6-v2), run with onnxruntime, mean-pooled over the
  attention mask and L2-normalised. Needs `pip install onnxruntime` (the `onnx` extra).

`benchmarks/routing/` compares them with the local LLM's mean-pooled embeddings.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from rswitch.providers.base import ChatCall, EmbedCall, Provider, UpstreamError
from rswitch.providers.pricing import estimate_tokens

# A static encoder embeds this much on the event loop (a batch of a few dozen prompts: tens of
# microseconds); more goes to a worker thread, whose hop costs more than short texts do.
INLINE_CHARS = 2048


_LLAMA_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


class EncoderError(RuntimeError):
    pass


class StaticEncoder:
    """WordLlama's l2_supercat static embeddings, from the files inside the installed wheel."""

    def __init__(self, dim: int = 256) -> None:
        try:
            import wordllama
            from tokenizers import Tokenizer
            from wordllama import WordLlama
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise EncoderError("the static encoder needs the 'wordllama' package") from exc
        # WordLlama looks for bundled files under <dir>/weights and <dir>/tokenizers; its
        # package folder has exactly that layout, so point it there and never download.
        pkg = Path(wordllama.__file__).parent
        try:
            model = WordLlama.load(dim=dim, cache_dir=pkg, disable_download=True)
        except FileNotFoundError as exc:
            raise EncoderError(f"WordLlama files missing from {pkg}: {exc}") from exc
        self.dim = dim
        # WordLlama.embed pads every batch and tokenizes with encode_batch, which hands a batch to
        # the tokenizers thread pool and releases the GIL: on a busy event loop that costs more
        # than the work. Each text is tokenized on its own here (microseconds, the GIL held), and
        # the token vectors of the whole batch pooled in one gather: the same vectors, cheaper.
        # Only its tokenizer and token vectors are kept, not the WordLlama object.
        self._tokenizer: Tokenizer = model.tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        # Llama's tokenizer normalises a text by prepending "▁" and replacing spaces with "▁", then
        # runs BPE over it (no pre-tokenizer): done here directly, that is a quarter of the cost
        # of Tokenizer.encode (no offsets, no Encoding). Texts holding a special token's text, or
        # another tokenizer, take Tokenizer.encode.
        spec = json.loads(self._tokenizer.to_str())
        llama = spec.get("normalizer") == _LLAMA_NORMALIZER and spec.get("pre_tokenizer") is None
        self._bpe = self._tokenizer.model.tokenize if llama else None
        self._special = tuple(a["content"] for a in spec.get("added_tokens", []))
        table = np.asarray(model.embedding, dtype=np.float32)
        self._top = len(table) - 1  # the last token id (WordLlama clips to it too)
        self._clip = self._tokenizer.get_vocab_size() > len(table)  # ids past the table can come
        # one zero row after the vocabulary: the padding of a batch's shorter texts sums to nothing
        # (a copy: WordLlama's own table goes with the model)
        self._table = np.vstack([table, np.zeros((1, table.shape[1]), dtype=np.float32)])

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one row per text: WordLlama's mean of token vectors, L2-normalised
        (a text without tokens gets a zero row)."""
        top = self._top
        ids = [self._token_ids(t) for t in texts]
        if len(ids) == 1:
            index = np.asarray(ids[0], dtype=np.intp)
            if self._clip:
                np.minimum(index, top, out=index)
            out = np.add.reduce(self._table[index], axis=0, keepdims=True)
        else:
            out = self._pool(ids)
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
        return out / np.maximum(norms, 1e-12)

    def _token_ids(self, text: str) -> list[int]:
        if self._bpe is None or any(s in text for s in self._special):
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        return [t.id for t in self._bpe("\u2581" + text.replace(" ", "\u2581"))] if text else []

    def _pool(self, ids: list[list[int]]) -> np.ndarray:
        """Each text's sum of token vectors: one padded gather when the texts are of similar
        length, else one gather of all tokens summed per text."""
        lengths = list(map(len, ids))
        total, longest = sum(lengths), max(lengths)
        if len(ids) * longest <= 2 * total:
            # the padded index built in Python: at a few short texts, each numpy call is what costs
            pad, top = self._top + 1, self._top  # pad: the zero row
            if self._clip:
                ids = [[min(i, top) for i in x] for x in ids]
            index = np.array([x + [pad] * (longest - len(x)) for x in ids], dtype=np.intp)
            return np.add.reduce(self._table[index], axis=1)
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.intp, count=total)
        if self._clip:
            np.minimum(flat, self._top, out=flat)
        out = np.zeros((len(ids), self._table.shape[1]), dtype=np.float32)
        some = np.asarray(lengths) > 0
        starts = np.cumsum(lengths) - lengths
        out[some] = np.add.reduceat(self._table[flat], starts[some], axis=0)
        return out


class OnnxEncoder:
    """A sentence-transformers ONNX export: `model.onnx` (or `model_file`) + `tokenizer.json`."""

    def __init__(self, path: str, model_file: str = "model.onnx", max_length: int = 256) -> None:
        folder = Path(path).expanduser()
        onnx_file, tok_file = folder / model_file, folder / "tokenizer.json"
        for f in (onnx_file, tok_file):
            if not f.is_file():
                raise EncoderError(f"onnx encoder: {f} does not exist")
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EncoderError(
                "the onnx encoder needs onnxruntime: pip install 'rswitch[onnx]' (or onnxruntime)"
            ) from exc
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tok = Tokenizer.from_file(str(tok_file))
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding()
        self._lock = threading.Lock()  # the tokenizer's padding state is not shared safely
        self.dim = int(self._session.get_outputs()[0].shape[-1])

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            enc = self._tok.encode_batch(texts)
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def build_encoder(settings: Any) -> StaticEncoder | OnnxEncoder:
    """From config.EncoderSettings."""
    if settings.backend == "onnx":
        if not settings.path:
            raise EncoderError(
                "encoder backend 'onnx' needs `path`: a folder with model.onnx and tokenizer.json"
            )
        return OnnxEncoder(settings.path, settings.model_file, settings.max_length)
    return StaticEncoder(settings.dim)


class EncoderProvider(Provider):
    type = "encoder"

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        super().__init__(name, settings, api_key)
        self._encoder: StaticEncoder | OnnxEncoder | None = None
        self._broken: EncoderError | None = None
        self._load_lock = threading.Lock()
        self.inline_chars = INLINE_CHARS

    @property
    def encoder(self) -> StaticEncoder | OnnxEncoder:
        if self._encoder is None:
            with self._load_lock:
                if self._encoder is None:
                    self._encoder = build_encoder(self.settings.encoder)
        return self._encoder

    async def start(self) -> None:
        try:
            await asyncio.to_thread(lambda: self.encoder)
        except EncoderError:
            pass  # reported on first use, as a 500 naming the problem
        except Exception as exc:  # a corrupt model file: the same, never a failed start-up
            self._broken = EncoderError(f"could not load the encoder: {type(exc).__name__}: {exc}")

    def encoder_id(self) -> str:
        """Changes whenever the vectors would: another model file in the same folder included."""
        s = self.settings.encoder
        if s.backend == "onnx":
            f = Path(s.path or ".").expanduser() / s.model_file
            try:
                st = f.stat()
                stamp = f"{st.st_size}:{int(st.st_mtime)}"
            except OSError:
                stamp = "missing"
            return f"onnx:{f.resolve()}:{stamp}:{s.max_length}"
        return f"static:wordllama-l2_supercat-{s.dim}"

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised vectors, one row per text (the semantic router's fast path)."""
        try:
            if self._broken is not None:
                raise self._broken
            enc = self.encoder
            if isinstance(enc, StaticEncoder) and sum(len(t) for t in texts) <= self.inline_chars:
                return enc.encode(texts)
            return await asyncio.to_thread(enc.encode, texts)
        except EncoderError as exc:
            raise UpstreamError(500, f"provider '{self.name}': {exc}", retryable=False) from None

    def embedding_dimensions(self, model: str) -> int | None:
        if self._encoder is not None:
            return self._encoder.dim
        s = self.settings.encoder
        return s.dim if s.backend == "static" else None  # an ONNX model says once loaded

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        inputs = [call.inputs] if isinstance(call.inputs, str) else list(call.inputs)
        if not inputs or not all(isinstance(x, str) for x in inputs):
            raise UpstreamError(
                400,
                f"provider '{self.name}': 'input' must be a string or a list of strings",
                error_type="invalid_request_error",
                retryable=False,
            )
        vectors = await self.encode(inputs)
        dims = call.params.get("dimensions")
        if dims is not None and not (isinstance(dims, int) and 0 < dims <= vectors.shape[1]):
            raise UpstreamError(
                400,
                f"provider '{self.name}': 'dimensions' must be 1 to {vectors.shape[1]} for this encoder",
                error_type="invalid_request_error",
                retryable=False,
            )
        if dims is not None and dims < vectors.shape[1]:  # Matryoshka-style truncation
            vectors = vectors[:, :dims]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        tokens = sum(estimate_tokens(t) for t in inputs)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)
            ],
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _chat_refused(self) -> UpstreamError:
        return UpstreamError(
            400,
            f"provider '{self.name}' is an encoder: it serves /v1/embeddings only, not chat",
            error_type="invalid_request_error",
            code="chat_not_supported",
            retryable=False,
        )

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        raise self._chat_refused()

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        raise self._chat_refused()
        yield {}  # pragma: no cover - makes this an async generator

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "base_url": None,
            "model_path": self.encoder_id(),
            "backend": self.settings.encoder.backend,
        }
