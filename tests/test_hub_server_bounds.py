"""The test Hub at its edges: a large commit body is read line by line (never held several times in memory), and an
LFS pointer whose size lies is refused, never served."""

import base64
import hashlib
import json
import tracemalloc

import pytest
from hub_server import HubServer
from test_hub_server import LFS_POINTER, TOKEN, raw_commit, request


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-root"), token=TOKEN) as server:
        yield server


def commit(hub, repo, files):
    lines = [{"key": "header", "value": {"summary": "commit"}}] + [
        {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}
        for path, data in files.items()]
    body = b"\n".join(json.dumps(line).encode() for line in lines)
    return body, lambda: request(hub, "POST", f"/api/models/{repo}/commit/main", body=body, token=TOKEN,
                                 content_type="application/x-ndjson")


def test_a_large_commit_body_is_not_held_several_times(hub):
    """8 files of 2 MiB (a 21 MiB body): the server's peak of traced memory while it takes the commit stays under
    1.5 times the body (before: the body, its split lines and the decoded files at once, about 3 times)."""
    repo = "tester/large"
    request(hub, "POST", "/api/repos/create", {"name": repo}, token=TOKEN)
    files = {f"shard-{i}.bin": bytes([i]) * (2 << 20) for i in range(8)}
    body, send = commit(hub, repo, files)
    del files
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        status, reply, _ = send()
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert status == 200, reply
    assert peak < 1.5 * len(body), (peak / len(body), len(body))


def test_an_lfs_pointer_whose_size_lies_is_refused(hub):
    repo = "tester/pointer-sizes"
    request(hub, "POST", "/api/repos/create", {"name": repo}, token=TOKEN)
    data = b"\x00weights" * 1000  # binary: stored in LFS
    assert raw_commit(hub, repo, {"model.bin": data})[0] == 200
    oid = hashlib.sha256(data).hexdigest()
    head = hub.git(repo, "rev-parse", "main")
    status, reply = raw_commit(hub, repo, {"copy.txt": f"{LFS_POINTER}{oid}\nsize {len(data) + 1}\n".encode()})
    assert status == 400 and f"says size {len(data) + 1}, but its object sha256:{oid} has {len(data)} bytes" in \
        reply["error"], reply
    assert hub.git(repo, "rev-parse", "main") == head
    assert raw_commit(hub, repo, {"copy.txt": f"{LFS_POINTER}{oid}\nsize {len(data)}\n".encode()})[0] == 200
    status, served, response = request(hub, "GET", f"/{repo}/resolve/main/copy.txt")
    assert status == 200 and served == data and response.getheader("X-Linked-Size") == str(len(data))
