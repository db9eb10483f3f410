#!/usr/bin/env python3
"""Receivers of sealgate's alert deliveries, for the tests, written from the receivers' side
of each format and sharing no code with sealgate.

  alert_receivers.py http --port P --secret FILE --robot-secret FILE --out DIR
      /hook      a webhook: X-Sealgate-Signature must be sha256=HMAC-SHA256(secret,
                 X-Sealgate-Timestamp "." body), else 401
      /wecom     a WeCom group robot (?key=wecom-key), answers {"errcode": 0}
      /dingtalk  a DingTalk robot (?access_token=…&timestamp=ms&sign=…), the sign checked
      /feishu    a Feishu custom bot (timestamp and sign in the body), the sign checked
      Each message taken is one JSON line in DIR/NAME.jsonl; refused ones in DIR/refused.jsonl.
  alert_receivers.py smtp --port P --cert C --key K --user U --password W --out DIR
      an SMTP server that requires STARTTLS and AUTH; each mail one JSON line in DIR/mail.jsonl.
Prints "ready" once listening.
"""

import argparse
import base64
import hashlib
import hmac
import json
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

lock = threading.Lock()


def record(out: Path, name: str, entry: dict):
    with lock, open(out / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def http(args):
    secret = Path(args.secret).read_text().strip().encode()
    robot = Path(args.robot_secret).read_text().strip()
    out = Path(args.out)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            url = urllib.parse.urlparse(self.path)
            q = dict(urllib.parse.parse_qsl(url.query))
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if url.path == "/hook":
                ts = self.headers.get("X-Sealgate-Timestamp", "")
                want = "sha256=" + hmac.new(secret, ts.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
                got = self.headers.get("X-Sealgate-Signature", "")
                fresh = ts.isdigit() and abs(time.time() - int(ts)) < 300
                if not (hmac.compare_digest(want, got) and fresh):
                    record(out, "refused", {"path": "/hook", "why": "signature"})
                    return self.answer(401, {"error": "bad signature"})
                record(out, "hook", {"delivery": self.headers.get("X-Sealgate-Delivery"),
                                     "body": json.loads(body)})
                return self.answer(200, {"ok": True})
            msg = json.loads(body)
            if url.path == "/wecom":
                if q.get("key") != "wecom-key" or msg.get("msgtype") != "text":
                    record(out, "refused", {"path": "/wecom"})
                    return self.answer(200, {"errcode": 93000, "errmsg": "invalid webhook url"})
                record(out, "wecom", msg)
                return self.answer(200, {"errcode": 0, "errmsg": "ok"})
            if url.path == "/dingtalk":
                ts = q.get("timestamp", "")
                want = base64.b64encode(hmac.new(robot.encode(), f"{ts}\n{robot}".encode(),
                                                 hashlib.sha256).digest()).decode()
                if q.get("sign") != want or not ts.isdigit() or \
                        abs(time.time() * 1000 - int(ts)) > 3_600_000:
                    record(out, "refused", {"path": "/dingtalk"})
                    return self.answer(200, {"errcode": 310000, "errmsg": "sign not match"})
                record(out, "dingtalk", msg)
                return self.answer(200, {"errcode": 0, "errmsg": "ok"})
            if url.path == "/feishu":
                ts = msg.get("timestamp", "")
                key = f"{ts}\n{robot}".encode()
                want = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
                if msg.get("sign") != want or msg.get("msg_type") != "text":
                    record(out, "refused", {"path": "/feishu"})
                    return self.answer(200, {"code": 19021, "msg": "sign match fail"})
                record(out, "feishu", msg)
                return self.answer(200, {"code": 0, "msg": "success"})
            self.answer(404, {})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def smtp(args):
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    out = Path(args.out)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (getattr(auth_data, "login", None) == args.user.encode()
              and getattr(auth_data, "password", None) == args.password.encode())
        return AuthResult(success=ok)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            record(out, "mail", {"from": envelope.mail_from, "to": envelope.rcpt_tos,
                                 "tls": session.ssl is not None,
                                 "data": envelope.content.decode("utf-8", "replace")})
            return "250 OK"

    c = Controller(Handler(), hostname="127.0.0.1", port=args.port, tls_context=ctx,
                   require_starttls=True, authenticator=authenticator, auth_required=True,
                   auth_require_tls=True)
    c.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        c.stop()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("http")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--secret", required=True)
    h.add_argument("--robot-secret", required=True)
    h.add_argument("--out", required=True)
    s = sub.add_parser("smtp")
    for a in ("--cert", "--key", "--user", "--password", "--out"):
        s.add_argument(a, required=True)
    s.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    (http if args.cmd == "http" else smtp)(args)


if __name__ == "__main__":
    sys.exit(main())
