"""A checkout participant in Python, written from docs/protocol.md alone.

It serves the inventory, payment and shipping commands of the checkout saga over NATS
JetStream with nothing but the nats-py client: one durable pull consumer on the
commands stream, replies published on the subject named in Skald-Reply-To, echoing the
saga headers. Results are deduplicated by Skald-Idempotency-Key (successes only).

    python checkout_participant.py nats://127.0.0.1:4222

Prints "ready" on stdout once it consumes; stops on SIGTERM.
"""

import asyncio
import hashlib
import json
import signal
import sys

import nats
from nats.errors import TimeoutError as NatsTimeout

ECHO = ["Skald-Saga-Id", "Skald-Saga-Type", "Skald-Step", "Skald-Kind", "Skald-Attempt",
        "Skald-Idempotency-Key"]


class Permanent(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def record_id(prefix, key):
    return prefix + "-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Services:
    def __init__(self):
        self.done = {}            # idempotency key -> success output
        self.reservations = {}    # reservation id -> released?
        self.charges = {}         # payment id -> refunded?
        self.shipments = set()

    def handle(self, subject, key, payload):
        if subject == "skald.cmd.inventory.reserve":
            rid = record_id("rsv", key)
            self.reservations.setdefault(rid, False)
            return {"reservation_id": rid}
        if subject == "skald.cmd.inventory.release":
            rid = payload.get("reservation_id")
            if rid in self.reservations:      # undoing unknown work is a success
                self.reservations[rid] = True
            return None
        if subject == "skald.cmd.payment.charge":
            if payload.get("amount_cents", 0) <= 0:
                raise Permanent("invalid_amount", "amount must be positive")
            pid = record_id("pay", key)
            self.charges.setdefault(pid, False)
            return {"payment_id": pid}
        if subject == "skald.cmd.payment.refund":
            pid = payload.get("payment_id")
            if pid in self.charges:
                self.charges[pid] = True
            return None
        if subject == "skald.cmd.shipping.ship":
            sid = record_id("shp", key)
            self.shipments.add(sid)
            return {"shipment_id": sid}
        raise Permanent("unknown_command", "no handler for " + subject)


async def main(url):
    nc = await nats.connect(url, name="python-checkout-participant")
    js = nc.jetstream()
    services = Services()
    sub = await js.pull_subscribe("skald.cmd.>", durable="python-checkout", stream="SKALD_COMMANDS")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=64, timeout=0.5)
        except NatsTimeout:
            continue
        for msg in msgs:
            h = msg.headers or {}
            key = h.get("Skald-Idempotency-Key")
            reply_to = h.get("Skald-Reply-To")
            if not key or not reply_to:
                await msg.term()          # nowhere to reply: never processable
                continue
            if key in services.done:
                outcome, body = "success", services.done[key]
            else:
                try:
                    body = services.handle(msg.subject, key, json.loads(msg.data or b"null") or {})
                    services.done[key] = body
                    outcome = "success"
                except Permanent as e:
                    outcome, body = "failure", {"code": e.code, "message": str(e)}
                except Exception as e:  # noqa: BLE001 - any other error may pass: retry
                    outcome, body = "retryable", {"code": "unavailable", "message": str(e)}
            headers = {k: h[k] for k in ECHO if k in h}
            headers["Skald-Outcome"] = outcome
            headers["Nats-Msg-Id"] = "reply:" + key + ":" + h.get("Skald-Attempt", "0")
            await js.publish(reply_to, json.dumps(body).encode(), headers=headers)
            await msg.ack()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
