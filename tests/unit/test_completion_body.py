"""GIVEN a request's sampling parameters WHEN the llama-server engine builds its /completion body
THEN the body asks for exactly the in-process sampler chain (bindings.Sampler) and no sampler that
leaves the distribution unchanged: greedy is top_k 1, penalties only when set, top-k/top-p/min-p
only as requested (issue 15: top_k 0 at temperature 0 made every token cost passes over the
whole vocabulary on llama-server's sampling thread)."""

from __future__ import annotations

import pytest

from handler.engine.generation import SamplingParams
from handler.engine.llama_server.sampling import completion_body

PROMPT = [1, 2, 3]


def test_greedy_keeps_one_candidate_and_nothing_else():
    body = completion_body(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), stream=True)
    assert body == {
        "prompt": PROMPT,
        "n_predict": 8,
        "cache_prompt": True,
        "stream": True,
        "mirostat": 0,
        "samplers": ["top_k"],
        "top_k": 1,
    }


def test_greedy_ignores_top_p_and_seed_as_the_in_process_chain_does():
    params = SamplingParams(max_tokens=8, temperature=0.0, top_p=0.5, seed=7, min_p=0.1)
    body = completion_body(PROMPT, params, stream=True)
    assert body["samplers"] == ["top_k"] and body["top_k"] == 1
    assert not {"top_p", "min_p", "seed", "temperature"} & body.keys()


def test_penalties_come_first_and_only_when_set():
    params = SamplingParams(max_tokens=4, temperature=0.0, presence_penalty=0.5)
    body = completion_body(PROMPT, params, stream=True)
    assert body["samplers"] == ["penalties", "top_k"]
    assert body["presence_penalty"] == 0.5
    assert body["frequency_penalty"] == 0.0
    assert body["repeat_penalty"] == 1.0
    assert body["repeat_last_n"] == 64  # bindings.Sampler's window
    frequency = SamplingParams(max_tokens=4, temperature=0.7, frequency_penalty=-0.25)
    assert completion_body(PROMPT, frequency, stream=True)["samplers"][0] == "penalties"


def test_temperature_with_top_p_is_top_p_then_temperature_then_the_draw():
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9)
    body = completion_body(PROMPT, params, stream=True)
    assert body == {
        "prompt": PROMPT,
        "n_predict": 16,
        "cache_prompt": True,
        "stream": True,
        "mirostat": 0,
        "samplers": ["top_p", "temperature"],
        "top_p": 0.9,
        "min_keep": 1,
        "temperature": 0.8,
        "dynatemp_range": 0.0,
        "seed": -1,  # llama-server draws a random seed, as the in-process engine does
    }


def test_plain_temperature_samples_the_whole_distribution():
    body = completion_body(PROMPT, SamplingParams(max_tokens=4), stream=True)
    assert body["samplers"] == ["temperature"]
    assert body["temperature"] == 1.0
    assert "top_k" not in body and "top_p" not in body and "min_p" not in body


def test_top_k_top_p_min_p_in_the_in_process_order():
    params = SamplingParams(max_tokens=4, temperature=0.5, top_k=40, top_p=0.95, min_p=0.05)
    body = completion_body(PROMPT, params, stream=True)
    assert body["samplers"] == ["top_k", "top_p", "min_p", "temperature"]
    assert (body["top_k"], body["top_p"], body["min_p"]) == (40, 0.95, 0.05)


def test_seed_is_sent_as_the_in_process_engine_uses_it():
    seeded = SamplingParams(max_tokens=4, temperature=0.7, seed=42)
    assert completion_body(PROMPT, seeded, stream=True)["seed"] == 42
    # bindings.Sampler seeds with the low 32 bits; llama-server's seed is a uint32.
    negative = SamplingParams(max_tokens=4, temperature=0.7, seed=-2)
    assert completion_body(PROMPT, negative, stream=True)["seed"] == 0xFFFFFFFE
    large = SamplingParams(max_tokens=4, temperature=0.7, seed=2**40 + 5)
    assert completion_body(PROMPT, large, stream=True)["seed"] == 5


