"""A test time-stamping authority (RFC 3161) over HTTP: `openssl ts -reply` behind a small
server. It makes its own key and a certificate issued by the CA given, with the critical
timeStamping extended key usage RFC 3161 requires, then answers each POSTed
application/timestamp-query with an application/timestamp-reply.

Usage: tsa.py DIR CA.crt CA.key   (prints "listening on PORT" once it serves)
"""
import http.server
import os
import subprocess
import sys
import tempfile

work, ca_crt, ca_key = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(work, exist_ok=True)
key, crt = os.path.join(work, "tsa.key"), os.path.join(work, "tsa.crt")


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
    "-out", key)
ext = os.path.join(work, "tsa.ext")
with open(ext, "w") as f:
    f.write("extendedKeyUsage=critical,timeStamping\n"
            "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n")
csr = os.path.join(work, "tsa.csr")
run("openssl", "req", "-new", "-key", key, "-subj", "/O=sealgate demo/CN=test TSA", "-out", csr)
run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
    "-days", "30", "-extfile", ext, "-out", crt)
config = os.path.join(work, "tsa.cnf")
with open(config, "w") as f:
    f.write(f"""[ tsa ]
default_tsa = test_tsa
[ test_tsa ]
serial = {work}/serial
crypto_device = builtin
signer_cert = {crt}
certs = {ca_crt}
signer_key = {key}
signer_digest = sha256
default_policy = 1.3.6.1.4.1.55555.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
""")
with open(os.path.join(work, "serial"), "w") as f:
    f.write("01\n")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        query = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with tempfile.TemporaryDirectory() as t:
            q, r = os.path.join(t, "q.tsq"), os.path.join(t, "r.tsr")
            with open(q, "wb") as f:
                f.write(query)
            done = subprocess.run(["openssl", "ts", "-reply", "-config", config,
                                   "-queryfile", q, "-out", r], capture_output=True)
            if done.returncode != 0:
                self.send_response(400)
                self.end_headers()
                self.wfile.write(done.stderr)
                return
            with open(r, "rb") as f:
                reply = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/timestamp-reply")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print("listening on %d" % server.server_address[1], flush=True)
server.serve_forever()
