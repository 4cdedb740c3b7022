"""A request's body read into work the engine can run, and where that happens: a large body is
parsed, checked and tokenized in a helper process (an interpreter and a GIL of its own), so that
no request's parsing or tokenizing holds up /health or the streams in flight; a small one in the
server's process. Both run the same `Preparer`, so both answer alike.

Why a process and not a thread: parsing 4 MB of JSON, checking a million token ids or encoding a
million characters is CPU work that holds the GIL in long stretches, and the event loop and the
engine loop's thread (which takes the GIL back after every torch call) wait for each stretch. In
the helper, a request only costs the server's process the bytes in, and back a compact result:
an error, the /tokenize or /detokenize body as bytes, or a checked completion request with its
prompts' token ids (at most what the engine could ever be asked to take)."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, cast

from aigc_cli.core.errors import RecordError
from aigc_cli.core.settings import text_problem
from aigc_cli.engine.engine import Engine
from aigc_cli.protocol.chat import chat_error, chat_request
from aigc_cli.protocol.completions import BY_PARAM_NAME, CompletionRequest, completion_request
from aigc_cli.protocol.errors import APIError, bad, parse_json, quoted, unknown_parameter

PREPARE_ELSEWHERE = 1 << 16  # bytes: a larger body is prepared in the helper process
HELPER_NICENESS = 10  # added to the helper process's niceness (lower CPU priority)
MAX_TOKENIZE_CHARS = 1 << 20  # characters /tokenize takes in one request
TOKENIZE_KEYS = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})
DETOKENIZE_KEYS = frozenset({"model", "tokens"})


@dataclass
class Prepared:
    """A checked completion request and its prompts: token ids, and text (as given or decoded)."""

    req: CompletionRequest
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    max_completion_tokens: Any = None  # a chat body's, for refusals that name it


def check_model(name: Any, served: str) -> None:
    """400 for a model name that is not text, 404 for another model than the one served."""
    if not isinstance(name, str):
        raise bad(f"'model' must be a string (got {quoted(name)})", "model")
    problem = text_problem(name)
    if problem is not None:
        raise bad(f"'model' is {problem}", "model", "invalid_text")
    if name != served:
        raise APIError(404, f"the model {quoted(name)} does not exist; this server serves {quoted(served)}", "model", "model_not_found")


def checked_prompts(engine: Engine, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and text, once the engine's checks pass (valid text, not empty, in
    the vocabulary, room in the context for the new tokens, memory); a 400 naming the field."""
    tok = engine.tokenizer
    ids_out, texts = [], []
    for p, prompt in enumerate(req.prompts):
        where = f"prompt {p}: " if len(req.prompts) > 1 else ""
        try:
            ids = engine.encode(prompt, req.settings) if isinstance(prompt, str) else list(prompt)
            engine.check_ids(ids, req.settings, req.generated_tokens)
        except RecordError as exc:
            raise refusal(exc, where, req, exc.code == "prompt_too_long" and _fits_alone(engine, prompt)) from None
        ids_out.append(ids)
        texts.append(prompt if isinstance(prompt, str) else tok.decode(ids, clean_up_tokenization_spaces=False))
    return ids_out, texts


def _fits_alone(engine: Engine, prompt: str | list[int]) -> bool:
    """Whether a prompt refused as too long fits the context without new tokens (then the new
    tokens are at fault); counted again only on this refusal's path."""
    if isinstance(prompt, str):
        if len(prompt) > engine.context_length * engine.longest_token:
            return False
        prompt = engine.prefix + engine.tokenizer.encode(prompt, add_special_tokens=False)
    return len(prompt) <= engine.context_length


