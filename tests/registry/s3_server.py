"""A real S3 endpoint for the registry tests: moto in server mode on a loopback port."""

from __future__ import annotations

import uuid

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **_credentials())

    def create_bucket(self) -> str:
        name = "tensoryard-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name


def _credentials() -> dict:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }
