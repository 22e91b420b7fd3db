"""The generated Python bindings against a real coordinator on 127.0.0.1.

Loads the module that scripts/bindings.sh generated (with the built libcrosslm_ffi beside it),
starts `crosslm-coordinator serve` with a file generator, and drives the client the way an app
would: enroll, load a small data file, train, take part in a round, cancel, and bad input.

Run: python3 bindings/tests/test_python.py  (after cargo build and scripts/bindings.sh)
Env: CARGO_TARGET_DIR (binaries), CROSSLM_BINDINGS (default $CARGO_TARGET_DIR/bindings),
CROSSLM_ASSETS (the MiniLM tokenizer the bag model uses).
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/crosslm/target")
BINDINGS = os.environ.get("CROSSLM_BINDINGS") or os.path.join(TARGET, "bindings")
ASSETS = os.environ.get("CROSSLM_ASSETS") or os.path.join(ROOT, "assets")
COORDINATOR = os.path.join(TARGET, "release", "crosslm-coordinator")

sys.path.insert(0, os.path.join(BINDINGS, "python"))
import crosslm_ffi as x  # noqa: E402  (generated; found through the path above)

TASK = """
name = "mr"
description = "movie review polarity"
classify_template = "Review: {text}\\nSentiment ({labels}):"
[[labels]]
name = "negative"
prompts = ["Write a negative movie review sentence."]
[[labels]]
name = "positive"
prompts = ["Write a positive movie review sentence."]
"""

NEG = ["dull", "lifeless", "boring", "awful", "tedious"]
POS = ["warm", "wonderful", "moving", "brilliant", "charming"]


def rows(n):
    """n labeled rows, alternating labels, distinct wording per label."""
    out = []
    for i in range(n):
        label, words = ("negative", NEG) if i % 2 == 0 else ("positive", POS)
        out.append((f"a {words[i % 5]} and {words[(i // 2 + 1) % 5]} film, take {i}", label))
    return out


def write_private(path, n):
    with open(path, "w") as f:
        for text, label in rows(n):
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    """`crosslm-coordinator serve` with a file generator; prints tokens, writes its address."""

    def __init__(self, d, rounds=1, per_label=10, min_clients=1, tokens=1):
        with open(os.path.join(d, "task.toml"), "w") as f:
            f.write(TASK)
        with open(os.path.join(d, "samples.jsonl"), "w") as f:
            for i in range(per_label):
                f.write(json.dumps({"text": f"a dull, lifeless film number {i}", "label": "negative"}) + "\n")
                f.write(json.dumps({"text": f"a warm and wonderful film number {i}", "label": "positive"}) + "\n")
        cfg = os.path.join(d, "coordinator.toml")
        with open(cfg, "w") as f:
            f.write(f"""
