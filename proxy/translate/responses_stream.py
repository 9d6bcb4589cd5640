"""Chat completion chunks as the Responses API's stream events, each with `sequence_number`.

    response.created, response.in_progress                  at the start
    response.output_item.added (message)                     text begins
      response.content_part.added (output_text)
      response.output_text.delta ...
      response.output_text.done, response.content_part.done
    response.output_item.done
    response.output_item.added (function_call)               per tool call
      response.function_call_arguments.delta ...
      response.function_call_arguments.done
    response.output_item.done
    response.completed (or response.incomplete)              with the whole response

`start()` gives the opening events, `feed(payload)` those of one `chat.completion.chunk`,
`finish()` the closing ones (usage comes in the last chunk, after the finish reason);
`fail(message)` is `response.failed` for a chain that fails after the stream started.
`response` is the finished object (for the store) once `finish()` ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from . import responses_wire as rw
from .chat import ChoiceView, UsageView, completion_decoder, new_id
from .responses import finish, usage


class ResponsesStream:
    def __init__(self, response: rw.Response) -> None:
        self.response = response
        self._seq = 0
        self._text: rw.MessageItem | None = None  # the open message item
        self._texts: list[str] = []
        self._call: rw.FunctionCallItem | None = None  # the open function call item
        self._calls: dict[int, rw.FunctionCallItem] = {}  # chat tool call index -> item
        self._finish: str | None = None
        self._usage: UsageView | None = None

    def _frame(self, event: rw.StreamEvent) -> bytes:
        event.sequence_number = self._seq
        self._seq += 1
        return rw.frame(event)

    def start(self) -> list[bytes]:
        snapshot = msgspec.structs.replace(self.response, output=[])
        return [
            self._frame(rw.Created(response=snapshot)),
            self._frame(rw.InProgress(response=snapshot)),
        ]

    def feed(self, payload: bytes) -> list[bytes]:
        try:
            chunk = completion_decoder.decode(payload)
        except msgspec.DecodeError:
            return []
        if chunk.usage is not None:
            self._usage = chunk.usage
        out: list[bytes] = []
        for choice in chunk.choices[:1]:
            out += self._choice(choice)
        return out

    def _choice(self, choice: ChoiceView) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.delta
        if delta is not None:
            text = delta.content or delta.refusal
            if text:
                out += self._add_text(text)
            for call in delta.tool_calls or []:
                function = call.function
                out += self._add_call(
                    call.index,
                    call.id,
                    function.name if function else None,
                    function.arguments if function else None,
                )
        if choice.finish_reason:
            self._finish = choice.finish_reason
        return out

    def _index(self) -> int:
        return len(self.response.output) - 1

    def _add_text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        item = self._text
        if item is None:
            out += self._close_call()
            item = self._text = rw.MessageItem(id=new_id("msg_"), status="in_progress")
            self.response.output.append(item)
            out.append(self._frame(rw.ItemAdded(output_index=self._index(), item=_copy(item))))
            out.append(
                self._frame(
                    rw.PartAdded(
                        item_id=item.id,
                        output_index=self._index(),
                        content_index=0,
                        part=rw.OutputText(text=""),
                    )
                )
            )
        self._texts.append(text)
        out.append(
            self._frame(
                rw.TextDelta(
                    item_id=item.id, output_index=self._index(), content_index=0, delta=text
                )
            )
        )
        return out

    def _close_text(self) -> list[bytes]:
        item = self._text
        if item is None:
            return []
        self._text = None
        index = self.response.output.index(item)
        text = "".join(self._texts)
        self._texts = []
        part = rw.OutputText(text=text)
        item.content = [part]
        item.status = "incomplete" if self._finish == "length" else "completed"
        return [
            self._frame(
                rw.TextDone(item_id=item.id, output_index=index, content_index=0, text=text)
            ),
            self._frame(
                rw.PartDone(item_id=item.id, output_index=index, content_index=0, part=part)
            ),
            self._frame(rw.ItemDone(output_index=index, item=_copy(item))),
        ]

    def _add_call(
        self, index: int, call_id: str | None, name: str | None, arguments: str | None
    ) -> list[bytes]:
        out: list[bytes] = []
        item = self._calls.get(index)
        if item is None:
            out += self._close_text()
            out += self._close_call()
            item = rw.FunctionCallItem(
                id=new_id("fc_"),
                call_id=call_id or new_id("call_"),
                name=name or "",
                status="in_progress",
            )
            self._calls[index] = self._call = item
            self.response.output.append(item)
            out.append(self._frame(rw.ItemAdded(output_index=self._index(), item=_copy(item))))
        if arguments:
            item.arguments += arguments
            if item is self._call:  # interleaved calls: the whole arguments come in .done
                position = self.response.output.index(item)
                out.append(
                    self._frame(
                        rw.ArgumentsDelta(item_id=item.id, output_index=position, delta=arguments)
                    )
                )
        return out

    def _close_call(self, call: rw.FunctionCallItem | None = None) -> list[bytes]:
        item = call or self._call
        if item is self._call:
            self._call = None
        if item is None or item.status != "in_progress":
            return []
        index = self.response.output.index(item)
        item.status = "completed"
        done = rw.ArgumentsDone(
            item_id=item.id, output_index=index, name=item.name, arguments=item.arguments
        )
        return [self._frame(done), self._frame(rw.ItemDone(output_index=index, item=_copy(item)))]

    def finish(self) -> list[bytes]:
        out = self._close_text()
        out += self._close_call()
        for call in self._calls.values():  # any call left open by an interleaving upstream
            out += self._close_call(call)
        response = finish(self.response, self._finish)
        response.usage = usage(self._usage)
        event = rw.Incomplete if response.status == "incomplete" else rw.Completed
        out.append(self._frame(event(response=response)))
        return out

    def fail(self, message: str, code: str = "server_error") -> bytes:
        """`response.failed` for a chain that failed after the stream started."""
        failed = msgspec.structs.replace(
            self.response, status="failed", error=rw.ResponseError(code=code, message=message)
        )
        return self._frame(rw.Failed(response=failed))


def _copy(item: rw.OutputItem) -> rw.OutputItem:
    """A snapshot of an item as it is now (the live one keeps changing)."""
    if isinstance(item, rw.MessageItem):
        return msgspec.structs.replace(item, content=list(item.content))
    return msgspec.structs.replace(item)


async def responses_frames(
    chunks: AsyncIterator[bytes], translator: ResponsesStream
) -> AsyncIterator[bytes]:
    """The Responses events of a chat chunk stream, from response.created to the end."""
    for frame in translator.start():
        yield frame
    async for payload in chunks:
        for frame in translator.feed(payload):
            yield frame
    for frame in translator.finish():
        yield frame
