"""A checkout participant in Python, written from docs/protocol.md alone.

It serves the inventory, payment and shipping commands of the checkout saga over NATS
JetStream with nothing but the nats-py client: one durable pull consumer on the
commands stream (created here, with the settings the page gives), replies published on
the subject named in Skald-Reply-To, echoing the saga headers, with a per-outcome
Nats-Msg-Id that ends with the reply token's first 16 characters, and a child
traceparent.

Every command goes through the TCC fence of the page, kept per action key: a claim
before the work, recorded outcomes replayed, retryable answers remembered per attempt,
the deadline rule, compensations that undo by Skald-Action-Key and leave a tombstone,
and actions refused once their key is compensated. Records live in memory (one event
loop: the code between two awaits is one transaction); a real service keeps them in
its database, in the transaction of the work.

    python checkout_participant.py nats://127.0.0.1:4222

Prints "ready" on stdout once it consumes; stops on SIGTERM or SIGINT.
"""

import asyncio
import hashlib
import json
import re
import signal
import sys
import time

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

STREAM = "SKALD_COMMANDS"
DURABLE = "python-checkout"
SUBJECTS = "skald.cmd.>"
ECHO = ["Skald-Saga-Id", "Skald-Saga-Type", "Skald-Step", "Skald-Kind", "Skald-Attempt",
        "Skald-Idempotency-Key", "Skald-Reply-Token"]
TOKEN_PREFIX = 16       # characters of Skald-Reply-Token at the end of a reply's Nats-Msg-Id
LEASE_MS = 30_000       # a claim older than this belongs to a crashed holder
CONCURRENCY = 64


def log(*parts):
    print("checkout_participant:", *parts, file=sys.stderr, flush=True)


def now_ms():
    return int(time.time() * 1000)