task = "task.toml"
[daemon]
listen = "127.0.0.1:0"
data_dir = "coord"
rounds = {rounds}
samples_per_label = {per_label}
min_clients = {min_clients}
idle_timeout_ms = 5000
linger_ms = 5000
[daemon.round]
quorum = 1
deadline_ms = 120000
[generator]
kind = "file"
path = "samples.jsonl"
""")
        addr_file = os.path.join(d, "addr")
        self.log = open(os.path.join(d, "coordinator.log"), "w")
        self.proc = subprocess.Popen(
            [COORDINATOR, "serve", "--config", cfg, "--print-tokens", str(tokens), "--addr-file", addr_file],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.tokens = []
        while len(self.tokens) < tokens:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"coordinator exited, see {self.log.name}")
            if line.startswith("enrollment token: "):
                self.tokens.append(line.split(": ", 1)[1].strip())
        deadline = time.time() + 60
        while not read(addr_file):
            if time.time() > deadline:
                raise RuntimeError("coordinator did not start listening")
            time.sleep(0.05)
        self.addr = read(addr_file)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


class Recorder(x.ProgressListener):
    """Collects progress events (called from the library's threads)."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def on_progress(self, event):
        with self.lock:
            self.events.append(event)

    def of(self, activity):
        with self.lock:
            return [e for e in self.events if e.activity == activity]


def settings(d, coordinator):
    s = x.default_settings(os.path.join(d, "client"))
    s.coordinator = coordinator
    s.name = "python-test"
    s.arch = x.SlmArch.BAG
    s.model_dir = os.path.join(ASSETS, "minilm")
    s.train_epochs = 20
    s.test_fraction = 0.25
    s.connect_timeout_ms = 5000
    # The device's own privacy floor: noise on its scores, with a budget it stays within.
    s.min_noise_multiplier = 2.0
    s.epsilon_budget = 50.0
    return s


class BindingsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.coordinators = []

    def tearDown(self):
        for c in self.coordinators:
            c.stop()
        self.tmp.cleanup()

    def coordinator(self, **kw):
        c = Coordinator(self.dir, **kw)
        self.coordinators.append(c)
        return c

    def test_enroll_load_train_and_take_part_in_a_round(self):
        coord = self.coordinator(rounds=1, per_label=10, min_clients=1, tokens=1)
        client = x.CrossLmClient(settings(self.dir, coord.addr))
        rec = Recorder()
        client.set_listener(rec)

        client_id = asyncio.run(client.enroll(coord.tokens[0]))
        self.assertTrue(client_id)
        self.assertEqual(client.status().client_id, client_id)

        data = client.load_data_file(write_private(os.path.join(self.dir, "private.jsonl"), 40))
        self.assertEqual((data.examples, data.test_examples), (30, 10))
        self.assertEqual(data.labels, ["negative", "positive"])

        t = asyncio.run(client.train())
        self.assertGreater(t.steps, 0)
        self.assertIsNotNone(t.local_accuracy)
        steps = [e for e in rec.of(x.Activity.TRAINING) if e.total > 0]
        self.assertTrue(steps, "training progress reported")
        self.assertEqual(steps[-1].done, steps[-1].total)
        self.assertIsNotNone(client.status().checkpoint)

        j = asyncio.run(client.join(1))
        self.assertEqual((j.rounds, j.last_round, j.cancelled), (1, 1, False))
        self.assertIsNotNone(j.local_accuracy)
        scoring = rec.of(x.Activity.SCORING)
        self.assertTrue(scoring and scoring[-1].done == scoring[-1].total == 20,
                        [(e.done, e.total) for e in scoring])
        self.assertTrue(all(e.round == 1 for e in scoring))
        finished = rec.of(x.Activity.ROUND_FINISHED)
        self.assertEqual([e.round for e in finished], [1])
        self.assertIsNotNone(finished[0].accuracy)

        s = client.status()
        self.assertEqual((s.last_round, s.rounds_completed), (1, 1))
        self.assertEqual(s.activity, x.Activity.IDLE)
        # One round at noise multiplier 2: epsilon 2.166 at delta 1e-5 (Opacus gives 2.1657).
        self.assertAlmostEqual(s.epsilon_spent, 2.1657, delta=1e-3)
        self.assertEqual(s.epsilon_budget, 50.0)
        with open(os.path.join(self.dir, "client", "state.json")) as f:
            state = json.load(f)
        self.assertEqual(state["last_round"], 1)
        self.assertEqual(state["client_id"], client_id)

        # The coordinator gone: join tries again as often as the settings say, then gives up
        # with a network error (the same data dir: identity and checkpoint are kept).
        coord.stop()
        del client
        s = settings(self.dir, coord.addr)
        s.connect_timeout_ms = 1000
        s.reconnect_attempts = 2
        again = x.CrossLmClient(s)
        rec = Recorder()
        again.set_listener(rec)
        again.load_data_file(os.path.join(self.dir, "private.jsonl"))
        started = time.time()
        with self.assertRaises(x.CrossLmError.Network):
            asyncio.run(again.join(1))
        retries = [e.message for e in rec.of(x.Activity.CONNECTING) if "trying again" in e.message]
        self.assertEqual(len(retries), 2, retries)
        self.assertLess(time.time() - started, 15)

    def test_cancel_leaves_a_join_that_waits_for_rounds(self):
        # Two clients needed: no round opens for one.
        coord = self.coordinator(rounds=1, per_label=5, min_clients=2, tokens=1)
        client = x.CrossLmClient(settings(self.dir, coord.addr))
        rec = Recorder()
        client.set_listener(rec)
        asyncio.run(client.enroll(coord.tokens[0]))
        data = client.load_data_rows([x.LabeledText(text=t, label=l) for t, l in rows(20)])
        self.assertEqual(data.examples + data.test_examples, 20)
        asyncio.run(client.train())

        async def join_then_cancel():
            task = asyncio.ensure_future(client.join(None))
            deadline = time.time() + 30
            while client.status().activity != x.Activity.WAITING:
                self.assertLess(time.time(), deadline, "never joined")
                await asyncio.sleep(0.05)
            # A second long operation meanwhile is refused.
            with self.assertRaises(x.CrossLmError.Busy):
                await client.train()
            started = time.time()
            client.cancel()
            summary = await asyncio.wait_for(task, 15)
            return summary, time.time() - started

        summary, took = asyncio.run(join_then_cancel())
        self.assertTrue(summary.cancelled)
        self.assertEqual(summary.rounds, 0)
        self.assertLess(took, 20)
        self.assertTrue(rec.of(x.Activity.STOPPING))
        self.assertIsNotNone(client.status().checkpoint, "checkpoint kept")

    def test_bad_input_is_a_clear_error(self):
        port = free_udp_port()
        s = settings(self.dir, f"127.0.0.1:{port}")
        s.connect_timeout_ms = 1500
        client = x.CrossLmClient(s)

        with self.assertRaises(x.CrossLmError.Io) as e:
            client.load_data_file(os.path.join(self.dir, "no-such-file.jsonl"))
        self.assertIn("no-such-file.jsonl", str(e.exception))
        with self.assertRaises(x.CrossLmError.NotReady) as e:
            asyncio.run(client.train())
        self.assertIn("no private data", str(e.exception))
        with self.assertRaises(x.CrossLmError.NotReady) as e:
            asyncio.run(client.join(1))
        self.assertIn("not enrolled", str(e.exception))
        with self.assertRaises(x.CrossLmError.Enrollment) as e:
            asyncio.run(client.enroll("not-a-token"))
        self.assertIn("malformed token", str(e.exception))
        # Unreachable coordinator: nothing listens there.
        token = "xlm1." + "ab" * 16 + "." + "cd" * 32
        started = time.time()
        with self.assertRaises(x.CrossLmError.Network) as e:
            asyncio.run(client.enroll(token))
        self.assertIn("unreachable", str(e.exception))
        self.assertLess(time.time() - started, 10)

        # Wrong token for a real coordinator: refused with the reason.
        coord = self.coordinator(rounds=1, per_label=5, min_clients=1, tokens=1)
        good = coord.tokens[0]
        prefix, secret, fingerprint = good.split(".")
        wrong = ".".join([prefix, ("0" if secret[0] != "0" else "1") + secret[1:], fingerprint])
        client2 = x.CrossLmClient(settings(os.path.join(self.dir, "two"), coord.addr))
        with self.assertRaises(x.CrossLmError.Refused) as e:
            asyncio.run(client2.enroll(wrong))
        self.assertIn("token", str(e.exception))
        self.assertEqual(e.exception.code, x.RefusalCode.BAD_TOKEN)
        self.assertIsNone(client2.status().client_id)

        bad = settings(self.dir, None)
        bad.test_fraction = 1.5
        with self.assertRaises(x.CrossLmError.InvalidInput) as e:
            x.CrossLmClient(bad)
        self.assertIn("test fraction", str(e.exception))


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"bindings: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed or not result.testsRun else 0)
