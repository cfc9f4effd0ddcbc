"""A real S3 API server for the object-storage tests: moto's standalone server as its own process
(``moto_server``, installed in the venv), on a free port, with IAM enforced so that credentials
matter: an admin user (everything allowed) and a read-only user (writes denied), each with keys
the server generated. The jobs get them the usual way, through AWS_* variables."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from train.tools.s3server import REGION, start_moto, stop

_ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
_READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:HeadBucket"], "Resource": "*"}]}


@dataclass
class S3Server:
    endpoint: str
    admin: dict  # {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}
    reader: dict
    proc: subprocess.Popen

    def env(self, keys: dict | None = None) -> dict:
        """What a job on a node with these credentials sees (the admin's unless given)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION, **(keys or self.admin)}

    def client(self, keys: dict | None = None):
        import boto3

        k = keys or self.admin
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=k["AWS_ACCESS_KEY_ID"], aws_secret_access_key=k["AWS_SECRET_ACCESS_KEY"])

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under s3://bucket/prefix: key -> size."""
        out, pager = {}, self.client().get_paginator("list_objects_v2")
        for page in pager.paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        stop(self.proc)


def start_s3(log: Path, host: str = "127.0.0.1") -> S3Server:
    """Start the server on ``host``; the first three requests (unauthenticated, moto's
    INITIAL_NO_AUTH_ACTION_COUNT) create the admin, every later one is checked against IAM."""
    import boto3

    try:
        endpoint, proc = start_moto(log, host, {"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    except RuntimeError as e:
        raise AssertionError(str(e)) from None

    def user(iam, name: str, policy: dict) -> dict:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": k["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]}

    anon = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                        aws_secret_access_key="bootstrap")
    admin = user(anon, "admin", _ALLOW_ALL)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=admin["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"])
    return S3Server(endpoint, admin, user(iam, "reader", _READ_ONLY), proc)
