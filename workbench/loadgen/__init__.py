"""The load generator: drives any OpenAI-compatible server over HTTP through the official openai client.
It must not import the engine: it measures our server, vLLM, SGLang or anything else unchanged."""
