"""Reads every signature of a PDF with pyHanko and prints, one line each, its field name and
the PAdES baseline level its CMS meets: B-B (SubFilter ETSI.CAdES.detached, ESS
signing-certificate-v2 signed, no signing-time) or B-T (B-B and a signature timestamp token);
"none" with the reason otherwise.

Usage: pades_level.py FILE.pdf
"""
import sys

from pyhanko.pdf_utils.reader import PdfFileReader

ESS_V2 = "signing_certificate_v2"


def level(sig):
    if sig.sig_object.get("/SubFilter") != "/ETSI.CAdES.detached":
        return "none (SubFilter %s)" % sig.sig_object.get("/SubFilter")
    signed = {a["type"].native for a in sig.signer_info["signed_attrs"]}
    if "signing_time" in signed:
        return "none (a signing-time attribute)"
    if ESS_V2 not in signed:
        return "none (no ESS signing-certificate-v2)"
    unsigned = sig.signer_info["unsigned_attrs"]
    names = set() if unsigned.native is None else {a["type"].native for a in unsigned}
    return "B-T" if "signature_time_stamp_token" in names else "B-B"


with open(sys.argv[1], "rb") as f:
    for sig in PdfFileReader(f).embedded_signatures:
        print("%s %s" % (sig.field_name, level(sig)))
