"""The notifier's messages and senders: Slack Block Kit, e-mail (text and HTML), CloudEvents webhooks.

Part of the notifier (see its package docstring). A message is about a group of events (one
event, or a storm grouped by the route's `groupBy`); it says what happened, to which run, why
(the event's words) and what happens next (ETA, checkpoint deadline, GPU-hours exhaustion).
`send(receiver, events, session)` delivers one message and raises `SendError` — `retryable`,
with the server's `Retry-After` when it gave one — when it did not.
"""

from __future__ import annotations

import asyncio
import html
import json
import smtplib
from email.message import EmailMessage

import aiohttp

from jobtree.api.events import cloudevent
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.services.notifier.config import Receiver

NEXT = (("eta", "expected to start at {}"), ("checkpointDeadline", "must run again by {}"),
        ("exhaustsAt", "GPU-hours run out at {}"))


class SendError(Exception):
    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable, self.retry_after = retryable, retry_after


def title(events: list[bus.Event]) -> str:
    kinds = sorted({e.kind for e in events})
    if len(events) == 1:
        e = events[0]
        return f"{e.kind}: {e.subject.split('/', 1)[1] if '/' in e.subject else e.subject}"
    return f"{len(events)} jobtree events: {', '.join(kinds)}"


def next_words(e: bus.Event) -> str:
    return "; ".join(text.format(e.data[k]) for k, text in NEXT if e.data.get(k))


def line(e: bus.Event) -> str:
    after = next_words(e)
    return f"{e.kind} — {e.message}" + (f" (next: {after})" if after else "")


def slack_payload(events: list[bus.Event]) -> dict[str, object]:
    blocks: list[dict[str, object]] = [{"type": "header", "text": {"type": "plain_text", "text": title(events)[:150]}}]
    for e in events[:45]:  # Slack allows 50 blocks
        after = next_words(e)
        text = f"*{e.kind}* `{e.subject}`\n{e.message}" + (f"\n_Next:_ {after}" if after else "")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}})
    if len(events) > 45:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"and {len(events) - 45} more"}]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"jobtree {events[0].source} · "
                                                    f"event {events[0].id}"}]})
    return {"text": "\n".join(line(e) for e in events)[:3000], "blocks": blocks}


def email_message(r: Receiver, events: list[bus.Event]) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = f"[jobtree] {title(events)}"
    msg["From"] = r.sender
    msg["To"] = ", ".join(r.to)
    msg["X-Jobtree-Event-Ids"] = ",".join(e.id for e in events)
    msg.set_content("\n".join(f"- {line(e)}" for e in events) + f"\n\nSource: {events[0].source}\n")
    items = "".join(f"<li><b>{html.escape(e.kind)}</b> <code>{html.escape(e.subject)}</code>: "
                    f"{html.escape(e.message)}" + (f"<br><i>Next:</i> {html.escape(next_words(e))}" if next_words(e)
                                                   else "") + "</li>" for e in events)
    msg.add_alternative(f"<html><body><h3>{html.escape(title(events))}</h3><ul>{items}</ul>"
                        f"<p style='color:#666'>jobtree {html.escape(events[0].source)}</p></body></html>",
                        subtype="html")
    return msg


def _smtp_send(r: Receiver, msg: EmailMessage) -> None:
    host, port = r.smarthost.rsplit(":", 1)
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        if r.starttls:
            smtp.starttls()
        if r.username:
            smtp.login(r.username, r.password)
        smtp.send_message(msg)


async def send(r: Receiver, events: list[bus.Event], session: aiohttp.ClientSession) -> None:
    if r.kind == "email":
        try:
            await asyncio.to_thread(_smtp_send, r, email_message(r, events))
        except smtplib.SMTPResponseException as exc:
            # 4xx is the server saying "not now"; 5xx is final
            raise SendError(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}", retryable=exc.smtp_code < 500) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise SendError(f"SMTP: {exc!r}", retryable=True) from None
        return
    if r.kind == "slack":
        body: object = slack_payload(events)
        headers = {"Content-Type": "application/json"}
    elif len(events) == 1:
        body = cloudevent(events[0])
        headers = {"Content-Type": "application/cloudevents+json"}
    else:
        body = [cloudevent(e) for e in events]
        headers = {"Content-Type": "application/cloudevents-batch+json"}
    try:
        async with session.post(r.url, data=json.dumps(body), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status < 300:
                return
            text = (await resp.text())[:200]
            retry_after = resp.headers.get("Retry-After")
            wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            retryable = resp.status == 429 or resp.status >= 500 or resp.status == 408
            raise SendError(f"HTTP {resp.status}: {text}", retryable=retryable, retry_after=wait)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SendError(f"{r.url}: {exc!r}", retryable=True) from None
