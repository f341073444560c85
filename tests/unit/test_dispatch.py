"""GIVEN a front door's dispatcher with MAX_CONCURRENCY 1 and MAX_QUEUE 1 WHEN generating requests
arrive THEN each is admitted on the event loop as it arrives: past capacity the answer is a 429
with Retry-After at once and its handler never runs; the service claims the ticket its front door
took instead of a second one; the ticket is released when a buffered answer is done, when the
handler fails, or when a stream ends; a stream's lines are produced on the dispatcher's own pool,
or, when the stream can be listened to, on the thread that pushes its tokens (none waits between
them), and a client that leaves stops it. Without a front door (direct invokes, the Runtime API
loop) the service admits by itself."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from handler.config import load_settings
from handler.engine.generation import WAIT as WAIT_PIECE
from handler.engine.generation import Piece, PushedGeneration
from handler.errors import InvalidRequest, Overloaded
from handler.service.admission import Admission
from handler.service.chunk_stream import WAIT, ChunkStream
from handler.service.openai_service import OpenAIService
from handler.web.dispatch import Dispatcher, Outbox
from handler.web.routes import Call, Route


def dispatcher(max_concurrency: int = 1, max_queue: int = 1) -> Dispatcher:
    settings = load_settings({"MAX_CONCURRENCY": str(max_concurrency), "MAX_QUEUE": str(max_queue)})
    # The service's engine is never reached by these routes.
    return Dispatcher(OpenAIService(None, settings), settings, watch_disconnect=False)


def generating(handle) -> Route:
    return Route("POST", "/v1/test", "test", handle, generates=True)


async def until(check) -> None:
    """Yield to the loop until `check()` holds (a poll, not a timed wait)."""
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def test_past_capacity_the_next_request_gets_429_at_once_and_never_runs():
    front = dispatcher(max_concurrency=1, max_queue=1)
    admission = front.service.admission
    gate = threading.Event()
    entered: list[str] = []

    def handle(service, call):
        entered.append(threading.current_thread().name)
        gate.wait(30)
        return {"ok": True}

    route = generating(handle)

    async def scenario():
        held = [asyncio.ensure_future(front.run(route, Call(), None)) for _ in range(2)]
        await until(lambda: len(entered) == 2)
        assert admission.in_flight == 2
        with pytest.raises(Overloaded) as refused:
            await front.run(route, Call(), None)
        assert int(refused.value.headers()["Retry-After"]) >= 1
        assert len(entered) == 2  # the refused request never reached a thread
        gate.set()
        assert [await task for task in held] == [{"ok": True}, {"ok": True}]

    asyncio.run(scenario())
    assert admission.in_flight == 0
    assert all(name.startswith("coldstart-request") for name in entered)


def test_the_service_claims_the_ticket_its_front_door_took():
    front = dispatcher()
    admission = front.service.admission
    seen: list[int] = []

    def handle(service, call):
        ticket = service.admission.claim()
        seen.append(admission.in_flight)
        ticket.release()  # the service may release it early; the dispatcher's release is a no-op
        return {}

    asyncio.run(front.run(generating(handle), Call(), None))
    assert seen == [1]  # one ticket for the request, not two
    assert admission.in_flight == 0


def test_a_failing_handler_gives_its_place_back():
    front = dispatcher()

    def handle(service, call):
        raise InvalidRequest("bad")

    with pytest.raises(InvalidRequest):
        asyncio.run(front.run(generating(handle), Call(), None))
    assert front.service.admission.in_flight == 0


def test_a_stream_holds_its_place_until_it_ends_and_its_lines_come_from_the_pool():
    front = dispatcher()
    admission = front.service.admission
    producers: list[str] = []

    def chunks():
        for n in (1, 2):
            producers.append(threading.current_thread().name)
            yield {"n": n}

    def handle(service, call):
        return ChunkStream(chunks(), service.admission.claim().release, lambda: None)

    async def scenario():
        stream = await front.run(generating(handle), Call(), None)
        assert isinstance(stream, ChunkStream)
        assert admission.in_flight == 1  # the answer is not over yet
        return [line async for line in front.sse(stream)]

    lines = asyncio.run(scenario())
    assert lines == ['data: {"n":1}\n\n', 'data: {"n":2}\n\n', "data: [DONE]\n\n"]
    assert admission.in_flight == 0
    assert producers and all(name.startswith("coldstart-request") for name in producers)


def test_a_stream_the_client_leaves_is_closed_and_released():
    front = dispatcher()
    admission = front.service.admission
    cancelled = threading.Event()

    def endless():
        while not cancelled.is_set():
            yield {"tick": True}

    def handle(service, call):
        return ChunkStream(endless(), service.admission.claim().release, cancelled.set)

    async def scenario():
        stream = await front.run(generating(handle), Call(), None)
        lines = front.sse(stream)
        await anext(lines)
        await lines.aclose()  # what the response does when the client hangs up

    asyncio.run(scenario())
    assert cancelled.is_set()
    assert admission.in_flight == 0


def test_without_a_front_door_the_service_admits_by_itself():
    admission = Admission(max_concurrency=1, max_queue=0)
    first = admission.claim()
    assert admission.in_flight == 1
    with pytest.raises(Overloaded):
        admission.claim()
    first.release()
    first.release()  # idempotent
    assert admission.in_flight == 0
    with admission.slot():
        assert admission.in_flight == 1
    assert admission.in_flight == 0


def test_a_ticket_is_claimed_only_inside_its_block_and_only_by_its_admission():
    admission, other = Admission(1, 1), Admission(1, 1)
    ticket = admission.ticket()
    with admission.admitted(ticket):
        assert admission.claim() is ticket
        assert other.claim() is not ticket  # another service admits for itself
    assert admission.claim() is not ticket


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the wakeups other threads ask of it."""

    wakeups = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_lines_that_arrive_together_wake_the_loop_once_and_keep_their_order():
    """GIVEN sixteen streams' pumps handing lines over while the loop is busy elsewhere WHEN the
    loop next runs THEN one wakeup delivers them all, each stream's lines in their order."""
    loop = CountingLoop()
    try:
        outbox = Outbox(loop)
        queues: list[asyncio.Queue[str | None]] = [asyncio.Queue() for _ in range(16)]

        def pump(index: int) -> None:
            for n in range(5):
                assert outbox.put(queues[index], f"{index}:{n}")
            assert outbox.put(queues[index], None)

        threads = [threading.Thread(target=pump, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert loop.wakeups == 1
        loop.run_until_complete(asyncio.sleep(0))
        for index, queue in enumerate(queues):
            got = [queue.get_nowait() for _ in range(queue.qsize())]
            assert got == [*(f"{index}:{n}" for n in range(5)), None]
        assert outbox.put(queues[0], "next")  # a later line wakes it again
        assert loop.wakeups == 2
    finally:
        loop.close()


def test_once_the_loop_is_closed_the_outbox_says_so():
    loop = asyncio.new_event_loop()
    outbox = Outbox(loop)
    loop.close()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    assert not outbox.put(queue, "line")
    assert not outbox.put(queue, "line")  # not queued behind a wakeup that never comes


def test_a_loop_that_is_dropped_takes_its_outbox_with_it():
    """The dispatcher keeps one outbox per loop, weakly: a Runtime API worker's loop, or a test
    client's, is not kept alive by it."""
    dispatch = dispatcher()
    loop = asyncio.new_event_loop()
    outbox = dispatch._outbox(loop)
    assert dispatch._outbox(loop) is outbox
    loop.close()
    del loop
    gc.collect()
    assert len(dispatch._outboxes) == 0
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    assert not outbox.put(queue, "line")


def listened_stream(generation: PushedGeneration, release, producers: list[str]) -> ChunkStream:
    """A stream whose chunks are read from a pushed generation, as the service makes them."""

    def chunks():
        yield {"opening": True}
        for piece in generation.pieces_or_wait():
            if piece is WAIT_PIECE:
                yield WAIT
                continue
            producers.append(threading.current_thread().name)
            yield {"text": piece.text}

    return ChunkStream(chunks(), release, generation.cancel, generation.listen)


def test_a_listened_stream_is_read_on_the_producers_thread_and_parks_no_thread():
    """Each token's line is made on the thread that pushed it (the collector's), in order, none
    lost or doubled when pushes race the reads; no pool thread waits between tokens."""
    front = dispatcher()
    admission = front.service.admission
    generation = PushedGeneration(1, None, lambda: None)
    producers: list[str] = []
    count = 300

    def handle(service, call):
        return listened_stream(generation, service.admission.claim().release, producers)

    def produce() -> None:
        for n in range(count):
            generation.push(Piece(str(n)))
        generation.finish()

    async def scenario():
        stream = await front.run(generating(handle), Call(), None)
        lines = front.sse(stream)
        assert await anext(lines) == 'data: {"opening":true}\n\n'
        await until(lambda: front._pool._work_queue.empty() and idle_pool(front))
        producer = threading.Thread(target=produce, name="producer")
        producer.start()
        rest = [line async for line in lines]
        producer.join()
        return rest

    rest = asyncio.run(scenario())
    assert rest == [f'data: {{"text":"{n}"}}\n\n' for n in range(count)] + ["data: [DONE]\n\n"]
    assert set(producers) == {"producer"}
    assert admission.in_flight == 0


def idle_pool(front: Dispatcher) -> bool:
    """No thread of the dispatcher's pool is running anything."""
    return front._pool._idle_semaphore._value == len(front._pool._threads)


def test_a_listened_stream_the_client_leaves_is_cancelled_closed_and_released():
    front = dispatcher()
    admission = front.service.admission
    looks: list[int] = []
    generation = PushedGeneration(1, None, lambda: looks.append(1))

    def handle(service, call):
        return listened_stream(generation, service.admission.claim().release, [])

    async def scenario():
        stream = await front.run(generating(handle), Call(), None)
        lines = front.sse(stream)
        await anext(lines)
        generation.push(Piece("a"))
        assert await anext(lines) == 'data: {"text":"a"}\n\n'
        await lines.aclose()  # the client hung up

    asyncio.run(scenario())
    assert generation.cancelled and looks == [1]  # the producer was asked to stop it
    assert admission.in_flight == 0
    generation.push(Piece("late"))  # the producer's next arrival reads nothing more
    generation.finish()
