"""A hostile device against a real fedpipe coordinator: real processes on 127.0.0.1.

`fedpipe-server` (SuperLink + fedpipe ServerApp, updates sealed) and two honest
`fedpipe-client` devices run as subprocesses; the test process itself is a third node,
connected to the same SuperLink through Flower's own Fleet HTTP connection (as
tests/test_flower_inflation_live.py does), that answers every instruction with a
crafted reply: a chunk bomb (one 1 MiB ArrayChunk listed 256 times), a validly sealed
update of 1000.0 everywhere claiming 10**6 examples, an `.npz` archive as array bytes,
a lone surrogate in an array name. The run must complete every round with the two
honest updates only, reach a normal accuracy, and the ServerApp must never allocate
the bomb.

The ServerApp's log (fedpipe's "dropped: ..." warnings) is not in a file: Flower ships
it to the SuperLink, which keeps it in the `task_logs` table of
<run dir>/flower/superlink.db; the tests read it from there.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message.arraychunk import ArrayChunk
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supernode.fleet_http_connection import http_request_response

from fedpipe.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fedpipe.codec import Encoded, build_codec
from fedpipe.config import CodecConfig, load_config
from fedpipe.crypto.keys import load_public_key, write_aggregator_keys
from fedpipe.crypto.seal import SEALED, Binding, seal
from fedpipe.data import write_shards
from fedpipe.deploy.processes import free_port, wait_for_port
from fedpipe.metrics import read_metrics
from fedpipe.records import (
    ARRAYS,
    CLIENT_ID,
    CODEC,
    CONFIG,
    ENCODE_SECONDS,
    IDENTIFY,
    IDENTITY,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    UPDATE,
    train_content,
)
from fedpipe.rundir import METRICS_FILE, SUMMARY_FILE

CHUNK_BYTES = 1024 * 1024  # one 1 MiB chunk pushed ...
REPEATS = 256  # ... listed 256 times: 256 MiB if the ServerApp inflated it
BOMB_BYTES = CHUNK_BYTES * REPEATS
HONEST = 2  # honest devices; the hostile node makes min_nodes = HONEST + 1
HOSTILE_CLIENT_ID = 7
RUN_TIMEOUT = 150.0  # seconds for a whole run; a healthy one takes well under a minute
SERVER_ARGS = [
    "model.hidden=16",
    f"federation.min_nodes={HONEST + 1}",
    "federation.round_timeout=20",
    "federation.wait_for_nodes=60",
    f"partition.num_clients={HONEST}",
]

# (round, the hostile node's instruction, its content, its node id) -> the reply it sends
Attack = Callable[[int, Message, RecordDict, int], Message]


# -- the hostile node ------------------------------------------------------------------


def _claims(num_examples: int) -> dict[str, int | float]:
    """The claims an honest device puts in its update header (see client_app.client_train)."""
    return {
        NUM_EXAMPLES: num_examples,
        TRAIN_LOSS: 0.1,
        CLIENT_ID: HOSTILE_CLIENT_ID,
        TRAIN_SECONDS: 0.5,
        ENCODE_SECONDS: 0.01,
    }


def _bomb_array() -> Array:
    """An Array that deflates to one CHUNK_BYTES ArrayChunk listed REPEATS times (the
    chunk list Flower itself caches for an all-zero array of BOMB_BYTES bytes), claiming
    a shape of one byte."""
    zeros = b"\x00" * CHUNK_BYTES
    chunk = ArrayChunk(memoryview(zeros))
    arr = Array(dtype="uint8", shape=(1,), stype="numpy.ndarray", data=zeros)
    arr.__dict__["_chunks"] = [(chunk.object_id, chunk)] * REPEATS
    return arr


def chunk_bomb(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
    """A fedpipe-shaped reply whose one update array would inflate to BOMB_BYTES."""
    update = ArrayRecord()  # ArrayRecord({...}) would copy the Array and drop the cache
    update[SEALED] = _bomb_array()
    codec = ConfigRecord({"scheme": "float32", **_claims(100)})
    return Message(RecordDict({UPDATE: update, CODEC: codec}), reply_to=instruction)


def make_inflated_update(public: X25519PublicKey) -> Attack:
    """A correctly sealed float32 update of 1000.0 everywhere, claiming 10**6 examples:
    what a device holding the aggregator's public key can send (the seal is valid)."""

    def attack(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
        model = {k: a.numpy() for k, a in content.array_records[ARRAYS].items()}
        update = {k: np.full(v.shape, 1000.0, np.float32) for k, v in model.items()}
        encoded = build_codec(CodecConfig()).encode(update, np.random.default_rng(0))
        encoded = Encoded(encoded.arrays, {**encoded.meta, **_claims(10**6)})
        binding = Binding(instruction.metadata.run_id, rnd, node)
        return Message(train_content(seal(encoded, public, binding)), reply_to=instruction)

    return attack


def npz_archive(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
    """A `.npz` archive (a zip np.load would open) as the bytes of the update array."""
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(8, np.uint8))
    update = ArrayRecord()
    update[SEALED] = Array(dtype="uint8", shape=(8,), stype="numpy.ndarray", data=buf.getvalue())
    codec = ConfigRecord({"scheme": "float32", **_claims(100)})
    return Message(RecordDict({UPDATE: update, CODEC: codec}), reply_to=instruction)


def lone_surrogate_name(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
    """An update array named with a lone surrogate: the ArrayRecord's JSON body carries it
    as an escape (\\ud800), and the ServerApp inflates it back into a Python str."""
    update = ArrayRecord()
    update["w\ud800"] = Array(np.zeros(4, np.float32))
    codec = ConfigRecord({"scheme": "float32", **_claims(100)})
    return Message(RecordDict({UPDATE: update, CODEC: codec}), reply_to=instruction)


class RawConfigRecord(ConfigRecord):
    """A ConfigRecord that deflates to the bytes given: a hostile device's own encoder."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.__dict__["_raw"] = raw

    def deflate(self) -> bytes:
        return bytes(self.__dict__["_raw"])


def wire_lone_surrogate(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
    """A fedpipe-shaped reply whose "codec" header has a string holding a lone surrogate
    as it looks on the wire (UTF-8 bytes ED A0 80, invalid UTF-8): Flower's serializer
    cannot write one, but a device can send any bytes, and the object is well-formed."""
    honest = ConfigRecord({"scheme": "float32", **_claims(100), "note": "aXXXb"}).deflate()
    codec = RawConfigRecord(honest.replace(b"aXXXb", b"a\xed\xa0\x80b"))
    update = ArrayRecord({SEALED: Array(np.zeros(4, np.float32))})
    return Message(RecordDict({UPDATE: update, CODEC: codec}), reply_to=instruction)


def identify(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
    """A well-formed answer to the identify query: a node whose identify reply is invalid
    is never sampled, and the attacks here are on training replies."""
    identity = ConfigRecord({CLIENT_ID: HOSTILE_CLIENT_ID})
    return Message(RecordDict({IDENTITY: identity}), reply_to=instruction)


def garbage(rnd: int, instruction: Message, content: RecordDict, node: int) -> Message:
    """What the hostile node answers to anything but the identify query and training."""
    return Message(RecordDict({"junk": ConfigRecord({"x": "y" * 300})}), reply_to=instruction)


@dataclass
class HostileNode:
    """A node on the SuperLink, driven from this process, that answers with `attacks`.

    It stays connected (Flower's heartbeat runs) until `stop()`: a node that left before
    the ServerApp pulled its reply would have it replaced by an error. Exceptions raised
    inside the connection are swallowed and logged by Flower, so they are kept here.
    """

    address: str
    attacks: dict[int, Attack]  # by server round
    on_instruction: Callable[[int], None] = lambda rnd: None
    node_id: int = 0
    answered: list[tuple[int, str, str]] = field(default_factory=list)  # round, type, attack
    pushed: dict[int, int] = field(default_factory=dict)  # bytes pushed, by round
    errors: list[str] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hostile-node", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the hostile node did not disconnect in 30 s"

    def _run(self) -> None:
        try:
            # A short retry budget: once the coordinator is gone, calls fail fast.
            with http_request_response(self.address, insecure=True, max_wait_time=5) as conn:
                node_id, receive, send, _run, _fab, pull_object, push_object, confirm = conn
                self.node_id = node_id
                self.connected.set()
                try:
                    self._serve(receive, send, pull_object, push_object, confirm)
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    if not self._stop.is_set():
                        self.errors.append(f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001 - flwr_exit raises SystemExit
            self.errors.append(f"connection: {type(exc).__name__}: {exc}")

    def _serve(  # noqa: PLR0913
        self,
        receive: Callable[[], tuple[Message, ObjectTree] | None],
        send: Callable[[Message, ObjectTree, float], tuple[set[str], str]],
        pull_object: Callable[[int, str], bytes],
        push_object: Callable[[int, str, str, bytes], None],
        confirm: Callable[[int, str], None],
    ) -> None:
        while not self._stop.is_set():
            received = receive()
            if received is None:
                time.sleep(0.1)
                continue
            instruction, tree = received
            run_id = instruction.metadata.run_id
            full: Message = pull_and_inflate_object_from_tree(
                tree,
                partial(pull_object, run_id),
                partial(confirm, run_id),
                return_type=Message,
            )
            content = full.content
            config = content.config_records.get(CONFIG, ConfigRecord())
            rnd = int(config.get(SERVER_ROUND, 0))  # type: ignore[arg-type]
            kind = instruction.metadata.message_type
            self.on_instruction(rnd)
            if kind == IDENTIFY:
                attack = identify
            elif kind == "train":
                attack = self.attacks.get(rnd, garbage)
            else:
                attack = garbage
            reply = attack(rnd, instruction, content, self.node_id)
            reply.metadata.__dict__["_message_id"] = reply.object_id  # as a SuperNode does
            contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
            to_push, session = send(reply, get_object_tree(reply), 0.0)
            for oid in to_push:
                push_object(run_id, session, oid, contents[oid])
            self.pushed[rnd] = self.pushed.get(rnd, 0) + sum(len(contents[o]) for o in to_push)
            self.answered.append((rnd, kind, attack.__name__))


# -- the coordinator and honest devices -------------------------------------------------


def _descendants(root: int) -> list[int]:
    """Every process below `root` (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _peak_rss(pid: int) -> int | None:
    """VmHWM (peak resident set) of `pid` in bytes, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) * 1024 if match else None


class Coordinator:
    """fedpipe-server (sealing on, --insecure for speed) and HONEST fedpipe-client devices,
    all real processes with their logs in `root`; `close()` stops every one of them."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.seal_key, self.seal_pub, self.fingerprint = write_aggregator_keys(root / "keys")
        self.public = load_public_key(self.seal_pub, self.fingerprint)
        self.runs = root / "runs"
        self.common = [*SERVER_ARGS, f"output_dir='{self.runs}'"]
        cfg = load_config(None, self.common)
        self.shards = write_shards(cfg.data, cfg.partition, cfg.seed, root / "shards")
        self.procs: list[subprocess.Popen[str]] = []
        self.server: subprocess.Popen[str] | None = None

    def _spawn(self, module: str, *args: str, log: str) -> subprocess.Popen[str]:
        with (self.root / log).open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.procs.append(proc)
        return proc

    def start(self, rounds: int) -> None:
        self.server = self._spawn(
            "fedpipe.cli.server",
            *("--insecure", "--port", str(self.port), "--seal-key", str(self.seal_key)),
            *self.common,
            f"federation.rounds={rounds}",
            log="server.log",
        )
        for i, shard in enumerate(self.shards):
            self._spawn(
                "fedpipe.cli.client",
                *("--superlink", f"127.0.0.1:{self.port}", "--insecure"),
                *("--aggregator-key", str(self.seal_pub), "--pin", self.fingerprint),
                *("--data", str(shard), "--state-dir", str(self.root / f"device-{i}")),
                *("--max-wait", "60"),
                log=f"client-{i}.log",
            )
        wait_for_port("127.0.0.1", self.port, 60)

    def serverapp_pid(self) -> int | None:
        """The flwr-serverapp process this coordinator's SuperLink started."""
        assert self.server is not None
        for pid in _descendants(self.server.pid):
            with contextlib.suppress(OSError):
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        assert self.server is not None
        try:
            return self.server.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end in {timeout:.0f} s:\n{self.logs()}")

    def run_dir(self) -> Path:
        dirs = sorted(self.runs.glob("*"))
        assert len(dirs) == 1, f"expected one run directory, found {dirs}"
        return dirs[0]

    def serverapp_log(self) -> str:
        """What the ServerApp logged (fedpipe's warnings included). Flower ships it to the
        SuperLink, which keeps it in its database (table `task_logs` of
        <run dir>/flower/superlink.db), not in a file; `flwr log` reads it from there."""
        dbs = list(self.runs.glob("*/flower/superlink.db"))
        if not dbs:
            return ""
        with contextlib.closing(sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT log FROM task_logs ORDER BY timestamp").fetchall()
        return "".join(str(row[0]) for row in rows)

    def logs(self) -> str:
        """Everything the coordinator side wrote, for failure messages: fedpipe-server's
        output, the SuperLink's log file and the ServerApp's log."""
        parts = [self.root / "server.log", *sorted(self.runs.glob("*/flower/superlink.log"))]
        text = [f"==> {p} <==\n{p.read_text(errors='replace')[-20000:]}" for p in parts]
        with contextlib.suppress(sqlite3.Error):
            text.append(f"==> ServerApp log <==\n{self.serverapp_log()}")
        return "\n".join(text)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        # What a killed parent could not stop (a SuperLink, a SuperNode) goes too.
        for pid_file in self.root.glob("**/*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator(tmp_path)
    try:
        yield c
    finally:
        c.close()


# -- the tests ---------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int  # fedpipe-server's exit status
    hostile: HostileNode
    records: list[dict[str, object]]  # metrics.jsonl
    serverapp_log: str
    logs: str  # everything, for failure messages
    peak_rss: dict[int, int | None]  # the ServerApp's VmHWM as each round's instruction came


def run_with_hostile_node(c: Coordinator, attacks: dict[int, Attack]) -> Outcome:
    """A run of len(attacks) rounds with the hostile node answering round r with attacks[r]."""
    peak: dict[int, int | None] = {}

    def record_peak(rnd: int) -> None:
        pid = c.serverapp_pid()
        peak[rnd] = _peak_rss(pid) if pid is not None else None

    c.start(rounds=len(attacks))
    hostile = HostileNode(f"127.0.0.1:{c.port}", attacks, on_instruction=record_peak)
    hostile.start()
    try:
        assert hostile.connected.wait(60), f"the hostile node never connected: {hostile.errors}"
        # Leave while the SuperLink is still up: once the ServerApp has written its
        # summary it has pulled every reply.
        deadline = time.monotonic() + RUN_TIMEOUT
        assert c.server is not None
        while not list(c.runs.glob(f"*/{SUMMARY_FILE}")) and c.server.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not end in {RUN_TIMEOUT:.0f} s:\n{c.logs()}")
            time.sleep(0.2)
    finally:
        hostile.stop()
    code = c.wait()
    metrics = list(c.runs.glob(f"*/{METRICS_FILE}"))
    return Outcome(
        code,
        hostile,
        read_metrics(metrics[0]) if metrics else [],
        c.serverapp_log(),
        c.logs(),
        peak,
    )


def _check_run(out: Outcome, attacks: dict[int, Attack]) -> None:
    """Every round ran with the two honest updates and the hostile reply dropped."""
    assert out.code == 0, f"fedpipe-server exited {out.code}:\n{out.logs}"
    assert not out.hostile.errors, f"the hostile node failed: {out.hostile.errors}"
    rounds = len(attacks)
    # The hostile node was sampled in every round and answered with that round's attack.
    trained = [(r, a) for r, kind, a in out.hostile.answered if kind == "train"]
    assert trained == [(r, attacks[r].__name__) for r in range(1, rounds + 1)], trained
    assert [r["round"] for r in out.records] == list(range(1, rounds + 1)), out.logs
    for r in out.records:
        assert r["clients_sampled"] == HONEST + 1, r
        assert r["clients_replied"] == HONEST, r  # the honest updates, and only those
        assert r["clients_rejected"] == 1, r  # the hostile reply, every round
        assert r["clients_failed"] == 1, r
    final = out.records[-1]["accuracy"]
    assert isinstance(final, float) and final > 0.5, out.records


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_processes")
def test_hostile_device_cannot_stop_or_steer_a_live_run(coordinator: Coordinator) -> None:
    """Chunk bomb, a validly sealed 1000.0 update claiming 10**6 examples, an .npz
    archive, a lone surrogate: each round completes with the honest updates only."""
    c = coordinator
    attacks: dict[int, Attack] = {
        1: chunk_bomb,
        2: make_inflated_update(c.public),
        3: npz_archive,
        4: lone_surrogate_name,
    }
    out = run_with_hostile_node(c, attacks)
    _check_run(out, attacks)
    run = c.run_dir()
    # fedpipe-server keeps the ServerApp's log (Flower stores it only in its database).
    assert (
        "dropped: bad payload: array bytes are a zip/npz archive"
        in (run / "serverapp.log").read_text()
    )
    # The 1000.0 update weighted by 10**6 examples would have moved every weight by ~1000.
    weights = load_checkpoint(run / CHECKPOINT_FILE).arrays
    largest = max(float(np.abs(v).max()) for v in weights.values())
    assert largest < 50.0, f"the global model moved: largest |weight| {largest}"

    # Each hostile reply was dropped for what it is, the reason in the ServerApp's log.
    reasons = {
        "chunk bomb, guard": rf"an Array would inflate to {BOMB_BYTES} bytes \(bound \d+\)"
        r": emptied",
        "chunk bomb, boundary": rf"dropped: bad payload: update\['{SEALED}'\] would inflate to "
        rf"{BOMB_BYTES} bytes",
        "sealed 1000.0 update": r"dropped: update norm [\d.e+]+ exceeds the bound",
        "npz archive": r"dropped: bad payload: array bytes are a zip/npz archive",
        "lone surrogate": r"dropped: bad payload: an array name in 'update' .* is not valid "
        r"Unicode",
    }
    missing = [name for name, rx in reasons.items() if not re.search(rx, out.serverapp_log)]
    assert not missing, f"no log line for {missing}:\n{out.logs}"

    # The bomb was real: about 1 MiB crossed the Fleet API for 256 MiB once inflated.
    assert CHUNK_BYTES <= out.hostile.pushed[1] < CHUNK_BYTES + 64 * 1024, out.hostile.pushed
    # The ServerApp never allocated the bomb: its peak RSS after the bomb round (taken as
    # round 2's instruction came) is about what it was before (as round 1's came).
    before, after = out.peak_rss.get(1), out.peak_rss.get(2)
    assert before is not None and after is not None, "flwr-serverapp not found in /proc"
    print(
        f"flwr-serverapp VmHWM: {before / 2**20:.0f} MiB before the bomb round, "
        f"{after / 2**20:.0f} MiB after it ({BOMB_BYTES / 2**20:.0f} MiB if inflated)"
    )
    assert after - before < BOMB_BYTES // 8, (before, after)


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_processes")
def test_invalid_utf8_in_a_reply_header_is_dropped_not_fatal(coordinator: Coordinator) -> None:
    """A lone surrogate as it travels (invalid UTF-8 in a ConfigRecord string) must be one
    more dropped reply, like every other hostile reply, not the end of the run."""
    attacks: dict[int, Attack] = {1: wire_lone_surrogate, 2: wire_lone_surrogate}
    out = run_with_hostile_node(coordinator, attacks)
    _check_run(out, attacks)
    # Flower's Grid could not inflate it; fedpipe's guard made it an error reply.
    assert "dropped: client error: undecodable reply (DecodeError" in out.serverapp_log
