// sealgate approval page: passkey registration, sign-in and decisions (WebAuthn in the
// browser; every check that counts is made by the daemon).
"use strict";

function b64u(buf) {
  const bytes = new Uint8Array(buf);
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function unb64u(text) {
  const s = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

async function post(url, body) {
  const r = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let v = {};
  try { v = await r.json(); } catch (e) { v = { ok: false, reason: "http_" + r.status, message: r.statusText }; }
  return v;
}

function say(el, text, state) {
  el.textContent = text;
  el.dataset.state = state;
}

// An assertion as the daemon reads it.
function assertionFields(cred) {
  return {
    credential: b64u(cred.rawId),
    authenticatorData: b64u(cred.response.authenticatorData),
    clientDataJSON: b64u(cred.response.clientDataJSON),
    signature: b64u(cred.response.signature),
  };
}

function register() {
  const box = document.getElementById("register");
  if (!box) return;
  const o = JSON.parse(box.dataset.options);
  const out = document.getElementById("register-result");
  document.getElementById("register-button").addEventListener("click", async () => {
    try {
      const cred = await navigator.credentials.create({
        publicKey: {
          challenge: unb64u(o.challenge),
          rp: o.rp,
          user: { id: unb64u(o.user.id), name: o.user.name, displayName: o.user.displayName },
          pubKeyCredParams: [{ type: "public-key", alg: -7 }, { type: "public-key", alg: -8 }],
          authenticatorSelection: { residentKey: "preferred", userVerification: "required" },
          excludeCredentials: o.exclude.map((id) => ({ type: "public-key", id: unb64u(id) })),
          attestation: "none",
          timeout: 120000,
        },
      });
      const v = await post("/register", {
        invite: o.invite,
        clientDataJSON: b64u(cred.response.clientDataJSON),
        attestationObject: b64u(cred.response.attestationObject),
      });
      if (v.ok) {
        say(out, "✔ " + v.credential_id, "registered");
        const pre = document.getElementById("register-entry");
        // The approver's entry in the daemon's trust store (an approver already there keeps
        // their entry and gets the [[approver.passkey]] part under it).
        pre.textContent = "[[approver]]\nid = \"" + v.approver + "\"\nrole = \"" + v.role +
          "\"\ndepartment = \"" + v.department + "\"\n\n" + v.trust_store_entry;
        pre.hidden = false;
      } else {
        say(out, "✘ " + v.reason + ": " + v.message, "refused");
      }
    } catch (e) {
      say(out, "✘ " + e.name + ": " + e.message, "error");
    }
  });
}

function login() {
  const form = document.getElementById("approver-login");
  if (!form) return;
  const out = document.getElementById("login-error");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const approver = document.getElementById("approver-id").value;
    try {
      const o = await post("/approvals/login/options", { approver });
      const cred = await navigator.credentials.get({
        publicKey: {
          challenge: unb64u(o.challenge),
          rpId: o.rpId,
          allowCredentials: o.allow.map((id) => ({ type: "public-key", id: unb64u(id) })),
          userVerification: "required",
          timeout: 120000,
        },
      });
      const v = await post("/approvals/login/finish", Object.assign({ approver }, assertionFields(cred)));
      if (v.ok) {
        location.href = "/approvals";
      } else {
        say(out, "✘ " + v.message, "refused");
      }
    } catch (e) {
      say(out, "✘ " + e.name + ": " + e.message, "error");
    }
  });
}

function decision() {
  const box = document.getElementById("decision");
  if (!box) return;
  const o = JSON.parse(box.dataset.options);
  const out = document.getElementById("decision-result");
  async function decide(reason) {
    try {
      const c = await post("/approvals/" + encodeURIComponent(o.id) + "/challenge", { csrf: o.csrf, reason });
      if (!c.challenge) {
        say(out, "✘ " + c.reason + ": " + c.message, "refused");
        return;
      }
      const cred = await navigator.credentials.get({
        publicKey: {
          challenge: unb64u(c.challenge),
          rpId: c.rpId,
          allowCredentials: [{ type: "public-key", id: unb64u(c.credential) }],
          userVerification: c.userVerification,
          timeout: 120000,
        },
      });
      const v = await post(
        "/approvals/" + encodeURIComponent(o.id) + "/decide",
        Object.assign({ csrf: o.csrf, protected: c.protected, reason }, assertionFields(cred)),
      );
      if (v.ok) {
        say(out, "✔ " + v.state + " (" + v.approved + " / " + v.levels + ")", v.state);
        box.querySelectorAll("button").forEach((b) => { b.disabled = true; });
      } else {
        say(out, "✘ " + v.reason + ": " + v.message, "refused");
      }
    } catch (e) {
      say(out, "✘ " + e.name + ": " + e.message, "error");
    }
  }
  document.getElementById("approve").addEventListener("click", () => decide(""));
  document.getElementById("reject").addEventListener("click", () => {
    const reason = document.getElementById("reason").value.trim();
    if (!reason) {
      say(out, "✘ reason", "refused");
      return;
    }
    decide(reason);
  });
}

register();
login();
decision();
