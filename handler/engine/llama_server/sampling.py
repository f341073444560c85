"""The /completion body we send llama-server: the in-process sampler chain, and nothing more.

llama-server builds one sampler chain per request from the `samplers` list it is sent (its own
defaults for every field we leave out) and always ends it with a draw from the distribution
(`dist`). Until issue 15 every request listed penalties, top-k, top-p, min-p and temperature,
with `top_k` 0 (off): a greedy request then kept all 49,152 candidates of the vocabulary through
the temperature sampler (a pass that sets every logit but the best to -inf) and the draw (an exp
and two normalising passes over the whole vocabulary), for every slot and every token, on the
server's one sampling thread. At 64 slots that serial work, not the GPU, set the pace.

The in-process chain (`handler.engine.in_process.bindings.Sampler`) is: penalties over the last
64 tokens when any is set; then, at temperature 0, the most likely token; otherwise top-k (k > 0),
top-p (p < 1), min-p (p > 0), temperature and a seeded draw. We ask for exactly that chain. Greedy
is `top_k` 1: one pass keeps the best candidate and the draw of a single candidate costs nothing;
the first best wins ties, as with llama.cpp's greedy sampler. A sampler whose setting leaves the
distribution as it is, is not listed, so it costs nothing either.

With `on_backend` the chain runs on the device, in the decode graph (llama.cpp's backend
sampling: every sampler we list has a device implementation): per slot and token one id comes
back instead of 49,152 logits (196 KB) and the server's sampling thread has nothing left to do.
A grammar or logprobs need the logits on the host; those requests sample there as before
(llama-server would fall back on its own). It pays only with many slots busy: on the H200 machine
llama-server alone with `--backend-sampling` did 1.12x / 1.41x its host-sampling rate at 64
streams (buffered / streamed) but 0.94x, 0.82x and 0.75x streamed at 1, 4 and 16; so
BACKEND_SAMPLING=auto asks for it on a GPU only when a request starts with at least
`BACKEND_SAMPLING_FROM_IN_FLIGHT` generations in flight (its own included).
"""

from __future__ import annotations

from typing import Any

from handler.config import Settings
from handler.engine.generation import SamplingParams, TokenLogprob

# Same window as the in-process sampler's penalties (bindings.Sampler).
PENALTY_LAST_N = 64
# The in-process chain seeds its draw with the seed's low 32 bits; llama-server's seed is uint32.
SEED_MASK = 0xFFFFFFFF
# llama-server's "random seed" (LLAMA_DEFAULT_SEED); the in-process engine draws a random one.
RANDOM_SEED = -1
# BACKEND_SAMPLING=auto: generations in flight from which device sampling is faster (above).
BACKEND_SAMPLING_FROM_IN_FLIGHT = 32


def samples_on_backend(settings: Settings, in_flight: int) -> bool:
    """Whether a request that starts with `in_flight` generations running (its own included)
    samples on the device: BACKEND_SAMPLING on / off, or auto (GPU layers and a busy server)."""
    if settings.backend_sampling == "auto":
        return settings.n_gpu_layers != 0 and in_flight >= BACKEND_SAMPLING_FROM_IN_FLIGHT
    return settings.backend_sampling == "on"


def completion_body(
    prompt: list[int],
    params: SamplingParams,
    *,
    stream: bool,
    time_limit_ms: int | None = None,
    on_backend: bool = False,
) -> dict[str, Any]:
    """A /completion request for `prompt` sampled as `params` say (on the device with
    `on_backend`, where the request allows).

    A streamed answer is matched against the stop strings here (`StopMatcher`), token by token;
    a buffered one asks llama-server to stop at them and, with `time_limit_ms`, to stop at the
    deadline.
    """
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": params.max_tokens,
        "cache_prompt": True,
        "stream": stream,
        **sampling_fields(params),
    }
    if params.grammar:
        # Applied the same way as in-process: the chain's choice first, the grammar's mask only
        # when the grammar rejects it (llama.cpp's common sampler).
        body["grammar"] = params.grammar
    if params.logprobs is not None:
        # The model's own distribution (before sampling), as in-process; llama-server computes
        # nothing at n_probs 0, so ask for one alternative and drop it when none was wanted.
        body |= {"n_probs": max(1, params.logprobs), "post_sampling_probs": False}
    if on_backend and not params.grammar and params.logprobs is None:
        body["backend_sampling"] = True
    if not stream and params.stop:
        body["stop"] = list(params.stop)
    if not stream and time_limit_ms is not None:
        body["t_max_predict_ms"] = time_limit_ms
    return body


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """The sampling fields of a /completion body: the chain `bindings.Sampler` builds."""
    # A --mirostat in LLAMA_SERVER_ARGS would replace the whole chain: always turn it off.
    fields: dict[str, Any] = {"mirostat": 0}
    samplers: list[str] = []
    if penalised(params):
        samplers.append("penalties")
        fields |= {
            "repeat_penalty": params.repeat_penalty,
            "repeat_last_n": PENALTY_LAST_N,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
    if params.temperature <= 0:
        return {**fields, "samplers": [*samplers, "top_k"], "top_k": 1}
    if params.top_k > 0:
        samplers.append("top_k")
        fields["top_k"] = params.top_k
    if params.top_p < 1.0:
        samplers.append("top_p")
        fields |= {"top_p": params.top_p, "min_keep": 1}
    if params.min_p > 0:
        samplers.append("min_p")
        fields |= {"min_p": params.min_p, "min_keep": 1}
    samplers.append("temperature")
    seed = RANDOM_SEED if params.seed is None else params.seed & SEED_MASK
    fields |= {"temperature": params.temperature, "dynatemp_range": 0.0, "seed": seed}
    return {**fields, "samplers": samplers}


def penalised(params: SamplingParams) -> bool:
    """Whether any repetition penalty changes the logits (as `bindings.Sampler` decides)."""
    return bool(params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0)


def parse_logprobs(answer: dict[str, Any], top: int) -> list[TokenLogprob]:
    """The `completion_probabilities` of a /completion answer or chunk, with `top` alternatives."""
    return [
        TokenLogprob(
            entry.get("token", ""),
            tuple(entry.get("bytes") or ()),
            float(entry.get("logprob", 0.0)),
            tuple(
                TokenLogprob(alt.get("token", ""), tuple(alt.get("bytes") or ()), alt["logprob"])
                for alt in (entry.get("top_logprobs") or ())[:top]
            ),
        )
        for entry in answer.get("completion_probabilities") or ()
    ]
