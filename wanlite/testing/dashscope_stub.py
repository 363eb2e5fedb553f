"""A stand-in for DashScope's OpenAI-compatible chat endpoint on 127.0.0.1, for tests and offline checks.

    with serve(key="sk-test") as stub:           # mode: ok | slow | malformed | error
        os.environ["DASHSCOPE_BASE_URL"] = stub.base_url
        ...
    stub.requests                                # the JSON bodies it received

`ok` answers a chat completion whose text names the model and repeats the user's prompt (so a test can see
the prompt arrived); `slow` waits `delay` seconds before answering (a timeout); `malformed` answers 200 with
a body that is not a completion; `error` answers HTTP 500. A missing or wrong `Authorization: Bearer KEY`
gets 401 with DashScope's error body, whatever the mode.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = "/compatible-mode/v1/chat/completions"


class DashScopeStub:
    def __init__(self, key: str, mode: str = "ok", delay: float = 5.0):
        self.key, self.mode, self.delay = key, mode, delay
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/compatible-mode/v1"

    def answer(self, body: dict) -> str:
        user = body["messages"][-1]["content"]
        text = user if isinstance(user, str) else " ".join(p["text"] for p in user if p.get("type") == "text")
        image = "" if isinstance(user, str) else " with an image"
        return f'"  A detailed scene from {body["model"]}{image}: {text}, in soft morning light. "'


def _handler(stub: DashScopeStub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, payload: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            stub.requests.append(body)
            if self.path != PATH:
                return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
            if self.headers.get("Authorization") != f"Bearer {stub.key}":
                return self._send(401, json.dumps({"error": {
                    "message": "Incorrect API key provided.", "type": "invalid_request_error",
                    "code": "invalid_api_key"}}).encode())
            if stub.mode == "slow":
                time.sleep(stub.delay)
            if stub.mode == "malformed":
                return self._send(200, b"<html>gateway says hello</html>", "text/html")
            if stub.mode == "error":
                return self._send(500, json.dumps({"code": "InternalError", "message": "something broke"}).encode())
            completion = {"id": "chatcmpl-stub", "object": "chat.completion", "model": body.get("model"),
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": stub.answer(body)}}]}
            try:
                self._send(200, json.dumps(completion, ensure_ascii=False).encode())
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

    return Handler


@contextmanager
def serve(key: str, mode: str = "ok", delay: float = 5.0):
    """Run a stub on a free port of 127.0.0.1 for the `with` block."""
    stub = DashScopeStub(key, mode, delay)
    stub.thread.start()
    try:
        yield stub
    finally:
        stub.server.shutdown()
        stub.server.server_close()
