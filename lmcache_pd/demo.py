"""`lmcache-pd demo`: a real KV handoff between two processes on this box.

Starts a receiver process and a sender process (``lmcache_pd.peer``), runs N requests of
L tokens (every second one shares its first half with the one before, so dedupe shows),
has the receiver verify every byte it committed, prints LMCache-style lines and a
summary table, and optionally writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmcache_pd.layout import preset
from lmcache_pd.peer import PeerProcess, RequestRow

console = Console()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-pd demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layout", default="llama-8b", help="tiny | llama-8b | deepseek-mla")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--buffer-mb", type=int, default=1024, help="receive/send buffer MiB")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    layout = preset(args.layout)
    env = dict(os.environ)
    env.setdefault("LMCACHE_PD_AUTH_SECRET", secrets.token_hex(32))
    common = [
        "--layout", args.layout,
        "--chunk-size", str(args.chunk_size),
        "--buffer-bytes", str(args.buffer_mb << 20),
    ]  # fmt: skip
    console.print(
        f"[bold]lmcache-pd demo[/bold]: {args.requests} requests x {args.tokens} tokens, "
        f"layout {args.layout} ({layout.bytes_per_token} B/token), chunk {args.chunk_size}"
    )
    rx = PeerProcess("receiver", *common, "--verify", env=env)
    tx = None
    rows: list[RequestRow] = []
    try:
        endpoint = rx.read_tagged("READY", 60)
        console.print(f"receiver process {rx.proc.pid} listening on {endpoint}")
        tx = PeerProcess(
            "sender", *common, "--endpoint", endpoint, "--requests", str(args.requests),
            "--tokens", str(args.tokens), env=env,
        )  # fmt: skip
        for _ in range(args.requests):
            row: RequestRow = json.loads(tx.read_tagged("RESULT", 120))
            rows.append(row)
            if row["ok"]:
                size_gb = row["bytes"] / 1e9
                gbps = size_gb / row["seconds"] if row["seconds"] else 0.0
                console.print(
                    f"[{row['req_id']}] Stored {row['tokens']} out of total {row['tokens']} "
                    f"tokens. sent {row['sent']} chunks, dedup {row['dedup']} chunks, "
                    f"size: {size_gb:.4f} GB, cost {row['seconds'] * 1e3:.2f} ms, "
                    f"throughput: {gbps:.2f} GB/s",
                    markup=False,
                )
            else:
                console.print(f"[red][{row['req_id']}] FAILED: {row['error']}[/red]")
        tx_stats = json.loads(tx.read_tagged("STATS", 30))
    finally:
        if tx is not None:
            tx.stop()
        rx.close_stdin()
    rx_stats = json.loads(rx.read_tagged("STATS", 60))
    rx.stop()

    ok_rows = [r for r in rows if r["ok"]]
    moved = sum(int(r["bytes"]) for r in ok_rows)
    seconds = sum(float(r["seconds"]) for r in ok_rows)
    dedup_chunks = sum(int(r["dedup"]) for r in ok_rows)
    verified = (
        len(ok_rows) == args.requests
        and rx_stats["pattern_bad"] == 0
        and rx_stats.get("checksum_failures", 0) == 0
        and rx_stats["pattern_verified"] > 0
    )
    summary = {
        "requests": args.requests,
        "tokens_per_request": args.tokens,
        "layout": args.layout,
        "verified": verified,
        "bytes_moved": moved,
        "chunks_sent": sum(int(r["sent"]) for r in ok_rows),
        "dedupe_hit_chunks": dedup_chunks,
        "dedupe_hit_tokens": dedup_chunks * args.chunk_size,
        "gbps": moved / seconds / 1e9 if seconds else 0.0,
        "chunks_verified_at_receiver": rx_stats["pattern_verified"],
        "receiver": rx_stats,
        "sender": tx_stats,
    }
    table = Table(title="lmcache-pd demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "requests", "verified", "bytes_moved", "chunks_sent", "dedupe_hit_tokens",
        "chunks_verified_at_receiver",
    ):  # fmt: skip
        table.add_row(key, str(summary[key]))
    table.add_row("handoff GB/s (sum bytes / sum time)", f"{summary['gbps']:.2f}")
    console.print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
        console.print(f"wrote {args.json_path}")
    if not verified:
        console.print("[red]demo FAILED: not every request was moved and verified[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
