"""One router per API: ours (/api, plus /health and /metrics), the OpenAI-compatible one (/v1),
and the web page (/)."""
