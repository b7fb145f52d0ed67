"""OpenAI-compatible completions and chat completions: request bodies to GenerationJobs, streams to responses.

Parameters as OpenAI names them: prompt (one text, or one list of token ids), messages (rendered with the
model's chat template), max_tokens (completions: 16 by default; chat: what the bundle's max_length leaves),
temperature (0 = greedy; OpenAI's default is 1, which samples), top_p, seed, stop (strings), stream and
stream_options.include_usage; and vLLM's top_k, repetition_penalty, ignore_eos and return_token_ids. n > 1,
logprobs, echo and presence/frequency penalties are refused with a 400. finish_reason: "stop" (eos or a stop
string), "length" (max_tokens).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from kernl.errors import InputError, KernlError
from kernl.serve.chat import ChatTemplate, template_source
from kernl.serve.generation import Chunk, GenerationJob, GenerationStream
from kernl.serve.schemas import ChatBody, CompletionBody, SamplingBody


class Completions:
    """Turns bodies into jobs (tokenizing, checking what the generator does not) and streams into responses."""

    def __init__(self, tokenizer: Any, settings: Any, model: str, chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer

        # Its own copy of the tokenizer, never padded or truncated, so threads share it without a lock, and
        # able to leave the special tokens out (a chat template writes them itself).
        self.encoder = Tokenizer.from_str(tokenizer.backend.to_str())
        self.encoder.no_padding()
        self.encoder.no_truncation()
        self.tokenizer = tokenizer
        self.settings = settings
        self.model = model
        source = chat_template or template_source(tokenizer.config)
        self.template = ChatTemplate(source, tokenizer.config) if source else None

    # ---- bodies to jobs ------------------------------------------------------------------------------------

    def completion_job(self, body: CompletionBody) -> GenerationJob:
        if body.echo:
            raise InputError("echo: not supported; the response holds the completion only")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InputError(f"prompt: one prompt a request, got {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("prompt: empty")
            ids = self.encoder.encode(prompt, add_special_tokens=True).ids
        else:
            ids = list(prompt)
        if not ids:
            raise InputError("prompt: no tokens")
        return self._job(body, ids, body.max_tokens)

    def chat_job(self, body: ChatBody) -> GenerationJob:
        if self.template is None:
            raise InputError("this model's tokenizer has no chat template; use /v1/completions")
        if not body.messages:
            raise InputError("messages: empty")
        messages = [_message(m.model_dump(exclude_none=True)) for m in body.messages]
        text = self.template.render(messages, add_generation_prompt=True)
        ids = self.encoder.encode(text, add_special_tokens=False).ids
        if not ids:
            raise InputError("messages: the chat template rendered no tokens")
        return self._job(body, ids, body.max_completion_tokens or body.max_tokens)

    def _job(self, body: SamplingBody, ids: list[int], max_tokens: int | None) -> GenerationJob:
        if body.n != 1:
            raise InputError(f"n: one completion a request (n=1), got {body.n}")
        if body.logprobs not in (None, False, 0):
            raise InputError("logprobs: not supported")
        if body.presence_penalty or body.frequency_penalty:
            raise InputError("presence_penalty, frequency_penalty: not supported (repetition_penalty is)")
        room = self.settings.max_length - len(ids)
        if max_tokens is None:
            max_tokens = room
            if room < 1:
                raise InputError(f"prompt: {len(ids)} tokens leave no room for a completion (max_length "
                                 f"{self.settings.max_length})")  # fmt: skip
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_tokens > room:
            raise InputError(f"max_tokens: {len(ids)} prompt tokens + {max_tokens} exceed this model's max_length "
                             f"{self.settings.max_length}")  # fmt: skip
        options: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": body.temperature != 0,
            "temperature": body.temperature if body.temperature != 0 else 1.0,
            "top_p": body.top_p,
            "top_k": 0 if body.top_k == -1 else body.top_k,
            "repetition_penalty": body.repetition_penalty,
            "seed": body.seed,
        }
        if body.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {body.temperature}")
        if body.ignore_eos:
            options["eos_token_id"] = []
        return GenerationJob(ids, options, body.stops())

    # ---- streams to responses ------------------------------------------------------------------------------

    async def respond(self, stream: GenerationStream, body: SamplingBody, chat: bool) -> dict[str, Any]:
        """The whole response of a request without stream."""
        try:
            text, last = await stream.collect()
        finally:
            if not stream.finished:  # cancelled (the server stopped waiting): its row leaves the batch
                stream.cancel()
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=last.finish_reason)
        if body.return_token_ids:
            choice["token_ids"] = stream.token_ids
        return {**self._head(chat, _id(chat)), "choices": [choice], "usage": _usage(stream)}

    async def events(self, stream: GenerationStream, body: SamplingBody, chat: bool) -> AsyncIterator[str]:
        """Server-sent events of a streamed request: one `data: {chunk}` a piece of text, then `data: [DONE]`."""
        head = self._head(chat, _id(chat), chunk=True)
        try:
            if chat:  # OpenAI opens with the role
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})  # fmt: skip
            async for chunk in stream:
                yield _sse({**head, "choices": [self._choice(chunk, chat, body.return_token_ids)]})
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(stream)})
        except Exception as err:  # headers are sent: the error travels as an event
            message = str(err) if isinstance(err, KernlError) else f"internal error: {type(err).__name__}"
            yield _sse({"error": {"message": message, "type": "server_error", "code": 500}})
        finally:
            if not stream.finished:  # the client went away: its row leaves the batch
                stream.cancel()
        yield "data: [DONE]\n\n"

    def _choice(self, chunk: Chunk, chat: bool, token_ids: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = {"content": chunk.text} if chunk.text or chunk.finish_reason is None else {}
        else:
            choice["text"] = chunk.text
        choice.update(logprobs=None, finish_reason=chunk.finish_reason)
        if token_ids:
            choice["token_ids"] = chunk.token_ids
        return choice

    def _head(self, chat: bool, rid: str, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model}


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def _usage(stream: GenerationStream) -> dict[str, int]:
    prompt, completion = stream.prompt_tokens, stream.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as templates expect it: content parts of type text joined into one string."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"messages: content parts of type {part.get('type')!r} are not supported (text only)")
            texts.append(part["text"])
        message["content"] = "".join(texts)
    return message
