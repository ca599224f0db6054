"""The demo's local credit board: signed batches in, one credit per key."""

from __future__ import annotations

import json

import httpx

from gateway.credit_board import CreditBoard
from gateway.upstream import sign

SECRET = b"demo-secret"


def batch(*keys: str) -> bytes:
    records = [
        {
            "key": key,
            "kind": "alert.resolved",
            "body": {"credit": {"kind": "alert", "credited": "ana", "rule": "call"}},
        }
        for key in keys
    ]
    return json.dumps({"site": "s", "gateway": "g", "records": records}).encode()


def test_board_checks_signatures_and_counts_each_record_once():
    board = CreditBoard(SECRET, {"ana": "Ana Silva"})
    board.start()
    try:
        body = batch("alert:1", "alert:2")
        headers = {"X-Signature": sign(SECRET, body)}
        assert httpx.post(board.url, content=body, headers=headers).status_code == 200
        # A redelivery of the same batch (at least once) is accepted, not counted.
        assert httpx.post(board.url, content=body, headers=headers).status_code == 200
        forged = {"X-Signature": sign(b"wrong", body)}
        assert httpx.post(board.url, content=body, headers=forged).status_code == 401
        assert httpx.post(board.url, content=body).status_code == 401
    finally:
        board.stop()
    assert len(board.credits) == 2