def refusal(exc: RecordError, where: str, req: CompletionRequest, fits_alone: bool = False) -> APIError:
    """A prompt the engine cannot take, as a 400 naming the request field at fault: a prompt too
    long names max_tokens only when the client gave it and the prompt alone fits."""
    if exc.code == "prompt_too_long":
        param = "max_tokens" if fits_alone and req.generated_tokens and req.max_tokens_given else "prompt"
        return bad(f"{where}{exc.render('api')}", param, "context_length_exceeded")
    field = (req.settings.mode.kv_rows if exc.code == "too_big" else exc.field) or "prompt"
    param = BY_PARAM_NAME.get(field, field)
    return bad(f"{where}{exc.render('api')}", param, exc.code)


class _NoWeights:
    """The model as the helper process sees it: no weights, so no memory estimate (the server's
    process checks memory once more with the real model)."""

    def kv_bytes_per_position(self) -> None:
        return None


@dataclass
class _Vocabulary:
    """What `Engine` reads of a loaded model to check prompts: the tokenizer and the context."""

    name: str
    tokenizer: Any
    context_length: int
    conventions: Any
    model: Any = None


class Preparer:
    """Turns request bodies into checked work, with what that needs of the server (the served
    model's name, its tokenizer, context and conventions, the chat template); picklable, so the
    helper process gets a copy."""

    def __init__(self, served: str, engine: Engine, chat_template: str | None) -> None:
        self.served, self.chat_template = served, chat_template
        lm = engine.lm
        self.vocabulary = _Vocabulary(lm.name, lm.tokenizer, lm.context_length, lm.conventions)
        self.engine = engine  # the real one here; in the helper, one without weights (see __setstate__)

    def __getstate__(self) -> dict[str, Any]:
        return {"served": self.served, "chat_template": self.chat_template, "vocabulary": self.vocabulary}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.vocabulary.model = _NoWeights()
        self.engine = Engine(cast(Any, self.vocabulary))

    def body(self, raw: bytes, keys: frozenset[str] | None = None) -> dict[str, Any]:
        """The request's JSON object; `keys`: the only fields allowed (and then its model checked)."""
        body = parse_json(raw)
        if "model" in body and keys is not None:
            check_model(body["model"], self.served)
        unknown = next((k for k in body if k not in keys), None) if keys is not None else None
        if unknown is not None:
            raise unknown_parameter(unknown)
        return body

    def tokenize(self, raw: bytes) -> bytes:
        """The /tokenize response body (vLLM's: count, max_model_len, tokens, token_strs)."""
        body = self.body(raw, TOKENIZE_KEYS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string", "prompt")
        problem = text_problem(prompt)
        if problem is not None:
            raise bad(f"'prompt' is {problem}", "prompt", "invalid_text")
        if len(prompt) > MAX_TOKENIZE_CHARS:
            raise bad(f"'prompt' has {len(prompt):,} characters; /tokenize takes at most {MAX_TOKENIZE_CHARS:,}", "prompt", "too_long")
        tok = self.engine.tokenizer
        # With special tokens: the prompt as the model sees it (usage's prompt_tokens), i.e. with the
        # prefix a BERT-vocabulary model puts first ([CLS]); never a [SEP] the tokenizer would append.
        prefix = self.engine.prefix if _flag(body, "add_special_tokens", True) else []
        ids = prefix + tok.encode(prompt, add_special_tokens=False)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.engine.context_length, "tokens": ids}
        if _flag(body, "return_token_strs", False):
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return _json(out)

    def detokenize(self, raw: bytes) -> bytes:
        """The /detokenize response body: the text of the token ids."""
        body = self.body(raw, DETOKENIZE_KEYS)
        ids = body.get("tokens")
        tok = self.engine.tokenizer
        vocab = len(tok)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise bad(f"'tokens' must be a list of token ids below {vocab}", "tokens")
        return _json({"prompt": tok.decode(ids, clean_up_tokenization_spaces=False)})

    def completion(self, raw: bytes) -> Prepared:
        """A /v1/completions body, checked and its prompts tokenized."""
        req = completion_request(self.body(raw))
        check_model(req.model, self.served)
        return Prepared(req, *checked_prompts(self.engine, req))

    def chat(self, raw: bytes) -> Prepared:
        """A /v1/chat/completions body, rendered into a completion and prepared as one; refusals
        name the chat body's own fields."""
        sent = self.body(raw)
        body = chat_request(sent, cast(str, self.chat_template), self.engine.tokenizer)
        try:
            req = completion_request(body)
            check_model(req.model, self.served)
            return Prepared(req, *checked_prompts(self.engine, req), sent.get("max_completion_tokens"))
        except APIError as exc:
            raise chat_error(exc, sent) from None


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false", key)
    return value