def test_a_buffered_body_carries_the_stops_and_the_time_limit():
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=("8", "\n\n"))
    buffered = completion_body(PROMPT, params, stream=False, time_limit_ms=1500)
    assert buffered["stream"] is False
    assert buffered["stop"] == ["8", "\n\n"]
    assert buffered["t_max_predict_ms"] == 1500
    # A streamed answer is matched against the stops here, token by token (StopMatcher).
    streamed = completion_body(PROMPT, params, stream=True, time_limit_ms=1500)
    assert "stop" not in streamed and "t_max_predict_ms" not in streamed
    no_stops = completion_body(PROMPT, SamplingParams(max_tokens=4), stream=False)
    assert "stop" not in no_stops and "t_max_predict_ms" not in no_stops


def test_backend_sampling_is_asked_for_where_the_request_allows():
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    assert completion_body(PROMPT, greedy, stream=True, on_backend=True)["backend_sampling"]
    drawn = SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, presence_penalty=0.5, seed=1)
    assert completion_body(PROMPT, drawn, stream=False, on_backend=True)["backend_sampling"]
    assert "backend_sampling" not in completion_body(PROMPT, greedy, stream=True)
    # A grammar and logprobs need the logits on the host.
    grammar = SamplingParams(max_tokens=4, grammar='root ::= "a"')
    assert "backend_sampling" not in completion_body(PROMPT, grammar, stream=True, on_backend=True)
    logprobs = SamplingParams(max_tokens=4, logprobs=2)
    assert "backend_sampling" not in completion_body(PROMPT, logprobs, stream=True, on_backend=True)


@pytest.mark.parametrize(
    ("env", "in_flight", "expected"),
    [
        ({}, 64, False),  # no GPU layers: host sampling
        ({"N_GPU_LAYERS": "-1"}, 64, True),
        ({"N_GPU_LAYERS": "12"}, 32, True),
        ({"N_GPU_LAYERS": "-1"}, 31, False),  # few slots busy: host sampling is faster
        ({"N_GPU_LAYERS": "-1"}, 1, False),
        ({"N_GPU_LAYERS": "-1", "BACKEND_SAMPLING": "off"}, 64, False),
        ({"BACKEND_SAMPLING": "on"}, 1, True),
    ],
)
def test_backend_sampling_needs_a_gpu_and_a_busy_server_unless_set(env, in_flight, expected):
    from handler.config import load_settings
    from handler.engine.llama_server.sampling import samples_on_backend

    assert samples_on_backend(load_settings(env), in_flight) is expected


GPU = {"N_GPU_LAYERS": "-1"}


@pytest.mark.parametrize(
    ("env", "in_flight", "expected"),
    [
        ({"PARALLEL_SLOTS": "64", **GPU}, 1, False),  # auto: slots are plentiful, one answer
        ({"PARALLEL_SLOTS": "64", **GPU}, 32, False),  # half the slots still free
        ({"PARALLEL_SLOTS": "64", **GPU}, 33, True),  # slots are scarce: a hang-up frees one
        ({"PARALLEL_SLOTS": "64", "N_GPU_LAYERS": "12"}, 1, False),
        ({"PARALLEL_SLOTS": "64"}, 1, True),  # on the CPU a request that runs on costs compute
        ({"PARALLEL_SLOTS": "2", **GPU}, 1, False),
        ({"PARALLEL_SLOTS": "2", **GPU}, 2, True),
        ({"PARALLEL_SLOTS": "1", **GPU}, 1, True),  # one slot: one that runs on blocks the rest
        ({"PARALLEL_SLOTS": "64", **GPU, "BUFFERED_HANGUP": "cancel"}, 1, True),
        ({"PARALLEL_SLOTS": "64", "BUFFERED_HANGUP": "finish"}, 64, False),
    ],
)
def test_a_hang_up_cancels_on_the_cpu_or_once_half_the_slots_are_busy(env, in_flight, expected):
    from handler.config import load_settings
    from handler.engine.llama_server.engine import hangup_cancels

    settings = load_settings({"INFERENCE_ENGINE": "llama-server", **env})
    assert hangup_cancels(settings, in_flight) is expected
