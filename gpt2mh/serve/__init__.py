"""`gpt2mh serve`: an HTTP server whose requests share one engine (`gpt2mh.inference.engine`).

    server.py   uvicorn, the worker thread, draining on SIGTERM
    app.py      the routes: /v1/generate, /v1/score, /health, /ready, /metrics, / (the playground)
    openai.py   /v1/completions, /v1/models (OpenAI-compatible, one head per model name)
    gate.py     API key, draining, requests in flight, latency (an ASGI layer before the routes)
    calls.py    one request in the worker, seen from the event loop: timeout, disconnect, cancel
    worker.py   the engine's thread: a queue in, events out, a failing input isolated
    schemas.py  bodies -> library configs, errors as {"error": {...}}
    wire.py     the body under its size limit, server-sent events, ids -> text
    metrics.py  Prometheus metrics
"""
