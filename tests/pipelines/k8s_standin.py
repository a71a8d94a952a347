"""A STAND-IN for the Kubernetes API server, on 127.0.0.1: no real API server can run here.

It serves the REST paths the launcher calls through the real `kubernetes` client (create, get and
delete a PyTorchJob; list pods by label; follow a pod's log) and lets a test play the operator:
set job conditions, make pods, start/restart/stop their container, write log lines, and take the
whole API down for a while (503 on every request).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from kubernetes import client as k8s

JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StandInApiServer:
    def __init__(self, tls: tuple[str, str] | None = None):
        """`tls`: (certificate, key) files to serve HTTPS, as a real API server does."""
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.logs: dict[tuple[str, int], list[str]] = {}  # (pod, restart count) -> lines
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self.authorizations: list[str] = []  # the Authorization header of each request
        self.down_until = 0.0
        self.lock = threading.Lock()
        self._pod_seq = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # log streams are chunked, as the real API server sends them

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self, "GET")

            def do_POST(self):
                server._handle(self, "POST")

            def do_DELETE(self):
                server._handle(self, "DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def configuration(self) -> k8s.Configuration:
        cfg = k8s.Configuration()
        cfg.host = self.url
        cfg.retries = 0
        return cfg

    # --- what the test does as the operator -------------------------------------------------
    def down_for(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def put_job(self, name: str, *conditions: str, namespace: str = "clipforge") -> dict:
        obj = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
               "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())}, "spec": {}}
        with self.lock:
            self.jobs[name] = obj
        for cond in conditions:
            self.set_condition(name, cond)
        return obj

    def set_condition(self, name: str, kind: str, reason: str = "", message: str = "") -> None:
        with self.lock:
            status = self.jobs[name].setdefault("status", {})
            status.setdefault("conditions", []).append(
                {"type": kind, "status": "True", "reason": reason or f"PyTorchJob{kind}", "message": message,
                 "lastTransitionTime": _now()})

    def add_pod(self, job: str, replica_type: str = "master", index: int = 0) -> str:
        with self.lock:
            self._pod_seq += 1
            name = f"{job}-{replica_type}-{index}-{self._pod_seq}"
            self.pods[name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "clipforge", "uid": str(uuid.uuid4()),
                             "creationTimestamp": f"2026-01-01T00:00:{self._pod_seq:02d}Z",
                             "labels": {"training.kubeflow.org/job-name": job,
                                        "training.kubeflow.org/replica-type": replica_type,
                                        "training.kubeflow.org/replica-index": str(index)}},
                "spec": {"containers": [{"name": "pytorch", "image": "train"}]},
                "status": {"phase": "Pending", "containerStatuses": [self._container(0, {"waiting": {}})]}}
        return name

    @staticmethod
    def _container(restarts: int, state: dict) -> dict:
        return {"name": "pytorch", "image": "train", "imageID": "", "ready": "running" in state,
                "restartCount": restarts, "state": state}

    def start_container(self, pod: str) -> None:
        with self.lock:
            status = self.pods[pod]["status"]
            restarts = status["containerStatuses"][0]["restartCount"]
            if "waiting" not in status["containerStatuses"][0]["state"]:
                restarts += 1  # the kubelet restarted it (restartPolicy OnFailure)
            status["phase"] = "Running"
            status["containerStatuses"] = [self._container(restarts, {"running": {"startedAt": _now()}})]
            self.logs.setdefault((pod, restarts), [])

    def stop_container(self, pod: str, exit_code: int = 0) -> None:
        with self.lock:
            status = self.pods[pod]["status"]
            restarts = status["containerStatuses"][0]["restartCount"]
            status["containerStatuses"] = [self._container(restarts, {"terminated": {"exitCode": exit_code}})]

    def write_log(self, pod: str, *lines: str) -> None:
        with self.lock:
            restarts = self.pods[pod]["status"]["containerStatuses"][0]["restartCount"]
            self.logs[(pod, restarts)].extend(lines)

    def delete_pod(self, pod: str) -> None:
        with self.lock:
            self.pods.pop(pod, None)

    def calls(self, method: str, kind: str = "pytorchjobs") -> list[int]:
        return [status for m, path, status in self.requests if m == method and kind in path]

    # --- the REST API --------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        with self.lock:
            self.authorizations.append(req.headers.get("Authorization", ""))
        if time.monotonic() < self.down_until:
            return self._answer(req, method, url.path, 503, _status(503, "ServiceUnavailable", "API restarting"))
        if m := JOBS.match(url.path):
            return self._jobs(req, method, url.path, m.group(2))
        if (m := PODS.match(url.path)) and method == "GET":
            return self._list_pods(req, url)
        if (m := LOG.match(url.path)) and method == "GET":
            return self._follow_log(req, m.group(2), parse_qs(url.query))
        return self._answer(req, method, url.path, 404, _status(404, "NotFound", url.path))

    def _jobs(self, req, method: str, path: str, name: str | None) -> None:
        if method == "POST":
            body = json.loads(req.rfile.read(int(req.headers["Content-Length"])))
            name = body["metadata"]["name"]
            with self.lock:
                if name in self.jobs:
                    return self._answer(req, method, path, 409, _status(409, "AlreadyExists", f"{name} exists"))
                body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now())
                self.jobs[name] = body
            return self._answer(req, method, path, 201, body)
        with self.lock:
            obj = self.jobs.get(name)
            if obj is not None and method == "DELETE":
                del self.jobs[name]
                for pod in [p for p, o in self.pods.items()
                            if o["metadata"]["labels"]["training.kubeflow.org/job-name"] == name]:
                    del self.pods[pod]
        if obj is None:
            return self._answer(req, method, path, 404, _status(404, "NotFound", f"{name} not found"))
        return self._answer(req, method, path, 200, obj if method == "GET" else _status(200, "Success", ""))

    def _list_pods(self, req, url) -> None:
        wanted = dict(kv.split("=", 1) for kv in parse_qs(url.query).get("labelSelector", [""])[0].split(",") if kv)
        with self.lock:
            items = [p for p in self.pods.values()
                     if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            items = json.loads(json.dumps(items))
        self._answer(req, "GET", url.path, 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                                                 "items": items})

    def _follow_log(self, req, pod: str, query: dict) -> None:
        with self.lock:
            obj = self.pods.get(pod)
            restarts = obj["status"]["containerStatuses"][0]["restartCount"] if obj else 0
        if obj is None:
            return self._answer(req, "GET", req.path, 404, _status(404, "NotFound", pod))
        self.requests.append(("GET", req.path, 200))
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        sent = 0
        follow = query.get("follow", ["false"])[0].lower() == "true"  # the client sends "True"
        while True:
            with self.lock:
                lines = list(self.logs.get((pod, restarts), []))
                obj = self.pods.get(pod)
                state = obj["status"]["containerStatuses"][0] if obj else None
                ended = state is None or state["restartCount"] != restarts or "terminated" in state["state"]
            if lines[sent:]:
                data = "".join(line + "\n" for line in lines[sent:]).encode()
                req.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                req.wfile.flush()
                sent = len(lines)
            if ended or not follow:
                req.wfile.write(b"0\r\n\r\n")
                req.wfile.flush()
                return
            time.sleep(0.02)

    def _answer(self, req, method: str, path: str, status: int, body: dict) -> None:
        self.requests.append((method, path, status))
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)


def _status(code: int, reason: str, message: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure" if code >= 400 else "Success",
            "code": code, "reason": reason, "message": message}
