"""The local server's own SigV4 presigner (agent.server.sigv4) against botocore's: the same
URL, signature included, for every operation the server presigns, under path-style and
virtual-hosted addressing, with and without a session token, for keys that need encoding.
That the store accepts them is shown by every S3 test (they run on these URLs)."""

from __future__ import annotations

import calendar
import time
from urllib.parse import parse_qsl, urlsplit

import botocore.config
import botocore.session
import pytest

from agent.server.sigv4 import Presigner

KEYS = ["ready/ast_1/model.safetensors", "pending/a b/ü+x=1&y.bin", "p/~tilde/%41/*/(x)",
        "p/dir/sub/'quote'!.txt"]


def client(style: str, token: str | None) -> object:
    session = botocore.session.Session()
    session.set_credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    return session.create_client(
        "s3", region_name="eu-west-3", endpoint_url="http://127.0.0.1:9000",
        config=botocore.config.Config(signature_version="s3v4",
                                      s3={"addressing_style": style}))


def same(ours: str, theirs: str) -> None:
    a, b = urlsplit(ours), urlsplit(theirs)
    assert (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)
    assert dict(parse_qsl(a.query)) == dict(parse_qsl(b.query))


@pytest.mark.parametrize("style", ["path", "virtual"])
@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzE//token+with/slashes="])
def test_the_same_urls_as_botocore(style: str, token: str | None) -> None:
    c = client(style, token)
    signer = Presigner(c, "bench-bucket")
    for key in KEYS:
        for op, method, params, extra in [
            ("get_object", "GET", {}, None),
            ("put_object", "PUT", {}, None),
            ("upload_part", "PUT", {"UploadId": "2~abc/def", "PartNumber": 7},
             {"partNumber": "7", "uploadId": "2~abc/def"}),
        ]:
            theirs = c.generate_presigned_url(  # type: ignore[attr-defined]
                op, Params={"Bucket": "bench-bucket", "Key": key, **params}, ExpiresIn=900)
            stamp = dict(parse_qsl(urlsplit(theirs).query))["X-Amz-Date"]
            now = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
            same(signer.url(method, key, 900, extra, now=now), theirs)


def test_the_signing_key_follows_the_day() -> None:
    c = client("path", None)
    signer = Presigner(c, "b1")
    day1 = signer.url("GET", "k", 60, now=86400 * 20000)
    day2 = signer.url("GET", "k", 60, now=86400 * 20001 + 5)
    sig = [dict(parse_qsl(urlsplit(u).query))["X-Amz-Signature"] for u in (day1, day2)]
    assert sig[0] != sig[1]
    assert signer.url("GET", "k", 60, now=86400 * 20000) == day1  # key derived again
    assert Presigner(c, "b1").url("GET", "k", 60, now=86400 * 20001 + 5) == day2
