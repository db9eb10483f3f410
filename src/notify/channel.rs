//! The channels: how one message (an alert, or a digest of several) is written and sent to a
//! webhook, a WeCom, DingTalk or Feishu robot, or a mailbox.
//!
//! Owns: the message formats, the signatures receivers check (HMAC-SHA256 of the webhook body;
//! DingTalk's and Feishu's signed timestamps), reading secrets (zeroized, never logged), and
//! whether a receiver's answer means "delivered".

use super::{Alert, ChannelConfig, ChannelKind};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use zeroize::Zeroizing;

/// What a configuration entry must have for its kind.
pub fn check(c: &ChannelConfig) -> Result<(), String> {
    match c.kind {
        ChannelKind::Email => {
            if c.smtp.is_none() || c.from.is_none() || c.to.is_empty() {
                return Err("an email channel needs smtp, from and to".into());
            }
            if c.username.is_some() != c.password_file.is_some() {
                return Err("username and password_file go together".into());
            }
        }
        ChannelKind::Webhook => {
            if c.url.is_none() || c.secret_file.is_none() {
                return Err("a webhook needs url and secret_file (its HMAC key)".into());
            }
        }
        ChannelKind::Wecom | ChannelKind::Dingtalk | ChannelKind::Feishu => {
            if c.url.is_none() {
                return Err("a robot needs its url".into());
            }
        }
    }
    if let Some(u) = &c.url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(format!("url {u:?} is not http(s)"));
        }
    }
    Ok(())
}

/// Reads a secret file, which must not be readable by others.
fn secret(path: &std::path::Path) -> Result<Zeroizing<String>, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {:o}); make it 0600",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// One channel, opened: its secrets read, its HTTP agent or SMTP transport made.
pub struct Channel {
    config: ChannelConfig,
    secret: Option<Zeroizing<String>>,
    agent: ureq::Agent,
    mailer: Option<lettre::SmtpTransport>,
}

impl Channel {
    pub fn open(c: &ChannelConfig) -> Result<Channel, String> {
        let what = |e: String| format!("channel {:?}: {e}", c.id);
        let secret = c
            .secret_file
            .as_deref()
            .map(secret)
            .transpose()
            .map_err(what)?;
        let timeout = Duration::from_millis(c.timeout_ms.max(100));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mailer = match c.kind {
            ChannelKind::Email => Some(mailer(c, timeout).map_err(what)?),
            _ => None,
        };
        Ok(Channel {
            config: c.clone(),
            secret,
            agent,
            mailer,
        })
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Sends `alerts` as one message (`window_ms` > 0: the digest of the window that ended
    /// then); Err with why the receiver did not take it.
    pub fn send(
        &self,
        site: &str,
        delivery: &str,
        alerts: &[Alert],
        window_ms: i64,
    ) -> Result<(), String> {
        let text = text(site, alerts, window_ms);
        match self.config.kind {
            ChannelKind::Webhook => self.webhook(site, delivery, alerts, window_ms),
            ChannelKind::Wecom => self.robot(
                self.url().to_owned(),
                serde_json::json!({"msgtype": "text", "text": {"content": text}}),
                "errcode",
            ),
            ChannelKind::Dingtalk => {
                let mut url = self.url().to_owned();
                if let Some(s) = &self.secret {
                    // timestamp (ms) "\n" secret, HMAC-SHA256 keyed by the secret, base64,
                    // URL-encoded.
                    let ts = crate::audit::now_ms();
                    let sign = B64.encode(hmac(s.as_bytes(), format!("{ts}\n{}", &**s).as_bytes()));
                    url += &format!(
                        "{}timestamp={ts}&sign={}",
                        if url.contains('?') { '&' } else { '?' },
                        url_encode(&sign)
                    );
                }
                self.robot(
                    url,
                    serde_json::json!({"msgtype": "text", "text": {"content": text}}),
                    "errcode",
                )
            }
            ChannelKind::Feishu => {
                let mut body = serde_json::json!({"msg_type": "text", "content": {"text": text}});
                if let Some(s) = &self.secret {
                    // HMAC-SHA256 keyed by timestamp (s) "\n" secret, of nothing, base64.
                    let ts = crate::audit::now_ms() / 1000;
                    let key = Zeroizing::new(format!("{ts}\n{}", &**s));
                    body["timestamp"] = ts.to_string().into();
                    body["sign"] = B64.encode(hmac(key.as_bytes(), b"")).into();
                }
                self.robot(self.url().to_owned(), body, "code")
            }
            ChannelKind::Email => self.email(site, alerts, window_ms, &text),
        }
    }

    fn url(&self) -> &str {
        self.config.url.as_deref().unwrap_or_default()
    }

    /// POSTs JSON with `X-Sealgate-Signature: sha256=HEX`, the HMAC-SHA256 under the channel's
    /// secret of `TIMESTAMP "." BODY` (the timestamp in `X-Sealgate-Timestamp`, Unix seconds),
    /// and `X-Sealgate-Delivery`, the same id on every try of one delivery. Any 2xx is taken.
    fn webhook(
        &self,
        site: &str,
        delivery: &str,
        alerts: &[Alert],
        window_ms: i64,
    ) -> Result<(), String> {
        let body = serde_json::json!({
            "site": site,
            "delivery": delivery,
            "digest_until_ms": (window_ms > 0).then_some(window_ms),
            "alerts": alerts,
        })
        .to_string();
        let ts = (crate::audit::now_ms() / 1000).to_string();
        let key = self.secret.as_ref().ok_or("no secret")?;
        let mut signed = ts.clone().into_bytes();
        signed.push(b'.');
        signed.extend_from_slice(body.as_bytes());
        let signature = hex::encode(hmac(key.as_bytes(), &signed));
        let r = self
            .agent
            .post(self.url())
            .header("Content-Type", "application/json")
            .header("X-Sealgate-Timestamp", &ts)
            .header("X-Sealgate-Signature", &format!("sha256={signature}"))
            .header("X-Sealgate-Delivery", delivery)
            .send(body.as_bytes())
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("the webhook answered HTTP {status}"))
        }
    }

