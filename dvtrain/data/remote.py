"""Object-store locations: which paths are remote, and a bounded pre-flight check of a remote location.

The one owner of "is this path remote" (:func:`is_remote`) and of the schemes dvtrain accepts
(:data:`REMOTE_SCHEMES`: what mosaicml-streaming 0.13 reads and writes). :func:`check_remote` runs
before anything expensive (the DeepSpeed engine, a conversion's decoding) and turns the ways an object
store fails into one message that names the URL and the environment variable to fix:

- ``s3://``: credentials from boto3's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE`` and ``~/.aws/credentials``, instance roles) and the endpoint ``S3_ENDPOINT_URL``
  (unset = AWS), exactly the variables streaming's ``S3Downloader`` / ``S3Uploader`` use
  (``streaming/base/storage/download.py``: ``Session().client('s3', endpoint_url=
  os.environ.get('S3_ENDPOINT_URL'))``). The check asks the store for ``<prefix>/index.json`` (a
  dataset to read) or for the bucket (a conversion output), so missing credentials, rejected
  credentials, an unreachable endpoint, a missing bucket and a missing dataset are all told apart.
  streaming falls back to unsigned requests only on an HTTP 400, never on missing credentials, so
  a public bucket still needs credentials here as it does in streaming.
- ``gs://``: streaming uses HMAC keys (``GCS_KEY`` + ``GCS_SECRET``, through the S3 API of
  ``https://storage.googleapis.com``; checked like ``s3://``) or Google application-default
  credentials (``GOOGLE_APPLICATION_CREDENTIALS``; checked for presence).
- other schemes (``oci://``, ``azure://``, ``hf://``, ...): the scheme only.

Every network call has botocore connect/read timeouts and the whole check runs in a helper thread
joined with ``timeout_s`` (30 s), so a black-holed endpoint fails in bounded time.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from typing import Callable

__all__ = ["REMOTE_SCHEMES", "check_remote", "is_remote", "split_url"]

#: URL prefixes mosaicml-streaming 0.13 can read (``streaming/base/storage/download.py``).
REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "sftp://", "dbfs:/")

S3_ENDPOINT_VAR = "S3_ENDPOINT_URL"
_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a profile in "
                     "~/.aws/credentials")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "AuthorizationHeaderMalformed")


def is_remote(location: str | os.PathLike) -> bool:
    """True for an object-store URL (``scheme://...`` or ``dbfs:/...``), False for a local path.

    Local paths may contain colons (``runs/a:b``, ``C:\\data``); only ``://`` (or Databricks'
    ``dbfs:/``) makes a URL.
    """
    location = str(location)
    return "://" in location or location.startswith("dbfs:/")


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b/`` -> ``("s3", "bucket", "a/b")`` (scheme, bucket, key prefix without slashes)."""
    parsed = urllib.parse.urlparse(url)
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def check_remote(url: str, field: str = "data.path", *, expect_dataset: bool = True,
                 timeout_s: float = 30.0) -> None:
    """Pre-flight of an object-store location, bounded to about ``timeout_s`` seconds.

    Args:
        url: the remote location (``s3://bucket/prefix``); see the module docstring for what is checked
            per scheme.
        field: what the user set, named in the message (``data.path``, ``eval.train_path``, ``OUT``).
        expect_dataset: True: an MDS dataset must be there (``<prefix>/index.json``, for reading);
            False: only the bucket must be reachable and writable in principle (a conversion output).
        timeout_s: seconds after which the check gives up and reports the endpoint as unreachable.

    Raises:
        ValueError: one line naming ``field=url`` and what is wrong: unsupported scheme, no bucket,
            missing or rejected credentials (with the variables to set), unreachable endpoint (with
            ``S3_ENDPOINT_URL``), missing bucket or missing ``index.json``.
    """
    if not str(url).startswith(REMOTE_SCHEMES):
        raise ValueError(f"{field}={url}: unsupported object store; use a local directory or one of "
                         + ", ".join(REMOTE_SCHEMES))
    scheme, bucket, _ = split_url(url)
    if scheme in ("s3", "gs") and not bucket:
        raise ValueError(f"{field}={url}: no bucket in the URL; expected {scheme}://BUCKET/PREFIX")
    if scheme == "s3":
        _bounded(lambda: _check_s3(url, field, expect_dataset, timeout_s), url, field, timeout_s,
                 _s3_endpoint_text())
    elif scheme == "gs":
        if os.environ.get("GCS_KEY") and os.environ.get("GCS_SECRET"):
            _bounded(lambda: _check_s3(url, field, expect_dataset, timeout_s, gcs_hmac=True), url, field,
                     timeout_s, "https://storage.googleapis.com", "check the network")
        else:
            _bounded(lambda: _check_gcs_default_credentials(url, field), url, field, timeout_s,
                     "Google Cloud's credential lookup", "set GOOGLE_APPLICATION_CREDENTIALS or GCS_KEY/GCS_SECRET")


# --------------------------------------------------------------------------------------------------


def _s3_endpoint_text() -> str:
    endpoint = os.environ.get(S3_ENDPOINT_VAR)
    return f"{endpoint} ({S3_ENDPOINT_VAR})" if endpoint else f"AWS S3 ({S3_ENDPOINT_VAR} not set)"


def _bounded(check: Callable[[], None], url: str, field: str, timeout_s: float, endpoint: str,
             hint: str = f"check {S3_ENDPOINT_VAR} and the network") -> None:
    """Run ``check`` in a daemon thread; re-raise its error; give up after ``timeout_s``."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="dvtrain-remote-preflight", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ValueError(f"{field}={url}: the object store at {endpoint} did not answer within {timeout_s:.0f} s; "
                         f"{hint}")
    if "error" in box:
        raise box["error"]


def _check_s3(url: str, field: str, expect_dataset: bool, timeout_s: float, gcs_hmac: bool = False) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, ProfileNotFound, ReadTimeoutError)

    _, bucket, prefix = split_url(url)
    per_call = max(1.0, min(10.0, timeout_s / 3))
    config = Config(connect_timeout=per_call, read_timeout=per_call, retries={"total_max_attempts": 2})
    if gcs_hmac:  # streaming's GCS downloader: HMAC keys through the S3 API
        endpoint, endpoint_text = "https://storage.googleapis.com", "https://storage.googleapis.com"
        cred_hint = "set GCS_KEY and GCS_SECRET (HMAC keys)"
        kwargs = {"region_name": "auto", "aws_access_key_id": os.environ["GCS_KEY"],
                  "aws_secret_access_key": os.environ["GCS_SECRET"]}
    else:
        endpoint, endpoint_text = os.environ.get(S3_ENDPOINT_VAR) or None, _s3_endpoint_text()
        cred_hint = _CREDENTIALS_HINT
        kwargs = {}
    try:
        session = boto3.session.Session()
        if not gcs_hmac and session.get_credentials() is None:
            raise ValueError(f"{field}={url}: no object-store credentials found; {cred_hint}; "
                             f"endpoint: {endpoint_text}")
        client = session.client("s3", endpoint_url=endpoint, config=config, **kwargs)
    except ProfileNotFound as exc:
        raise ValueError(f"{field}={url}: {exc}; set AWS_PROFILE to a profile in ~/.aws/credentials "
                         f"or unset it") from None
    except ValueError as exc:
        if str(exc).startswith(f"{field}="):
            raise
        # botocore: "Invalid endpoint: ..." for a malformed S3_ENDPOINT_URL
        raise ValueError(f"{field}={url}: {exc}; {S3_ENDPOINT_VAR} must be a URL such as "
                         f"http://127.0.0.1:9000") from None

    key = f"{prefix}/index.json" if prefix else "index.json"
    try:
        if expect_dataset:
            client.head_object(Bucket=bucket, Key=key)
        else:
            client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise ValueError(f"{field}={url}: no object-store credentials found; {cred_hint}; "
                         f"endpoint: {endpoint_text}") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise ValueError(f"{field}={url}: cannot reach the object store at {endpoint_text}: "
                         f"{_short(exc)}; check {S3_ENDPOINT_VAR} and the network") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _BAD_CREDENTIALS:
            raise ValueError(f"{field}={url}: the object store at {endpoint_text} rejected the credentials "
                             f"({code}); {cred_hint}") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise ValueError(f"{field}={url}: access denied to bucket {bucket!r} at {endpoint_text}; check the "
                             "credentials' permissions (or AWS_PROFILE)") from None
        if code in _NOT_FOUND or code == "NoSuchBucket":
            if expect_dataset and code != "NoSuchBucket":
                _raise_missing_bucket_or_dataset(client, url, field, bucket, key, endpoint_text)
            raise ValueError(f"{field}={url}: bucket {bucket!r} does not exist at {endpoint_text}") from None
        raise ValueError(f"{field}={url}: the object store at {endpoint_text} answered {code}: "
                         f"{_short(exc)}") from None
    except BotoCoreError as exc:
        raise ValueError(f"{field}={url}: object-store request failed at {endpoint_text}: {_short(exc)}") from None


def _raise_missing_bucket_or_dataset(client, url: str, field: str, bucket: str, key: str, endpoint_text: str):
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        raise ValueError(f"{field}={url}: bucket {bucket!r} does not exist at {endpoint_text}") from None
    raise ValueError(f"{field}={url}: not an MDS dataset (no {key} in bucket {bucket!r}); write one with "
                     f"`dvtrain data convert SRC {url}`") from None


def _check_gcs_default_credentials(url: str, field: str) -> None:
    hint = ("set GCS_KEY and GCS_SECRET (HMAC keys), or GOOGLE_APPLICATION_CREDENTIALS to a service-account "
            "key file")
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"{field}={url}: GOOGLE_APPLICATION_CREDENTIALS={path} does not exist; {hint}")
        return
    try:
        from google.auth import default as default_auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:
        raise ValueError(f"{field}={url}: no Google Cloud credentials; {hint}") from None
    try:
        default_auth()
    except (DefaultCredentialsError, OSError):
        raise ValueError(f"{field}={url}: no Google Cloud credentials found; {hint}") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
