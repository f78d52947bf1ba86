"""`veil store serve` (a real subprocess on loopback) read by the runtime's reader and written by
the gateway's writer: versioned sealed files, range reads, resumed streams, staged and size-limited
uploads, write tokens, and a missing store that is an error, never an empty store."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from store_support import CuttingProxy, free_port

from veil.crypto import chunked
from veil.errors import NotFound, TooLarge, Unavailable, VeilError
from veil.store import HttpModelReader, LocalModelStore, open_reader
from veil.store.client import HttpModelStore, open_store


def _writer(service, **kw) -> HttpModelStore:
    return HttpModelStore(service.url, token=service.token, **kw)


def test_a_sealed_model_round_trips_and_streams_through_the_service(store_service, seal):
    sealed = seal("m", 1, size=3 << 20)  # several read chunks, 48 sealed chunks
    writer = _writer(store_service)
    assert writer.put("m", 1, io.BytesIO(sealed.data)) == len(sealed.data)
    # on disk exactly where the local store keeps it
    assert LocalModelStore(store_service.root).path("m", 1).read_bytes() == sealed.data

    reader = HttpModelReader(store_service.url)
    assert reader.versions("m") == [1] and reader.exists("m", 1) and not reader.exists("m", 2)
    info = reader.stat("m", 1)
    assert info.size == len(sealed.data) and info.etag
    with reader.open("m", 1) as f:
        assert f.read(10) == sealed.data[:10]
        assert f.read() == sealed.data[10:]
        assert f.read(5) == b""  # the end stays the end
    with reader.open("m", 1, offset=len(sealed.data) - 100) as f:
        assert f.read() == sealed.data[-100:]
    # what the runtime does: authenticate and decrypt chunk by chunk as bytes arrive
    with reader.open("m", 1) as f:
        plain = b"".join(chunked.open_stream(sealed.key, f, model="m", version=1))
    assert plain == sealed.plaintext


def test_versions_are_kept_apart_and_deleted_one_by_one(store_service, seal):
    writer = _writer(store_service)
    for v in (1, 2, 3):
        writer.put("m", v, io.BytesIO(seal("m", v).data))
    writer.put("other", 7, io.BytesIO(seal("other", 7).data))
    assert writer.versions("m") == [1, 2, 3] and writer.versions("other") == [7] and writer.versions("none") == []
    writer.delete("m", 2)
    writer.delete("m", 2)  # idempotent
    assert writer.versions("m") == [1, 3]
    with pytest.raises(NotFound) as info:
        HttpModelReader(store_service.url).open("m", 2)
    assert info.value.code == "unknown_model" and "version 2" in info.value.message


def test_range_requests(store_service, seal):
    sealed = seal("m", 1, size=10_000)
    _writer(store_service).put("m", 1, io.BytesIO(sealed.data))
    url, n = f"{store_service.url}/v1/models/m/versions/1", len(sealed.data)
    with httpx.Client(timeout=10) as http:
        whole = http.get(url)
        assert whole.status_code == 200 and whole.content == sealed.data
        assert whole.headers["accept-ranges"] == "bytes" and whole.headers["etag"]
        etag = whole.headers["etag"]
        for header, first, last in (
            ("bytes=0-9", 0, 9),
            ("bytes=100-", 100, n - 1),
            ("bytes=-7", n - 7, n - 1),
            (f"bytes=5-{n + 50}", 5, n - 1),
        ):
            r = http.get(url, headers={"Range": header})
            assert r.status_code == 206, header
            assert r.headers["content-range"] == f"bytes {first}-{last}/{n}", header
            assert r.content == sealed.data[first : last + 1], header
        r = http.get(url, headers={"Range": f"bytes={n}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{n}"
        assert r.json()["error"]["code"] == "bad_range"
        for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3"):  # answered whole, as RFC 9110 allows
            r = http.get(url, headers={"Range": ignored})
            assert r.status_code == 200 and r.content == sealed.data, ignored
        r = http.get(url, headers={"Range": "bytes=0-1", "If-Match": '"another-file"'})
        assert r.status_code == 412 and r.json()["error"]["code"] == "precondition_failed"
        assert http.get(url, headers={"Range": "bytes=0-1", "If-Match": etag}).status_code == 206
        head = http.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(n) and head.content == b""
        missing = http.get(f"{store_service.url}/v1/models/m/versions/9")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"
        bad = http.get(f"{store_service.url}/v1/models/m/versions/zero")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed"


def test_a_broken_stream_resumes_with_a_range_request_bound_to_the_same_file(store_service, seal):
    sealed = seal("m", 1, size=2 << 20)
    _writer(store_service).put("m", 1, io.BytesIO(sealed.data))
    port = int(store_service.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(("127.0.0.1", port), after=300_000, cuts=2).start()
    try:
        reader = HttpModelReader(store_service.url)
        reader_via_proxy = HttpModelReader(proxy.url, check=False)
        with reader_via_proxy.open("m", 1) as f:
            plain = b"".join(chunked.open_stream(sealed.key, f, model="m", version=1))
        assert plain == sealed.plaintext
        resumed = [r for r in proxy.requests if b"Range: bytes=" in r]
        assert len(resumed) == 2, proxy.requests
        etag = reader.stat("m", 1).etag.encode()
        assert all(b"If-Match: " + etag in r for r in resumed)
    finally:
        proxy.close()


def test_a_file_replaced_mid_read_is_refused_not_spliced(store_service, seal):
    first, second = seal("m", 1, size=1 << 20), seal("m", 1, size=1 << 20)
    writer = _writer(store_service)
    writer.put("m", 1, io.BytesIO(first.data))
    port = int(store_service.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(("127.0.0.1", port), after=200_000, cuts=1).start()
    try:
        with HttpModelReader(proxy.url, check=False).open("m", 1) as f:
            got = f.read(100_000)
            assert got == first.data[:100_000]
            writer.put("m", 1, io.BytesIO(second.data))  # the owner re-uploads while we read
            with pytest.raises(Unavailable) as info:
                f.read()
        assert info.value.code == "store_changed"
    finally:
        proxy.close()


def test_a_stream_that_keeps_breaking_fails_clearly(store_service, seal):
    sealed = seal("m", 1, size=1 << 20)
    _writer(store_service).put("m", 1, io.BytesIO(sealed.data))
    port = int(store_service.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(("127.0.0.1", port), after=100_000, cuts=100).start()
    try:
        with HttpModelReader(proxy.url, check=False, resumes=2).open("m", 1) as f, pytest.raises(Unavailable) as info:
            f.read()
        assert info.value.code == "store_unavailable" and "failed at byte" in info.value.message
    finally:
        proxy.close()


def test_staged_upload_is_invisible_until_commit_and_abort_leaves_nothing(store_service, seal):
    writer, reader = _writer(store_service), HttpModelReader(store_service.url)
    sealed = seal("m", 4, size=200_000)
    upload = writer.begin_upload("m", 4)
    for i in range(0, len(sealed.data), 65536):
        upload.write(sealed.data[i : i + 65536])
    assert upload.size == len(sealed.data) and upload.head == sealed.data[:8192]
    assert not reader.exists("m", 4)
    assert upload.commit() == len(sealed.data)
    upload.abort()  # after commit: nothing happens
    with reader.open("m", 4) as f:
        assert f.read() == sealed.data

    aborted = writer.begin_upload("m", 5)
    aborted.write(seal("m", 5).data)
    aborted.abort()
    assert not reader.exists("m", 5)
    leftovers = list((store_service.root / "models").rglob(".upload-*"))
    assert leftovers == []


def test_writes_need_the_token_and_reads_do_not(store_service, seal):
    sealed = seal("m", 1)
    for token in (None, "wrong-token-wrong-token"):
        with pytest.raises(VeilError) as info:
            HttpModelStore(store_service.url, token=token or "").put("m", 1, io.BytesIO(sealed.data))
        assert (info.value.code, info.value.status) == ("unauthorized", 401)
    with httpx.Client(timeout=10) as http:
        r = http.delete(f"{store_service.url}/v1/models/m/versions/1")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    _writer(store_service).put("m", 1, io.BytesIO(sealed.data))
    assert HttpModelReader(store_service.url).versions("m") == [1]


def test_only_sealed_files_for_the_right_model_and_version_are_kept(store_service, seal):
    writer = _writer(store_service)
    for data, words in (
        (b"plaintext ONNX, not sealed" * 100, "not a Veil sealed model"),
        (seal("other", 1).data, "sealed for 'other' v1"),
        (seal("m", 2).data, "sealed for 'm' v2"),
    ):
        with pytest.raises(VeilError) as info:
            writer.put("m", 1, io.BytesIO(data))
        assert (info.value.code, info.value.status) == ("not_sealed", 400)
        assert words in info.value.message
    assert writer.versions("m") == []


def test_uploads_are_size_limited_on_both_sides(start_store_service, seal):
    service = start_store_service(max_bytes=100_000)
    writer = _writer(service)
    big = seal("m", 1, size=300_000)
    with pytest.raises(TooLarge):  # the writer's own limit: refused before anything is sent past it
        writer.put("m", 1, io.BytesIO(big.data), max_bytes=50_000)
    with pytest.raises(VeilError) as info:  # the service's limit, for a writer that set none
        writer.put("m", 1, io.BytesIO(big.data))
    assert (info.value.code, info.value.status) == ("too_large", 413)
    with httpx.Client(timeout=10) as http:
        r = http.put(
            f"{service.url}/v1/models/m/versions/1",
            content=big.data,
            headers={"Authorization": f"Bearer {service.token}"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert writer.versions("m") == []
    small = seal("m", 1, size=10_000)
    assert writer.put("m", 1, io.BytesIO(small.data)) == len(small.data)


def test_a_missing_store_is_an_error_never_an_empty_store(tmp_path, start_store_service):
    # nothing listening
    url = f"http://127.0.0.1:{free_port()}"
    for make in (lambda: HttpModelReader(url), lambda: open_reader(url), lambda: open_store(url)):
        with pytest.raises(Unavailable) as info:
            make()
        assert info.value.code == "no_store" and url in info.value.message
    # something listening that is not a Veil store at that address
    other = start_store_service()
    with pytest.raises(Unavailable) as info:
        HttpModelReader(other.url + "/not-a-store")
    assert info.value.code == "no_store" and "not a Veil model store" in info.value.message
    # a directory that does not exist, for the reader and for the service
    with pytest.raises(Unavailable) as info:
        open_reader(str(tmp_path / "nowhere"))
    assert info.value.code == "no_store"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "store",
            "serve",
            "--root",
            str(tmp_path / "nowhere"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "does not exist" in done.stderr and "--create" in done.stderr
    assert not (tmp_path / "nowhere").exists()


def test_the_runtime_reader_refuses_what_it_cannot_read():
    for location, words in (
        ("s3://bucket/models", "not s3://"),
        ("ftp://x", "not ftp://"),
        ("http://", "http(s)://host"),
    ):
        with pytest.raises(VeilError) as info:
            open_reader(location)
        assert info.value.code == "bad_init" and words in info.value.message, (location, info.value.message)


def test_open_store_cli_lists_versions(store_service, seal):
    _writer(store_service).put("m", 3, io.BytesIO(seal("m", 3).data))
    done = subprocess.run(
        [sys.executable, "-m", "veil.cli", "store", "ls", store_service.url, "m", "n"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"m": [\n      3\n    ]' in done.stdout and '"n": []' in done.stdout


def test_open_writes_are_refused_nowhere_but_warned_about(start_store_service, seal):
    service = start_store_service(token=False)
    HttpModelStore(service.url).put("m", 1, io.BytesIO(seal("m", 1).data))
    assert HttpModelReader(service.url).describe()["writes"] == "open"
    assert "writes are OPEN" in Path(service.log).read_text()
