"""GIVEN the real model WHEN the engine loads, warms and generates THEN states and limits hold."""

from __future__ import annotations

import time

import pytest

from handler.engine import EngineState, SamplingParams
from handler.engine.in_process.engine import InProcessEngine
from handler.errors import ModelNotReady
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


def test_lazy_engine_goes_cold_loading_ready_warm():
    engine = InProcessEngine(make_settings(WARMUP="lazy"))
    assert engine.state is EngineState.COLD
    engine.start()
    assert engine.wait_loaded(60) is EngineState.READY
    status = engine.warm_up()
    assert status.state is EngineState.WARM
    assert status.phases.load_s is not None and status.phases.warmup_s is not None


def test_warmup_at_init_is_warm_once_loaded():
    engine = InProcessEngine(make_settings(WARMUP="init"))
    engine.start()
    engine.wait_loaded(60)
    deadline = time.monotonic() + 30
    while engine.state is not EngineState.WARM and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.state is EngineState.WARM


def test_greedy_generation_is_deterministic_and_counts_tokens(engine):
    prompt = engine.tokenize("The capital of France is")
    params = SamplingParams(max_tokens=8, temperature=0.0)
    first = engine.generate(prompt, params)
    text = first.text()
    again = engine.generate(prompt, params).text()
    assert text == again and text
    assert first.result.completion_tokens == 8
    assert first.result.finish_reason == "length"
    assert first.result.prompt_tokens == len(prompt)


def test_deadline_stops_generation_with_length(engine):
    prompt = engine.tokenize("1, 2, 3, 4, 5, 6,")
    generation = engine.generate(
        prompt, SamplingParams(max_tokens=500, temperature=0.0), deadline=time.monotonic() + 0.3
    )
    text = generation.text()
    assert generation.result.finish_reason == "length"
    assert 0 < generation.result.completion_tokens < 500
    assert text


def test_cancel_stops_generation(engine):
    prompt = engine.tokenize("1, 2, 3, 4, 5, 6,")
    generation = engine.generate(prompt, SamplingParams(max_tokens=500, temperature=0.0))
    for _ in generation:
        generation.cancel()
    assert generation.result.completion_tokens < 500


def test_corrupt_model_fails_with_reason_naming_the_path(tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(make_settings().model_uri, "rb") as src:
        bad.write_bytes(src.read(1 << 20))  # valid header, tensors cut off
    engine = InProcessEngine(make_settings(MODEL_URI=str(bad)))
    engine.start()
    assert engine.wait_loaded(60) is EngineState.FAILED
    assert str(bad) in engine.status().reason
    with pytest.raises(ModelNotReady) as info:
        engine.require_loaded(None)
    assert info.value.status == 503 and str(bad) in info.value.message


def test_buffered_generation_hands_over_one_piece_with_the_same_text(engine):
    prompt = engine.tokenize("1, 2, 3, 4,")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    streamed = list(engine.generate(prompt, params))
    buffered = list(engine.generate(prompt, params, streaming=False))
    assert len(streamed) > 1
    assert buffered == ["".join(streamed)]
