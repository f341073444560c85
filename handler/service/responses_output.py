"""Chat answers as Responses API objects: a chat.completion as a response object (`from_chat`),
a chat stream's chunks as the Responses API's named events (`ResponseEvents`), in OpenAI's order:
response.created, response.in_progress, then per output item (a message, or a function call)
output_item.added, its content part or arguments deltas, their done events and output_item.done,
then response.completed (or response.incomplete at the token limit).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from handler.service.chunk_stream import WAIT, ChunkStream
from handler.service.objects import now

if TYPE_CHECKING:
    from handler.service.responses import ResponsesRequest

# ------------------------------------------------------------------ chat -> response


def from_chat(req: ResponsesRequest, completion: dict[str, Any]) -> dict[str, Any]:
    """The response object of a chat.completion; cut at its token limit, the response and its
    last output item are incomplete."""
    choice = completion["choices"][0]
    message = choice["message"]
    incomplete = choice["finish_reason"] == "length"
    output: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        text = message.get("content") or ""
        output.append(_message(new_id("msg"), "completed", [_output_text(text, _logprobs(choice))]))
    for call in calls:
        function = call["function"]
        output.append(
            _function_call(new_id("fc"), call["id"], function["name"], function["arguments"])
        )
    if incomplete:
        output[-1]["status"] = "incomplete"
    r = completion["usage"]
    return response_object(
        req,
        response_id=new_id("resp"),
        created_at=completion["created"],
        model=completion["model"],
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=_usage(r["prompt_tokens"], r["completion_tokens"]),
    )


def new_id(prefix: str) -> str:
    """A Responses-style id: `resp_...`, `msg_...`, `fc_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The response object, with the request's settings echoed as OpenAI does."""
    text_format = req.text.format.as_dict() if req.text and req.text.format else {"type": "text"}
    tool_choice = req.tool_choice or "auto"
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": now() if status == "completed" else None,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {
            "format": text_format,
            **({"verbosity": req.text.verbosity} if req.text and req.text.verbosity else {}),
        },
        "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
        "tools": [tool.as_dict() for tool in req.tools or ()],
        "top_logprobs": req.top_logprobs,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def _message(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _output_text(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _function_call(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat choice's token logprobs as output_text's (the same fields; bytes required)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    return [
        {
            "token": t["token"],
            "logprob": t["logprob"],
            "bytes": t.get("bytes") or list(t["token"].encode()),
            "top_logprobs": [
                {
                    "token": o["token"],
                    "logprob": o["logprob"],
                    "bytes": o.get("bytes") or list(o["token"].encode()),
                }
                for o in t.get("top_logprobs") or ()
            ],
        }
        for t in content
    ]


# ------------------------------------------------------------------ chat chunks -> events


class ResponseEvents(ChunkStream):
    """A streamed response: the Responses API's events (each with its `type` and
    `sequence_number`, sent as named SSE events), made from the chat pipeline's chunks.
    Closing it closes the chat stream, which stops the generation and frees its slot."""

    def __init__(self, req: ResponsesRequest, model: str, chat: ChunkStream) -> None:
        writer = _EventWriter(req, model)
        super().__init__(writer.events(chat), chat.close, chat.close, chat.listen)


class _EventWriter:
    """Chat chunks -> events. One output item is open at a time (a message, or one function
    call per tool-call index); it is closed when the next one opens or the stream ends."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.response_id = new_id("resp")
        self.created_at = now()
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the items done
        self.item: dict[str, Any] | None = None  # the item open, as it was added
        self.call_index: int | None = None
        self.pieces: list[str] = []  # the open item's text or arguments
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def events(self, chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Every event of the response, in OpenAI's order."""
        yield self._lifecycle("response.created", "in_progress")
        yield self._lifecycle("response.in_progress", "in_progress")
        for chunk in chunks:
            if chunk is WAIT:
                yield WAIT
                continue
            yield from self._chunk(chunk)
        if self.item is None and not self.output:
            yield from self._open_message()  # an empty answer is still one message
        yield from self._close(last=True)
        status = "incomplete" if self.finish_reason == "length" else "completed"
        yield self._lifecycle(f"response.{status}", status)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    def _lifecycle(self, kind: str, status: str) -> dict[str, Any]:
        response = response_object(
            self.req,
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=list(self.output),
            usage=self.usage if status != "in_progress" else None,
        )
        return self._event(kind, response=response)

    def _chunk(self, chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if chunk.get("usage"):
            totals = chunk["usage"]
            self.usage = _usage(totals["prompt_tokens"], totals["completion_tokens"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield from self._text(delta["content"], _logprobs(choice))
            for call in delta.get("tool_calls") or ():
                yield from self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _where(self) -> dict[str, Any]:
        assert self.item is not None
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    def _open_message(self) -> Iterator[dict[str, Any]]:
        self.item = _message(new_id("msg"), "in_progress", [])
        yield self._event(
            "response.output_item.added", output_index=len(self.output), item=self.item
        )
        yield self._event(
            "response.content_part.added",
            **self._where(),
            content_index=0,
            part=_output_text("", []),
        )

    def _text(self, text: str, logprobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.item is None or self.item["type"] != "message":
            yield from self._close()
            yield from self._open_message()
        self.pieces.append(text)
        self.logprobs += logprobs
        yield self._event(
            "response.output_text.delta",
            **self._where(),
            content_index=0,
            delta=text,
            logprobs=logprobs,
        )

    def _call(self, call: dict[str, Any]) -> Iterator[dict[str, Any]]:
        function = call.get("function") or {}
        index = call.get("index", 0)
        if self.item is None or self.item["type"] != "function_call" or index != self.call_index:
            yield from self._close()
            self.call_index = index
            call_id = call.get("id") or new_id("call")
            name = function.get("name") or ""
            self.item = _function_call(new_id("fc"), call_id, name, "", "in_progress")
            yield self._event(
                "response.output_item.added", output_index=len(self.output), item=self.item
            )
        if function.get("arguments"):
            self.pieces.append(function["arguments"])
            yield self._event(
                "response.function_call_arguments.delta",
                **self._where(),
                delta=function["arguments"],
            )

    def _close(self, last: bool = False) -> Iterator[dict[str, Any]]:
        """The done events of the open item; the last one is incomplete when the answer was
        cut at its token limit."""
        if self.item is None:
            return
        where, text = self._where(), "".join(self.pieces)
        status = "incomplete" if last and self.finish_reason == "length" else "completed"
        if self.item["type"] == "message":
            part = _output_text(text, self.logprobs)
            yield self._event(
                "response.output_text.done",
                **where,
                content_index=0,
                text=text,
                logprobs=self.logprobs,
            )
            yield self._event("response.content_part.done", **where, content_index=0, part=part)
            done = {
                **self.item,
                "status": status,
                "content": [part],
            }
        else:
            name = self.item["name"]  # newer clients require it on this event
            yield self._event(
                "response.function_call_arguments.done", **where, name=name, arguments=text
            )
            done = {**self.item, "arguments": text, "status": status}
        yield self._event(
            "response.output_item.done", output_index=where["output_index"], item=done
        )
        self.output.append(done)
        self.item, self.pieces, self.logprobs = None, [], []
