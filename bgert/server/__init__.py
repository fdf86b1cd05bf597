"""``bgert serve``: an HTTP server with OpenAI-, TEI- and Cohere/Jina-compatible endpoints over each
model's token-counted queue (needs the ``serve`` extra: fastapi, uvicorn, prometheus-client, orjson)."""
