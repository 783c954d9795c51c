"""A Hub-compatible HTTP server on 127.0.0.1 for the push tests: the endpoints that
huggingface_hub's create_repo and upload_folder use (repository creation, YAML validation,
preupload, the LFS batch API with basic PUT uploads and verify, and the NDJSON commit).
Files land in ``self.repos[repo_id][path] = bytes``; every request is recorded."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".png", ".bin")


class HubServer:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.fail_with: int | None = None  # answer every request with this status
        self.created: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, payload=None) -> None:
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                body = self._body()
                server.requests.append({"method": method, "path": self.path,
                                        "authorization": self.headers.get("Authorization")})
                if server.fail_with is not None:
                    return self._reply(server.fail_with, {"error": f"simulated {server.fail_with}"})
                path = self.path.split("?")[0]
                endpoint = f"http://127.0.0.1:{server.port}"
                if method == "POST" and path == "/api/repos/create":
                    info = json.loads(body)
                    repo_id = f"{info['organization']}/{info['name']}" if info.get("organization") else info["name"]
                    server.created.append(info)
                    server.repos.setdefault(repo_id, {})
                    return self._reply(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id})
                if method == "POST" and path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if method == "POST" and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "shouldIgnore": False,
                         "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                        for f in files
                    ]})
                if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                    objects = json.loads(body)["objects"]
                    return self._reply(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "actions": {
                            "upload": {"href": f"{endpoint}/lfs-upload/{o['oid']}"},
                            "verify": {"href": f"{endpoint}/lfs-verify"}}}
                        for o in objects
                    ]})
                if method == "PUT" and path.startswith("/lfs-upload/"):
                    oid = path.rsplit("/", 1)[1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._reply(400, {"error": "sha256 mismatch"})
                    server.lfs[oid] = body
                    return self._reply(200, {})
                if method == "POST" and path == "/lfs-verify":
                    oid = json.loads(body)["oid"]
                    return self._reply(200 if oid in server.lfs else 404, {})
                if method == "POST" and "/commit/" in path:
                    repo_id = path[len("/api/models/"):].split("/commit/")[0]
                    files = server.repos.setdefault(repo_id, {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            files[item["value"]["path"]] = server.lfs[item["value"]["oid"]]
                    oid = hashlib.sha1(body).hexdigest()
                    return self._reply(200, {"commitUrl": f"{endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                             "pullRequestUrl": None})
                return self._reply(404, {"error": f"not served by the test Hub: {method} {path}"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