    /// A robot takes a message when it answers 200 with `ok_field` 0.
    fn robot(&self, url: String, body: serde_json::Value, ok_field: &str) -> Result<(), String> {
        let mut r = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let answer = r
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        if status != 200 {
            return Err(format!("the robot answered HTTP {status}"));
        }
        let v: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|_| "the robot's answer is not JSON".to_string())?;
        match v.get(ok_field).and_then(|c| c.as_i64()) {
            Some(0) => Ok(()),
            other => Err(format!(
                "the robot refused the message ({ok_field} {other:?}): {}",
                v.get("errmsg")
                    .or_else(|| v.get("msg"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
            )),
        }
    }

    fn email(
        &self,
        site: &str,
        alerts: &[Alert],
        window_ms: i64,
        text: &str,
    ) -> Result<(), String> {
        use lettre::Transport;
        let c = &self.config;
        let subject = match (alerts, window_ms > 0) {
            ([a], false) => format!("sealgate {site}: {} (seq {})", a.rule, a.seq),
            _ => format!("sealgate {site}: {} alerts", alerts.len()),
        };
        let mut m = lettre::Message::builder()
            .from(
                c.from
                    .as_deref()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| format!("from: {e}"))?,
            )
            .subject(subject);
        for to in &c.to {
            m = m.to(to.parse().map_err(|e| format!("to {to:?}: {e}"))?);
        }
        let message = m
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(text.to_owned())
            .map_err(|e| e.to_string())?;
        self.mailer
            .as_ref()
            .ok_or("no mailer")?
            .send(&message)
            .map(|_| ())
            .map_err(|e| format!("SMTP: {e}"))
    }
}

/// An SMTP transport that requires STARTTLS, with the channel's CA when it names one.
fn mailer(c: &ChannelConfig, timeout: Duration) -> Result<lettre::SmtpTransport, String> {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    let smtp = c.smtp.as_deref().unwrap_or_default();
    let (host, port) = match smtp.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']),
            p.parse::<u16>()
                .map_err(|_| format!("smtp {smtp:?}: bad port"))?,
        ),
        None => (smtp, 587),
    };
    let mut tls = TlsParameters::builder(host.to_owned());
    if let Some(ca) = &c.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        tls = tls.add_root_certificate(
            Certificate::from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?,
        );
    }
    let tls = tls.build_rustls().map_err(|e| e.to_string())?;
    let mut t = lettre::SmtpTransport::builder_dangerous(host)
        .port(port)
        .tls(Tls::Required(tls))
        .timeout(Some(timeout));
    if let (Some(user), Some(file)) = (&c.username, &c.password_file) {
        let password = secret(file)?;
        t = t.credentials(Credentials::new(user.clone(), password.to_string()));
    }
    Ok(t.build())
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The text robots and mail show: one line per alert, Chinese first.
pub fn text(site: &str, alerts: &[Alert], window_ms: i64) -> String {
    let when = |ms: i64| {
        jiff::Timestamp::from_millisecond(ms)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default()
    };
    let mut t = if window_ms > 0 {
        format!(
            "【sealgate 告警汇总 / alert digest】{site}: {} 条 / alerts, until {}\n",
            alerts.len(),
            when(window_ms)
        )
    } else {
        format!("【sealgate 告警 / alert】{site}\n")
    };
    for a in alerts {
        t += &format!("{} #{} {}", when(a.at_ms), a.seq, a.rule);
        for (k, v) in [
            ("site", &a.site),
            ("seal", &a.seal),
            ("device", &a.device),
            ("applicant", &a.applicant),
        ] {
            if !v.is_empty() {
                t += &format!(" {k}={v}");
            }
        }
        if !a.detail.is_empty() {
            t += &format!(": {}", a.detail);
        }
        t.push('\n');
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robots_signatures_follow_their_documented_recipes() {
        // RFC 4231 case 2, so the HMAC itself is the standard one.
        assert_eq!(
            hex::encode(hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(url_encode("a+b/c="), "a%2Bb%2Fc%3D");
    }

    #[test]
    fn a_message_names_the_site_each_alert_and_its_rule() {
        let a = Alert {
            seq: 7,
            at_ms: 1_796_256_000_000,
            rule: "terminal_tamper".into(),
            detail: "case opened".into(),
            seal: "contract".into(),
            device: "t1".into(),
            applicant: String::new(),
            caller: String::new(),
            doc_sha256: String::new(),
            ref_seq: Some(6),
            site: String::new(),
        };
        let t = text("shanghai", std::slice::from_ref(&a), 0);
        assert!(
            t.contains("shanghai")
                && t.contains("#7 terminal_tamper seal=contract device=t1: case opened"),
            "{t}"
        );
        assert!(t.contains("2026-12-03 00:00:00 UTC"), "{t}");
        let d = text("shanghai", &[a.clone(), a], 1_796_342_400_000);
        assert!(d.contains("2 条") && d.contains("until 2026-12-04"), "{d}");
    }
}
