"""A real S3 API server (moto's server mode) and an MLflow server storing its artifacts there, on 127.0.0.1.

Both run as processes of their own, as they would for a user; the test process talks to them over
HTTP. The credentials are dummies, but distinctive: a test can search everything written for them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "Server", "driver_env", "free_port", "start_mlflow_s3", "start_s3"]

ACCESS_KEY = "HWTESTACCESSKEY7Q2Z"
SECRET_KEY = "hw-test-secret-3f9c1d7a"
_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process on 127.0.0.1:``port`` in its own session (stopped with everything it started)."""

    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout:.0f} s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _start(name: str, cmd: list[str], port: int, log: Path, env: dict[str, str]) -> Server:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Server(name, proc, port, log)


@dataclass
class S3Server:
    """moto's S3 server with one bucket, and the environment a process needs to use it."""

    server: Server
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.server.url, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def filesystem(self):
        """pyarrow's S3 filesystem on this server, configured explicitly (the test process's own environment
        is left alone: Ray workers started by other tests must not see it)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                                 endpoint_override=self.server.url, scheme="http")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


def start_s3(tmp: Path, bucket: str = "histoweak") -> S3Server:
    """Start moto's server, wait for it and create ``bucket``; ``.env`` is the environment of its users.

    The environment names the credentials, region and endpoint the standard AWS way, and points the AWS
    configuration files at nothing, so a developer's own ``~/.aws`` profile cannot change what is tested.
    """
    port = free_port()
    server = _start("moto_server", [str(_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port,
                    tmp / "moto.log", {**os.environ})
    try:
        server.wait_ready(60)
        s3 = S3Server(server, bucket, {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": server.url,
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"})
        s3.client().create_bucket(Bucket=bucket)
        return s3
    except BaseException:
        server.stop()
        raise


def start_mlflow_s3(tmp: Path, s3: S3Server, prefix: str = "mlflow") -> Server:
    """Start (without waiting for it) an MLflow server whose artifacts go to ``s3://<bucket>/<prefix>``.

    It proxies artifacts (``--artifacts-destination``): clients upload figures to it over HTTP, and only
    the server needs S3 access (``MLFLOW_S3_ENDPOINT_URL`` is MLflow's name for the endpoint).
    """
    port = free_port()
    env = {**_clean_env(), **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.server.url,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", s3.uri(prefix)]
    return _start("mlflow server", cmd, port, tmp / "mlflow.log", env)


def _clean_env() -> dict[str, str]:
    """This process's environment without AWS settings or a Ray address that could point elsewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "MLFLOW_")) and k not in ("RAY_ADDRESS",)}


def driver_env(s3: S3Server, ray_tmp: Path, tracking_uri: str) -> dict[str, str]:
    """The environment of a ``histoweak`` driver that uses the bucket, as a user's shell would give it.

    The driver starts a local Ray of its own under ``ray_tmp`` (so it neither joins nor disturbs another
    cluster on this machine); Ray's workers inherit the AWS settings from it.
    """
    return {**_clean_env(), **s3.env, "MLFLOW_TRACKING_URI": tracking_uri, "HISTOWEAK_RAY_TMP": str(ray_tmp)}
