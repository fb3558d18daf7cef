"""OpenAI-compatible serving of the workspace model: gateway, engines, batching, hot swap.

    from evertune.serving import Gateway
    gateway = Gateway(ws)                 # serves NAME, NAME@prod, NAME@qa, NAME@base, NAME@vN
    app.include_router(gateway.router)
    gateway.start()                       # in the lifespan; gateway.stop() on shutdown

- `gateway.py`: `Gateway` (routes, name resolution, alias follower, hot swap), `make_engine`.
- `engine.py`: the `Engine` protocol, `GenRequest`, events, `EngineError`.
- `transformers_engine.py`: `TransformersEngine` (in-process, dynamic batching).
- `vllm_engine.py`: `VllmEngine` (runs `vllm serve --enable-lora`, proxies to it).
- `decode.py`: the batched, streaming, per-row-parameter decode loop.
- `protocol.py`: OpenAI request validation, response shapes, errors, SSE.
- `names.py`: model-name parsing; `keys.py`: serving API keys.
"""

from evertune.serving.engine import BASE_KEY, Engine, EngineError, Finished, GenRequest, TextDelta
from evertune.serving.gateway import Gateway, make_engine
from evertune.serving.protocol import OpenAIError

__all__ = [
    "BASE_KEY",
    "Engine",
    "EngineError",
    "Finished",
    "Gateway",
    "GenRequest",
    "OpenAIError",
    "TextDelta",
    "make_engine",
]
