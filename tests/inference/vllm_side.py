"""The vLLM side of tests/inference/test_vllm_engine.py, run with the vLLM environment's python.

    python tests/inference/vllm_side.py JOB.json OUT.json

JOB: {"model", "documents", "instructions", "stock_readout_model", "schema"}. Answers every pair
with a float32 `VLLMEngine` (ask_batch), streams the first pair, asks through the server's API
(ours and the OpenAI-compatible one, text documents and an image part, the openai client plain and
streamed; schema-constrained answers and a schema vLLM's grammar backend cannot enforce), and
answers the pairs again with the stock-readout copy of the model (what vLLM serves when the
plugin's readout is missing).
"""

import json
import sys


def main() -> None:
    from deepsynth.inference.interface import Engine
    from deepsynth.vllm.engine import VLLMEngine, VLLMOptions

    job = json.loads(open(sys.argv[1]).read())
    options = VLLMOptions(dtype="float32", kv_cache_gib=1, max_num_seqs=8)
    out = {}
    with VLLMEngine(job["model"], options=options) as engine:
        out["answers"] = [a.to_dict() for a in engine.ask_batch(job["documents"], job["instructions"])]
        pieces = list(engine.stream(job["documents"][0], job["instructions"][0]))
        out["stream_pieces"], out["stream_final"] = pieces[:-1], pieces[-1].to_dict()
        out["describe"] = engine.describe()
        out["is_engine"] = isinstance(engine, Engine)
        out["api"] = through_api(engine, job)
    with VLLMEngine(job["stock_readout_model"], options=options) as engine:
        out["stock_readout_answers"] = [a.answer for a in engine.ask_batch(job["documents"], job["instructions"])]
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


def through_api(engine, job: dict) -> dict:
    import base64

    from fastapi.testclient import TestClient

    from deepsynth.inference.engine import encode_png
    from deepsynth.serve import ServeConfig, create_app

    result = {"ours": [], "openai": [], "errors": []}
    with TestClient(create_app(engine, ServeConfig())) as client:
        for doc, instruction in zip(job["documents"], job["instructions"]):
            r = client.post("/api/inference/instruct", json={"text": doc, "instruction": instruction})
            result["ours"].append(r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text})
            r = client.post("/v1/chat/completions", json={
                "model": engine.name, "messages": [{"role": "user", "content": instruction}],
                "document": {"text": doc}})
            result["openai"].append(r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                                    else {"status": r.status_code, "body": r.text})
        page = encode_png(engine.pages_for(job["documents"][0])[0])
        url = "data:image/png;base64," + base64.b64encode(page).decode()
        r = client.post("/v1/chat/completions", json={"model": engine.name, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": job["instructions"][0]}]}]})
        result["openai_image"] = (r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                                  else {"status": r.status_code, "body": r.text})
        result["schema_answers"] = []
        for doc in job["documents"]:
            r = client.post("/api/inference/instruct", json={"text": doc, "instruction": "extract",
                                                             "json_schema": job["schema"], "max_new_tokens": 64})
            result["schema_answers"].append(r.json() if r.status_code == 200 else {"status": r.status_code,
                                                                                   "body": r.text})
        r = client.post("/v1/chat/completions", json={
            "model": engine.name, "messages": [{"role": "user", "content": "extract"}], "max_tokens": 64,
            "document": {"text": job["documents"][0]},
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": job["schema"]}}})
        result["openai_schema"] = (r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                                   else {"status": r.status_code, "body": r.text})
        # the openai Python client (over the test client's transport), plain and streamed
        import openai

        oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
        messages = [{"role": "user", "content": job["instructions"][0]}]
        document = {"document": {"text": job["documents"][0]}}
        reply = oa.chat.completions.create(model=engine.name, messages=messages, extra_body=document)
        result["openai_client"] = reply.choices[0].message.content
        chunks = oa.chat.completions.create(model=engine.name, messages=messages, extra_body=document, stream=True)
        result["openai_client_stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # a string with both a pattern and a length bound: xgrammar cannot compile it
        unsupported = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$",
                                                                 "maxLength": 4}}}
        r = client.post("/api/inference/instruct", json={"text": job["documents"][0], "instruction": "extract",
                                                         "json_schema": unsupported, "max_new_tokens": 32})
        result["unsupported_schema"] = {"status": r.status_code, "body": r.json()}
    return result


if __name__ == "__main__":  # vLLM spawns its engine processes: the work stays behind this guard
    main()
