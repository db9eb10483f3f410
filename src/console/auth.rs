//! Who may look: the console's auditors, their login (argon2id password and a TOTP code, with
//! the same TOTP parameters as applicants' codes), and their sessions.
//!
//! Owns: the user file, password and code checks, lockout, session tokens and their expiry.
//! Never: keeps a password or a session token in clear (sessions are found by the SHA-256 of
//! their token), logs either, or accepts one TOTP code twice.

use super::ConsoleError;
use argon2::{password_hash::PasswordHash, Argon2, PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// What an auditor may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Every site.
    Auditor,
    /// The sites named in `sites` only.
    SiteAuditor,
}

/// One `[[user]]` of the user file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// For `site-auditor`: the sites this auditor may see.
    #[serde(default)]
    pub sites: Vec<String>,
    /// argon2id PHC string (`$argon2id$v=19$...`).
    pub password: String,
    /// The TOTP secret, base32 (as authenticator apps show it).
    pub totp: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("sites", &self.sites)
            .finish_non_exhaustive()
    }
}

impl User {
    /// Whether this auditor may see `site`'s records.
    pub fn may_see(&self, site: &str) -> bool {
        match self.role {
            Role::Auditor => true,
            Role::SiteAuditor => self.sites.iter().any(|s| s == site),
        }
    }
}

/// The user file: `[[user]]` entries, mode 0600 (it holds TOTP secrets).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
}

impl UserFile {
    pub fn load(path: &Path) -> Result<UserFile, ConsoleError> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |detail: String| ConsoleError::Config {
            path: path.display().to_string(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "holds TOTP secrets but is readable by others (mode {:o}); chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
        let file: UserFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for u in &file.users {
            if u.name.is_empty() || u.name.len() > 64 || !seen.insert(u.name.as_str()) {
                return Err(bad(format!(
                    "user names must be 1-64 characters and unique ({:?})",
                    u.name
                )));
            }
            PasswordHash::new(&u.password)
                .map_err(|e| bad(format!("user {:?}: password hash: {e}", u.name)))?;
            secret_bytes(&u.totp).map_err(|e| bad(format!("user {:?}: {e}", u.name)))?;
            if u.role == Role::SiteAuditor && u.sites.is_empty() {
                return Err(bad(format!(
                    "user {:?} is a site-auditor of no site",
                    u.name
                )));
            }
        }
        Ok(file)
    }

    /// Writes the file with mode 0600, whole (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), ConsoleError> {
        let text = Zeroizing::new(toml::to_string(self).map_err(|e| ConsoleError::Config {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?);
        super::write_private(path, &text)
    }
}

fn secret_bytes(base32: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let bytes = totp_rs::Secret::try_from_base32(base32)
        .map_err(|_| "the TOTP secret is not base32".to_string())?
        .as_bytes()
        .to_vec();
    if bytes.len() < 16 {
        return Err("the TOTP secret is shorter than 128 bits".into());
    }
    Ok(Zeroizing::new(bytes))
}

/// An argon2id PHC string for `password` (argon2's default parameters, a fresh salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = argon2::password_hash::SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A fresh TOTP secret (160 bits), base32.
pub fn new_totp_secret() -> Result<String, String> {
    let mut raw = Zeroizing::new([0u8; 20]);
    getrandom::fill(raw.as_mut_slice()).map_err(|e| e.to_string())?;
    Ok(totp_rs::Secret::new_stack(*raw).to_base32())
}

/// The otpauth URI an authenticator app reads (as a QR code) for this user.
pub fn otpauth_uri(user: &User) -> Result<String, String> {
    let secret = secret_bytes(&user.totp)?;
    crate::approval::mfa::totp(&secret, &user.name, ISSUER)
        .map_err(|e| e.to_string())?
        .to_url()
        .map_err(|e| e.to_string())
}

/// The issuer name authenticator apps show beside the code.
pub const ISSUER: &str = "sealgate console";

/// Failed logins weighed per user in a window; more lock the name for the rest of the window.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW_SECONDS: i64 = 300;

/// Why a login was refused; the page says only "wrong name, password or code" (or "locked"),
/// the oversight record says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    UnknownUser,
    WrongPassword,
    WrongCode,
    CodeReused,
    Locked,
}

impl LoginRefusal {
    pub fn code(self) -> &'static str {
        match self {
            LoginRefusal::UnknownUser => "unknown_user",
            LoginRefusal::WrongPassword => "wrong_password",
            LoginRefusal::WrongCode => "wrong_code",
            LoginRefusal::CodeReused => "code_reused",
            LoginRefusal::Locked => "locked",
        }
    }
}

