#!/usr/bin/env python3
"""Peak memory of `spillway-ingest` under a spike of maximum-size requests on a stalled broker.

Starts a stand-in for SNS that accepts connections and never answers (the broker stalls),
runs `spillway-ingest --broker aws` against it with the given `--max-inflight-bytes`, sends
`--requests` requests of about 1 MiB each (1,000 valid events, the default limits) at once,
and prints the process's peak resident memory (VmHWM) and the answers by status. Every
request is answered 503: `overloaded` past the budget, `publish_failed` once the publish
timeout runs out. Nothing is published anywhere.

    python3 scripts/ingest-memory.py --bin target/release/spillway-ingest --budget 268435456
    python3 scripts/ingest-memory.py --bin target/release/spillway-ingest --budget 0

Standard library only.
"""

import argparse
import collections
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

KEY = "memory-bench-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stalled_broker(stop):
    """A TCP server that accepts and reads but never answers; returns its port."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    server.settimeout(0.2)
    held = []

    def drain(conn):
        conn.settimeout(0.2)
        while not stop.is_set():
            try:
                if not conn.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            held.append(conn)
            threading.Thread(target=drain, args=(conn,), daemon=True).start()
        for conn in held:
            conn.close()
        server.close()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def body(events):
    """About 1 KiB per event: an attribute map fills what the schema's fields leave."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    batch = []
    for i in range(events):
        batch.append(
            {
                "event_id": str(uuid.uuid4()),
                "type": "impression",
                "occurred_at": now,
                "advertiser_id": "adv-1",
                "campaign_id": "cmp-1",
                "ad_id": f"ad-{i % 50}",
                "attributes": {f"k{j}": "v" * 200 for j in range(3)},
            }
        )
    return json.dumps(batch).encode()


def peak_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", required=True, help="path of spillway-ingest")
    p.add_argument("--budget", type=int, required=True, help="--max-inflight-bytes (0: none)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--publish-timeout-ms", type=int, default=15000)
    args = p.parse_args()

    stop = threading.Event()
    sns_port = stalled_broker(stop)
    port = free_port()
    keys = json.dumps(
        [
            {
                "sha256": __import__("hashlib").sha256(KEY.encode()).hexdigest(),
                "tenant": "bench",
                "advertisers": "*",
            }
        ]
    )
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{sns_port}",
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        SPILLWAY_API_KEYS=keys,
        RUST_LOG="error",
    )
    proc = subprocess.Popen(
        [
            args.bin,
            "--broker", "aws",
            "--topic-arn", "arn:aws:sns:us-east-1:000000000000:stalled",
            "--listen", f"127.0.0.1:{port}",
            "--max-inflight-bytes", str(args.budget),
            "--publish-timeout-ms", str(args.publish_timeout_ms),
            "--publish-attempts", "1",
            "--rate-limit-eps", "0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit("spillway-ingest did not start listening")
        payload = body(args.events)
        idle_kib = peak_kib(proc.pid)
        statuses = collections.Counter()
        lock = threading.Lock()

        def post():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                conn.request(
                    "POST",
                    "/v1/events",
                    body=payload,
                    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                answer = resp.read()
                code = json.loads(answer).get("error", {}).get("code", "") if answer else ""
                key = f"{resp.status} {code}".strip()
            except Exception as e:  # noqa: BLE001 - a figure, not a library
                key = f"no answer ({type(e).__name__})"
            finally:
                conn.close()
            with lock:
                statuses[key] += 1

        started = time.monotonic()
        threads = [threading.Thread(target=post) for _ in range(args.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        peak = peak_kib(proc.pid)
        print(
            json.dumps(
                {
                    "budget_bytes": args.budget,
                    "requests": args.requests,
                    "request_bytes": len(payload),
                    "idle_peak_mib": round(idle_kib / 1024, 1),
                    "peak_rss_mib": round(peak / 1024, 1),
                    "answers": dict(statuses),
                    "seconds": round(took, 1),
                }
            )
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop.set()


if __name__ == "__main__":
    main()