class Permanent(Exception):
    """The command can never succeed: a `failure` reply, final for the key."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def error(code, message):
    return {"code": code, "message": message}


def record_id(prefix, key):
    return prefix + "-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return max(h, 1)


TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def reply_msg_id(h, outcome):
    """`reply:<idempotency key>:<attempt>:<outcome>:<token prefix>`: one per attempt and
    outcome, for the broker's de-duplication. The token's first characters make it an
    id only the service the command went to can know, so no other service can publish
    under it first and have the broker drop this reply. Without a token (a command from
    an orchestrator older than 0.4), the id ends with the outcome."""
    msg_id = "reply:%s:%s:%s" % (h["Skald-Idempotency-Key"], h["Skald-Attempt"], outcome)
    token = h.get("Skald-Reply-Token")
    if token:
        msg_id += ":" + token[:TOKEN_PREFIX]
    return msg_id


def reply_traceparent(h):
    """Our handling's span, a child of the command's: same trace, the span id of
    `reply:<idempotency key>:<attempt>` (what skald's Rust helper derives too)."""
    m = TRACEPARENT.match(h.get("traceparent", ""))
    if not m or m.group(1) == "0" * 32 or m.group(2) == "0" * 16:
        return None
    span = fnv1a64("reply:" + h["Skald-Idempotency-Key"] + ":" + h["Skald-Attempt"])
    return "00-%s-%016x-%s" % (m.group(1), span, m.group(3))


class Ledger:
    """The three services' records, each kept under the action key that made it, so a
    compensation finds what to undo by Skald-Action-Key alone."""

    def __init__(self):
        self.reservations = {}   # action key -> {"id", "released"}
        self.charges = {}        # action key -> {"id", "amount_cents", "refunded"}
        self.shipments = {}      # action key -> shipment id

    def do(self, subject, key, payload):
        if not isinstance(payload, dict):
            raise Permanent("bad_request", "the body of %s must be a JSON object" % subject)
        if subject == "skald.cmd.inventory.reserve":
            items = payload.get("items")
            if not isinstance(items, list) or not items:
                raise Permanent("bad_request", "reserve needs a non-empty items list")
            rid = record_id("rsv", key)
            self.reservations.setdefault(key, {"id": rid, "released": False})
            return {"reservation_id": rid}
        if subject == "skald.cmd.payment.charge":
            amount = payload.get("amount_cents")
            if not isinstance(amount, int) or amount <= 0:
                raise Permanent("invalid_amount", "amount_cents must be a positive integer")
            pid = record_id("pay", key)
            self.charges.setdefault(key, {"id": pid, "amount_cents": amount, "refunded": False})
            return {"payment_id": pid}
        if subject == "skald.cmd.shipping.ship":
            sid = record_id("shp", key)
            self.shipments.setdefault(key, sid)
            return {"shipment_id": sid}
        raise Permanent("unknown_command", "no action is served on " + subject)

    def undo(self, subject, action_key):
        # By the action key, never by ids from the payload (they are null when the action
        # is in doubt). Finding nothing is fine: the action never took effect.
        if subject == "skald.cmd.inventory.release":
            if action_key in self.reservations:
                self.reservations[action_key]["released"] = True
            return
        if subject == "skald.cmd.payment.refund":
            if action_key in self.charges:
                self.charges[action_key]["refunded"] = True
            return
        raise Permanent("unknown_command", "no compensation is served on " + subject)


class Participant:
    """The fence of docs/protocol.md around the ledger.

    fence:   action key -> {"state": running | success | failure | compensated,
                            "lease_until": ms, "holder": token, "body": reply body}
    retried: (command key, attempt) -> the retryable body answered to that attempt
    """

    def __init__(self, ledger, clock=now_ms):
        self.ledger = ledger
        self.clock = clock
        self.fence = {}
        self.retried = {}
        self.claims = 0

    def _retryable(self, h, code, message):
        body = error(code, message)
        self.retried[(h["Skald-Idempotency-Key"], h["Skald-Attempt"])] = body
        return "retryable", body

    def _running(self, record):
        return (record is not None and record["state"] == "running"
                and record["lease_until"] > self.clock())

    def _early_answer(self, h):
        """Rules shared by both kinds once the key's state allows the command: the same
        answer for an attempt already answered retryable, and the deadline rule."""
        earlier = self.retried.get((h["Skald-Idempotency-Key"], h["Skald-Attempt"]))
        if earlier is not None:
            return "retryable", earlier
        deadline = h.get("Skald-Deadline", "")
        if deadline.isdigit() and int(deadline) and self.clock() > int(deadline):
            return self._retryable(h, "deadline_passed",
                                   "not started before its deadline " + deadline)
        return None

    async def handle(self, subject, h, data):
        """The outcome and reply body of one delivery."""
        try:
            payload = json.loads(data) if data else None
        except ValueError as e:
            payload = e
        kind = h.get("Skald-Kind")
        if kind == "action":
            return await self.action(subject, h, payload)
        if kind == "compensation":
            return self.compensation(subject, h, payload)
        return "failure", error("bad_request", "unknown Skald-Kind %r" % kind)

    async def action(self, subject, h, payload):
        key = h["Skald-Idempotency-Key"]
        record = self.fence.get(key)
        if record is not None and record["state"] == "compensated":
            return "failure", error("compensated",                 # anti-suspension
                                    "the action is compensated, not applied: " + key)
        if record is not None and record["state"] in ("success", "failure"):
            return record["state"], record["body"]                 # replay, never redo
        if self._running(record):
            return self._retryable(h, "in_progress", "another delivery is running " + key)
        early = self._early_answer(h)
        if early is not None:
            return early
        # Claim (nothing awaited since the checks: atomic on this event loop).
        self.claims += 1
        holder = self.claims
        self.fence[key] = {"state": "running", "holder": holder,
                           "lease_until": self.clock() + LEASE_MS, "body": None}
        await asyncio.sleep(0)       # the work's I/O would go here; others run meanwhile
        record = self.fence.get(key)
        if record is None or record.get("holder") != holder:
            # Our claim was taken over (lease expired) or tombstoned: apply nothing.
            return self._retryable(h, "in_progress", "the claim on %s was lost" % key)
        # The work and its record together.
        try:
            if isinstance(payload, Exception):
                raise Permanent("bad_request", "the body is not JSON: %s" % payload)
            output = self.ledger.do(subject, key, payload)
        except Permanent as e:
            body = error(e.code, str(e))
            self.fence[key] = {"state": "failure", "body": body}   # final for the key
            return "failure", body
        except Exception as e:  # noqa: BLE001 - nothing was applied: retry
            del self.fence[key]                                    # release the claim
            return self._retryable(h, "unavailable", str(e))
        self.fence[key] = {"state": "success", "body": output}
        return "success", output

    def compensation(self, subject, h, payload):
        action_key = h.get("Skald-Action-Key") or "%s:%s:action" % (
            h["Skald-Saga-Id"], h["Skald-Step"])
        record = self.fence.get(action_key)
        if record is not None and record["state"] == "compensated":
            return "success", None                                 # again, every time
        if self._running(record):
            return self._retryable(h, "action_in_progress",
                                   "the action %s is still running" % action_key)
        early = self._early_answer(h)
        if early is not None:
            return early
        try:
            self.ledger.undo(subject, action_key)
        except Permanent as e:
            return "failure", error(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - nothing undone: retry
            return self._retryable(h, "unavailable", str(e))
        # Undone (or never done: the empty rollback), and the tombstone.
        self.fence[action_key] = {"state": "compensated", "body": None}
        return "success", None


async def consumer(js):
    """The durable pull consumer, created (or updated) here: skald creates only the
    streams. Waits for the commands stream, which skald creates at start-up."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await js.stream_info(STREAM)
            break
        except NotFoundError:
            if time.monotonic() > deadline:
                raise
            log("stream %s does not exist yet; waiting for skald to create it" % STREAM)
            await asyncio.sleep(0.5)
    await js.add_consumer(STREAM, ConsumerConfig(
        durable_name=DURABLE,
        filter_subject=SUBJECTS,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30,
        max_deliver=-1,
        max_ack_pending=10_000,
        deliver_policy=DeliverPolicy.ALL,
    ))
    return await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)


async def serve(js, participant, msg):
    h = msg.headers or {}
    reply_to = h.get("Skald-Reply-To")
    if not reply_to or any(k not in h for k in ECHO if k != "Skald-Reply-Token"):
        log("no reply possible for a command on %s; terminated" % msg.subject)
        await msg.term()
        return
    outcome, body = await participant.handle(msg.subject, h, msg.data)
    headers = {k: h[k] for k in ECHO if k in h}
    headers["Skald-Outcome"] = outcome
    headers["Nats-Msg-Id"] = reply_msg_id(h, outcome)
    traceparent = reply_traceparent(h)
    if traceparent:
        headers["traceparent"] = traceparent
    try:
        await js.publish(reply_to, json.dumps(body, separators=(",", ":")).encode(),
                         headers=headers)
    except Exception as e:  # noqa: BLE001 - not stored: have the command come again
        log("publishing the reply to %s failed (%s); the command will come again" % (
            h["Skald-Idempotency-Key"], e))
        await msg.nak(delay=0.2)
        return
    await msg.ack()          # only once the reply is stored


async def main(url):
    nc = await nats.connect(url, name="python-checkout-participant")
    js = nc.jetstream()
    participant = Participant(Ledger())
    sub = await consumer(js)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    limit = asyncio.Semaphore(CONCURRENCY)
    tasks = set()

    async def one(msg):
        try:
            await serve(js, participant, msg)
        except Exception as e:  # noqa: BLE001 - unacknowledged: redelivered after ack_wait
            log("handling a command on %s failed: %r" % (msg.subject, e))
        finally:
            limit.release()

    print("ready", flush=True)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=CONCURRENCY, timeout=0.5)
        except NatsTimeout:
            continue
        except Exception as e:  # noqa: BLE001 - e.g. a reconnect: try again shortly
            log("fetch failed: %r" % e)
            await asyncio.sleep(0.5)
            continue
        for msg in msgs:
            await limit.acquire()
            task = asyncio.create_task(one(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