/// A logged-in auditor.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    /// The token forms carry against cross-site requests (not the session token).
    pub csrf: String,
    pub started_ms: i64,
    pub last_ms: i64,
}

/// The users, their failures and last TOTP steps, and the sessions.
pub struct Auth {
    users: HashMap<String, User>,
    /// A hash to check against when the name is unknown, so both take the same time.
    decoy: String,
    state: Mutex<AuthState>,
    pub session_ms: i64,
    pub idle_ms: i64,
    pub max_sessions: usize,
}

#[derive(Default)]
struct AuthState {
    /// By user: (window start, failures).
    failures: HashMap<String, (i64, u32)>,
    /// By user: the newest TOTP step spent.
    last_step: HashMap<String, u64>,
    /// By SHA-256 of the session token.
    sessions: HashMap<[u8; 32], Session>,
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn random_token() -> String {
    use base64::Engine;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("the operating system's random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

impl Auth {
    pub fn new(file: UserFile, session_ms: i64, idle_ms: i64, max_sessions: usize) -> Auth {
        Auth {
            users: file
                .users
                .into_iter()
                .map(|u| (u.name.clone(), u))
                .collect(),
            decoy: hash_password("decoy").expect("argon2 with default parameters"),
            state: Mutex::new(AuthState::default()),
            session_ms,
            idle_ms,
            max_sessions,
        }
    }

    /// Checks a login. Blocks (argon2 takes tens of milliseconds): run it off the executor.
    /// On success the session token (for the cookie) and the session.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        code: &str,
        now_ms: i64,
    ) -> Result<(String, Session), LoginRefusal> {
        let now = now_ms.div_euclid(1000);
        {
            let st = self.state.lock().expect("auth state");
            if let Some((start, n)) = st.failures.get(name) {
                if now - start < FAILURE_WINDOW_SECONDS && *n >= MAX_FAILURES {
                    return Err(LoginRefusal::Locked);
                }
            }
        }
        let user = self.users.get(name);
        let hash = user.map(|u| u.password.as_str()).unwrap_or(&self.decoy);
        let password_ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        let verdict = match user {
            None => Err(LoginRefusal::UnknownUser),
            Some(_) if !password_ok => Err(LoginRefusal::WrongPassword),
            Some(u) => self.check_code(u, code, now.max(0) as u64),
        };
        let mut st = self.state.lock().expect("auth state");
        match verdict {
            Err(why) => {
                let e = st.failures.entry(name.to_string()).or_insert((now, 0));
                if now - e.0 >= FAILURE_WINDOW_SECONDS {
                    *e = (now, 0);
                }
                e.1 += 1;
                if st.failures.len() > 65_536 {
                    st.failures.clear();
                }
                Err(why)
            }
            Ok(step) => {
                let last = st.last_step.entry(name.to_string()).or_insert(0);
                if step <= *last {
                    return Err(LoginRefusal::CodeReused);
                }
                *last = step;
                st.failures.remove(name);
                st.sessions
                    .retain(|_, s| live(s, now_ms, self.session_ms, self.idle_ms));
                if st.sessions.len() >= self.max_sessions {
                    // The oldest session makes room: a full table must not lock auditors out.
                    if let Some(k) = st
                        .sessions
                        .iter()
                        .min_by_key(|(_, s)| s.last_ms)
                        .map(|(k, _)| *k)
                    {
                        st.sessions.remove(&k);
                    }
                }
                let token = random_token();
                let session = Session {
                    user: user.expect("checked").clone(),
                    csrf: random_token(),
                    started_ms: now_ms,
                    last_ms: now_ms,
                };
                st.sessions.insert(token_key(&token), session.clone());
                Ok((token, session))
            }
        }
    }

    fn check_code(&self, user: &User, code: &str, now: u64) -> Result<u64, LoginRefusal> {
        let secret = secret_bytes(&user.totp).map_err(|_| LoginRefusal::WrongCode)?;
        let totp = crate::approval::mfa::totp(&secret, &user.name, ISSUER)
            .map_err(|_| LoginRefusal::WrongCode)?;
        totp.check(code.trim(), now).ok_or(LoginRefusal::WrongCode)
    }

    /// The live session of this token, its last use now; None if unknown or expired.
    pub fn session(&self, token: &str, now_ms: i64) -> Option<Session> {
        let mut st = self.state.lock().expect("auth state");
        let key = token_key(token);
        let s = st.sessions.get_mut(&key)?;
        if !live(s, now_ms, self.session_ms, self.idle_ms) {
            st.sessions.remove(&key);
            return None;
        }
        s.last_ms = now_ms;
        Some(s.clone())
    }

    /// Whether this token's session is live, without counting this as its use (the live feed
    /// asks now and then; an auditor who walked away still times out).
    pub fn is_live(&self, token: &str, now_ms: i64) -> bool {
        let st = self.state.lock().expect("auth state");
        st.sessions
            .get(&token_key(token))
            .is_some_and(|s| live(s, now_ms, self.session_ms, self.idle_ms))
    }

    pub fn logout(&self, token: &str) {
        self.state
            .lock()
            .expect("auth state")
            .sessions
            .remove(&token_key(token));
    }
}

fn live(s: &Session, now_ms: i64, session_ms: i64, idle_ms: i64) -> bool {
    now_ms - s.started_ms < session_ms && now_ms - s.last_ms < idle_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, password: &str) -> User {
        User {
            name: name.into(),
            role: Role::Auditor,
            sites: vec![],
            password: hash_password(password).unwrap(),
            totp: new_totp_secret().unwrap(),
        }
    }

    fn code(u: &User, at_s: u64) -> String {
        let secret = secret_bytes(&u.totp).unwrap();
        crate::approval::mfa::totp(&secret, &u.name, ISSUER)
            .unwrap()
            .generate(at_s)
            .to_string()
    }

    #[test]
    fn password_and_code_open_a_session_that_expires() {
        let u = user("qian.li", "correct horse");
        let auth = Auth::new(
            UserFile {
                users: vec![u.clone()],
            },
            60_000,
            10_000,
            10,
        );
        let now = 1_800_000_000_000i64;
        let c = code(&u, (now / 1000) as u64);
        assert_eq!(
            auth.login("qian.li", "wrong", &c, now).unwrap_err(),
            LoginRefusal::WrongPassword
        );
        assert_eq!(
            auth.login("nobody", "correct horse", &c, now).unwrap_err(),
            LoginRefusal::UnknownUser
        );
        assert_eq!(
            auth.login("qian.li", "correct horse", "000000", now)
                .unwrap_err(),
            LoginRefusal::WrongCode
        );
        let (token, s) = auth.login("qian.li", "correct horse", &c, now).unwrap();
        assert_eq!(s.user.name, "qian.li");
        // The same code again is refused, however right.
        assert_eq!(
            auth.login("qian.li", "correct horse", &c, now).unwrap_err(),
            LoginRefusal::CodeReused
        );
        assert!(auth.session(&token, now + 5_000).is_some());
        // Idle for longer than the idle limit: gone.
        assert!(auth.session(&token, now + 16_000).is_none());
        assert!(auth.session("forged", now).is_none());
    }

    #[test]
    fn five_failures_lock_the_name_for_the_window() {
        let u = user("zhou.min", "pw");
        let auth = Auth::new(
            UserFile {
                users: vec![u.clone()],
            },
            60_000,
            60_000,
            10,
        );
        let now = 1_800_000_000_000i64;
        for _ in 0..MAX_FAILURES {
            auth.login("zhou.min", "bad", "123456", now).unwrap_err();
        }
        let c = code(&u, (now / 1000) as u64);
        assert_eq!(
            auth.login("zhou.min", "pw", &c, now).unwrap_err(),
            LoginRefusal::Locked
        );
        let later = now + FAILURE_WINDOW_SECONDS * 1000;
        let c = code(&u, (later / 1000) as u64);
        assert!(auth.login("zhou.min", "pw", &c, later).is_ok());
    }

    #[test]
    fn a_site_auditor_sees_only_its_sites() {
        let mut u = user("wu.fei", "pw");
        u.role = Role::SiteAuditor;
        u.sites = vec!["shanghai".into()];
        assert!(u.may_see("shanghai"));
        assert!(!u.may_see("beijing"));
        assert!(format!("{u:?}").find(&u.totp).is_none());
    }
}
