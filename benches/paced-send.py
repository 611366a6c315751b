#!/usr/bin/env python3
"""Sends every .eml of a folder to an SMTP server at a fixed rate, open-loop
(each message leaves at its scheduled time whatever the server's latency,
as independent clients do), and prints the rate achieved.

usage: benches/paced-send.py --port P --rate MSG_PER_S DIR
"""
import argparse
import concurrent.futures
import os
import smtplib
import sys
import time


def send(port, path):
    with open(path, "rb") as f:
        body = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=120) as s:
            s.sendmail("bench@test.example", ["user@test.example"], body)
        return True
    except (OSError, smtplib.SMTPException) as e:
        print(f"{os.path.basename(path)}: {e}", file=sys.stderr)
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("dir")
    a = ap.parse_args()
    files = sorted(os.path.join(a.dir, f) for f in os.listdir(a.dir) if f.endswith(".eml"))
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        for i, path in enumerate(files):
            delay = start + i / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, a.port, path))
        sent_by = time.monotonic()
        ok = sum(f.result() for f in futures)
    print(f"{len(files) / (sent_by - start):.1f} msg/s offered, {ok}/{len(files)} accepted")


if __name__ == "__main__":
    main()
