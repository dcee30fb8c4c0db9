"""Runs inside the vLLM environment (`make vllm-env`), one process per model, driven by tests/test_vllm.py.

    python -m tests.vllm_worker offline JOB.json   → greedy tokens and their logprobs per dtype, as JSON on stdout
    python -m tests.vllm_worker server JOB.json    → one OpenAI-compatible completion from a server on 127.0.0.1

JOB.json: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n, "dtypes": ["float32", ...],
           "max_model_len": n, "prompt_text": str (server)}. The answer is the last stdout line, prefixed "RESULT ".
Nothing here compares: the test process computes the transformers reference in its own environment and compares.
"""

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # ≈ 20 s start-up per model instead of ≈ 60 s
os.environ.setdefault("VLLM_PLUGINS", "netmorph")  # only netmorph's plugin: the one under test


def offline(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import netmorph.integrations.vllm as plugin

    results = {"plugin": plugin.__file__}
    for dtype in job["dtypes"]:
        started = time.perf_counter()
        llm = LLM(model=job["model"], dtype=dtype, enforce_eager=job.get("enforce_eager", True), max_model_len=job["max_model_len"],
                  gpu_memory_utilization=0.1, distributed_executor_backend="uni", skip_tokenizer_init=True,
                  seed=0, max_num_seqs=len(job["prompts"]))
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params,
                               use_tqdm=False)
        tokens = [list(output.outputs[0].token_ids) for output in outputs]
        logprobs = [[step[token].logprob for token, step in zip(ids, output.outputs[0].logprobs)]
                    for ids, output in zip(tokens, outputs)]
        results[dtype] = {"tokens": tokens, "logprobs": logprobs, "seconds": time.perf_counter() - started}
        del llm
        gc.collect()
    return results


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server(job: dict) -> dict:
    """Start the OpenAI-compatible server on 127.0.0.1, wait for /health (bounded), send one greedy completion, stop
    the server (terminate, then kill) whatever happens."""
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", job["model"],
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", str(job["max_model_len"]), "--gpu-memory-utilization", "0.1",
               "--distributed-executor-backend", "uni", "--served-model-name", "netmorph-tiny"]
    log = open(job["log"], "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {process.returncode} before it was ready")
            if time.perf_counter() - started > job["ready_timeout"]:
                raise TimeoutError(f"the vLLM server was not ready within {job['ready_timeout']} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(1)
        ready = time.perf_counter() - started
        body = json.dumps({"model": "netmorph-tiny", "prompt": job["prompt_text"], "max_tokens": job["max_tokens"],
                           "temperature": 0.0, "ignore_eos": True, "return_tokens_as_token_ids": True,
                           "logprobs": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            completion = json.load(answer)
        return {"completion": completion, "ready_seconds": ready}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as handle:
        job = json.load(handle)
    result = offline(job) if mode == "offline" else server(job)
    print("RESULT " + json.dumps(result), flush=True)
