"""A scripted OpenAI-compatible endpoint for the llm judge's tests: the real `openai` client talks to it over real
sockets on 127.0.0.1 (an ephemeral port, a thread of the test's process), so no network is needed. The fixtures
`server_factory` and `template` (conftest.py) start it and write the test template."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from salsa_lightning.evaluation.llm_judge import LLMJudgeSpec

MODEL, OTHER_MODEL = "judge-model", "judge-model-2"
KEY_ENV = "SALSA_TEST_JUDGE_KEY"
# a test template with markers the scripted server can split on (and proof that the template is replaceable)
TEST_TEMPLATE = {"system": "Judge fairly.", "user": "<<<Q>>>{question}<<<A>>>{answer_a}<<<B>>>{answer_b}<<<END>>>"}


@dataclass
class Answer:
    """What the server does with one chat request."""

    content: str | None = None  # the reply text (status 200)
    status: int = 200
    delay: float = 0.0
    raw: bytes | None = None  # a body sent as is (malformed JSON)


def shown(body: dict) -> tuple[str, str, str]:
    """(question, answer shown as A, answer shown as B) of a request built from TEST_TEMPLATE."""
    user = body["messages"][-1]["content"]
    q, rest = user.removeprefix("<<<Q>>>").split("<<<A>>>", 1)
    a, rest = rest.split("<<<B>>>", 1)
    return q, a, rest.removesuffix("<<<END>>>")


class JudgeServer:
    """An OpenAI-compatible endpoint: /v1/models lists MODEL, /v1/chat/completions answers `script(body, attempt)`,
    `attempt` counting earlier requests with the same messages (0 for the first)."""

    def __init__(self, script: Callable[[dict, int], Answer]) -> None:
        self.script = script
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a time-out test)
                    pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    data = [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in (MODEL, OTHER_MODEL)
                    ]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                with server._lock:
                    server.bodies.append(body)
                    key = json.dumps(body["messages"])
                    attempt = server._seen[key]
                    server._seen[key] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    answer = server.script(body, attempt)
                    time.sleep(answer.delay)
                    if answer.raw is not None:
                        return self._send(answer.status, answer.raw)
                    if answer.status != 200:
                        error = {"error": {"message": f"scripted {answer.status}", "type": "test", "code": None}}
                        return self._send(answer.status, json.dumps(error).encode())
                    completion = {
                        "id": f"c{len(server.bodies)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer.content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
                    }
                    self._send(200, json.dumps(completion).encode())
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def prefers(word: str) -> Callable[[dict, int], Answer]:
    """A consistent judge: the answer containing `word` wins, whichever position it is shown in."""

    def script(body: dict, attempt: int) -> Answer:
        _, a, b = shown(body)
        if (word in a) == (word in b):
            return Answer("Both are alike.\n[[C]]")
        return Answer("A is clearly better.\n[[A]]" if word in a else "Verdict below.\n[[B]]")

    return script


def spec(server: JudgeServer, template_path: str, **overrides) -> LLMJudgeSpec:
    kwargs = {
        "model": MODEL,
        "base_url": server.url,
        "api_key_env": KEY_ENV,
        "template": template_path,
        "max_concurrency": 4,
        "max_retries": 3,
        "backoff_s": 0.01,
        "timeout_s": 5.0,
        **overrides,
    }
    return LLMJudgeSpec(**kwargs)


def by_hash(body: dict, attempt: int) -> Answer:
    """A consistent judge for gibberish responses: the answer with the larger hash wins, in either position."""
    _, a, b = shown(body)
    ha, hb = (hashlib.sha256(x.encode()).hexdigest() for x in (a, b))
    return Answer("[[A]]" if ha > hb else "[[B]]" if hb > ha else "[[C]]")