def _json(value: Any) -> bytes:
    """A response body as starlette's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# -- the helper process ---------------------------------------------------------------------------

_HELPER_PREPARER: Preparer | None = None  # the helper process's copy


def _start_helper(preparer: Preparer, server: int) -> None:
    """The helper process's start: its copy of the preparer, and a lower CPU priority, so that on
    a busy machine the engine and the event loop run first and preparing waits."""
    global _HELPER_PREPARER
    _HELPER_PREPARER = preparer
    try:
        os.nice(HELPER_NICENESS)
    except (AttributeError, OSError):  # no os.nice here (Windows), or not allowed
        pass
    threading.Thread(target=_exit_with_parent, args=(server,), name="aigc-helper-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End the helper once the server's process (`parent`, its pid as the server gave it) is gone
    (killed, say, with no time to close its pool): the helper is then a child of another
    process, perhaps already before it got here."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _run_in_helper(kind: str, raw: bytes) -> tuple[bool, Any]:
    """(True, result) or (False, the APIError's fields): an exception with arguments of its own
    does not always survive pickling."""
    assert _HELPER_PREPARER is not None
    try:
        return True, getattr(_HELPER_PREPARER, kind)(raw)
    except APIError as exc:
        return False, (exc.status, exc.message, exc.param, exc.code, exc.kind)


class Helper:
    """One helper process (started with `spawn`: a fork of a process with threads and torch is not
    safe) preparing the large bodies one at a time; while it works on one, the next waits there,
    not in the server's process. When it dies, the request it held is prepared here instead and
    a new one starts for the next."""

    def __init__(self, preparer: Preparer, log: Callable[[str], None]) -> None:
        self.preparer, self.log = preparer, log
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        import multiprocessing

        with self._lock:
            if self._pool is None:
                ctx = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_start_helper, initargs=(self.preparer, os.getpid()))
            return self._pool

    @classmethod
    def started(cls, preparer: Preparer, log: Callable[[str], None]) -> Helper | None:
        """A helper, its process started now (it imports and unpickles the tokenizer once), not on
        the first large request; None, with a warning, when it cannot start (a tokenizer that
        cannot be copied to another process, no processes allowed): then every body is prepared
        in the server's process, as small ones are."""
        helper = cls(preparer, log)
        try:
            pickle.dumps(preparer)
            helper._executor().submit(len, b"")
        except Exception as exc:  # noqa: BLE001 - any reason: the server works without it
            log(f"aigc serve: warning: no helper process for large requests ({type(exc).__name__}: {exc}); they are prepared here")
            helper.close()
            return None
        return helper

    async def run(self, kind: str, raw: bytes) -> Any:
        """What `Preparer.<kind>(raw)` returns, computed in the helper; its APIError raised here."""
        pool = self._executor()
        try:
            ok, value = await asyncio.get_running_loop().run_in_executor(pool, _run_in_helper, kind, raw)
        except (BrokenProcessPool, OSError):  # it died (or a new one could not start)
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            if not self._closed:
                self.log("aigc serve: warning: the helper process that prepares large requests died; starting another")
            return await asyncio.to_thread(getattr(self.preparer, kind), raw)
        if not ok:
            raise APIError(*value)
        return value

    def close(self) -> None:
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
