"""A tiny stand-in for the Hugging Face Hub's ``resolve`` endpoint, served on 127.0.0.1 for tests."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubServer:
    """Serves ``/{repo_id}/resolve/{revision}/{path}`` from ``files[(repo_id, revision, path)] = bytes``.

    Every request is recorded in ``requests`` as ``(method, path)``. Failures to test against: repositories in
    ``gated`` answer 403 (the Hub's ``GatedRepo``), and file paths in ``truncated`` send half their body and close
    the connection (an interrupted transfer).
    """

    def __init__(self) -> None:
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.gated: set[str] = set()
        self.truncated: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _serve(self, with_body: bool) -> None:
                server.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].lstrip("/").split("/")
                try:
                    i = parts.index("resolve")
                except ValueError:
                    self.send_error(404)
                    return
                repo_id, revision, path = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :])
                if repo_id in server.gated:
                    self._hub_error(403, "GatedRepo", "Access to this repository is restricted")
                    return
                data = server.files.get((repo_id, revision, path))
                if data is None:
                    self._hub_error(404, "EntryNotFound", "Entry not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", revision)
                self.end_headers()
                if with_body and path in server.truncated:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                elif with_body:
                    self.wfile.write(data)

            def _hub_error(self, status: int, code: str, message: str) -> None:
                """An error as the Hub sends it: the status, and the error code and message in headers."""
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(with_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(with_body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def add_folder(self, repo_id: str, revision: str, subfolder: str, folder: Path) -> None:
        for file in sorted(folder.iterdir()):
            self.files[(repo_id, revision, f"{subfolder}/{file.name}")] = file.read_bytes()

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
