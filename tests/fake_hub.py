"""A Hugging Face Hub on loopback serving one repo from a local folder: the endpoints huggingface_hub calls
to list a repo and download or range-read its files, with a log of every request and the bytes sent."""

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str  # the repo file, or the API route
    range: str | None
    sent: int  # body bytes


class FakeHub:
    """`with FakeHub(repo_id, folder) as hub:` serves `folder` as `repo_id` at `hub.endpoint`."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.requests = repo_id, []
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        api = f"/api/models/{self.repo_id}/"
        resolve = re.fullmatch(rf"/{re.escape(self.repo_id)}/resolve/[^/]+/(.+)", path)
        if path.startswith(api + "revision/"):
            info = {"id": self.repo_id, "sha": COMMIT, "siblings": [{"rfilename": name} for name in self.files]}
            self._send(handler, 200, json.dumps(info).encode(), body, path, {"Content-Type": "application/json"})
        elif path.startswith(api + "tree/"):
            tree = [{"type": "file", "oid": _oid(data), "size": len(data), "path": n} for n, data in self.files.items()]
            self._send(handler, 200, json.dumps(tree).encode(), body, path, {"Content-Type": "application/json"})
        elif resolve and resolve[1] in self.files:
            self._send_file(handler, resolve[1], body)
        else:
            self._send(handler, 404, b"not found", body, path, {"X-Error-Code": "EntryNotFound"})

    def _send_file(self, handler: BaseHTTPRequestHandler, name: str, body: bool) -> None:
        data, asked = self.files[name], handler.headers.get("Range")
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(data)}"', "Accept-Ranges": "bytes"}
        if asked:
            first, last = (int(n) for n in re.fullmatch(r"bytes=(\d+)-(\d+)", asked).groups())
            part = data[first : min(last, len(data) - 1) + 1]
            headers["Content-Range"] = f"bytes {first}-{first + len(part) - 1}/{len(data)}"
            self._send(handler, 206, part, body, name, headers)
        else:
            self._send(handler, 200, data, body, name, headers)

    def _send(self, handler, status: int, data: bytes, body: bool, path: str, headers: dict) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
        self.requests.append(Request(handler.command, path, handler.headers.get("Range"), len(data) if body else 0))


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
