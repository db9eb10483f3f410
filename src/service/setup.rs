//! Building the service from its configuration, and putting a re-read one in force.
//!
//! Owns: the trust store and policies as configured, the terminals' specifications, what only a
//! restart may change, and the all-or-nothing reload. Never: half-applies a reload.

use super::caller::callers_of;
use super::{Service, StartError};
use crate::approval::gate::Rules;
use crate::approval::TrustStore;
use crate::audit::anomaly::Anomaly;
use crate::audit::log::{AuditError, AuditKey};
use crate::config::Config;
use crate::device::Registry;
use crate::policy::SealPolicy;
use crate::terminal::session::TerminalSpec;
use std::collections::HashMap;

/// The configured terminals, their profiles and enrolled keys checked.
pub(super) fn terminal_specs(config: &Config) -> Result<Vec<TerminalSpec>, StartError> {
    let mut out = Vec::new();
    for t in &config.terminals {
        let bad = |m: String| StartError::Terminal(format!("terminal {:?}: {m}", t.id));
        let profile =
            crate::device::profile::DeviceProfile::load(&config.daemon.profiles_dir, &t.profile)
                .map_err(|e| bad(e.to_string()))?;
        if profile.kind != crate::device::profile::DeviceKind::Terminal {
            return Err(bad(format!(
                "profile {:?} is not a terminal profile",
                t.profile
            )));
        }
        let raw: [u8; 32] = hex::decode(&t.public_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("public_key is not 32 bytes of hex".into()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| bad("public_key is not an Ed25519 public key".into()))?;
        out.push(TerminalSpec {
            id: t.id.clone(),
            seal: t.seal.clone(),
            name: t.name.clone(),
            profile,
            key,
            serial: t.serial.clone(),
        });
    }
    Ok(out)
}

/// The trust store and every seal's policy, as configured.
pub(super) fn rules_of(config: &Config, config_dir: &std::path::Path) -> Result<Rules, StartError> {
    let trust = TrustStore::with_applicants(
        &config.approvers,
        &config.applicants,
        config.webauthn.as_ref(),
        config_dir,
    )?;
    let mut policies = HashMap::new();
    for s in &config.seals {
        let limits = crate::config::TokenLimits::of(s.max_token_lifetime_seconds, s.max_uses);
        policies.insert(
            s.id.clone(),
            SealPolicy::from_config(&s.id, &s.rules)?.with_limits(limits),
        );
    }
    for t in &config.terminals {
        let limits = crate::config::TokenLimits::of(t.max_token_lifetime_seconds, t.max_uses);
        policies.insert(
            t.seal.clone(),
            SealPolicy::from_config(&t.seal, &t.rules)?.with_limits(limits),
        );
    }
    Ok(Rules { trust, policies })
}

/// The parts of a configuration that only a restart changes: the daemon's settings, devices,
/// seals and their keys, terminals (not their policies) and their listener, TOTP and the audit
/// key. A reload that changes them is refused.
pub(super) fn restart_only(config: &Config) -> String {
    let seals: Vec<_> = config
        .seals
        .iter()
        .map(|s| {
            (
                &s.id,
                &s.name,
                &s.device,
                &s.key_label,
                &s.key_id,
                &s.algorithm,
                &s.image,
                &s.timestamp,
            )
        })
        .collect();
    let terminals: Vec<_> = config
        .terminals
        .iter()
        .map(|t| {
            (
                &t.id,
                &t.profile,
                &t.seal,
                &t.public_key,
                &t.serial,
                &t.certificate_sha256,
            )
        })
        .collect();
    let a = &config.audit;
    format!(
        "{:?}",
        (
            &config.daemon,
            &config.devices,
            seals,
            &config.mfa,
            (&a.device, &a.key_label, &a.key_id, &a.algorithm),
            terminals,
            &config.terminal_listener,
            &config.hq_policy,
        )
    )
}

pub(super) fn audit_parts(
    config: &Config,
    registry: &Registry,
) -> Result<(AuditKey, Anomaly), StartError> {
    let (device, key) = registry.audit_key.clone();
    let anomaly = Anomaly::from_config(&config.audit.alerts).map_err(AuditError::Open)?;
    Ok((AuditKey { device, key }, anomaly))
}

/// The configuration file, read and checked as at start-up (contents and file modes), without
/// the fragment from HQ on it.
pub fn load_config(path: &std::path::Path) -> Result<Config, crate::config::ConfigError> {
    let config = Config::load(path)?;
    config.check_file_modes(path, |name: &str| {
        crate::device::profile::DeviceProfile::modules_of(&config.daemon.profiles_dir, name)
    })?;
    Ok(config)
}

/// A configuration checked whole and ready to put in force.
pub(super) struct Prepared {
    rules: Rules,
    anomaly: Anomaly,
    callers: std::sync::Arc<Vec<std::sync::Arc<super::Caller>>>,
}

impl Service {
    /// Puts a re-read configuration in force: callers, the trust store, seal policies and the
    /// anomaly rules' thresholds, all or nothing, with the fragment from HQ in force applied
    /// on it again. Anything else that changed (devices, seals' keys, the daemon's settings,
    /// TOTP, the audit key, `[hq_policy]`), a device profile that no longer reads the same, or
    /// a fragment in force that no longer applies, refuses the reload and the running
    /// configuration stays. Blocks.
    pub fn reload(&self, mut config: Config) -> Result<(), StartError> {
        let in_force = self.policy.blocking_lock();
        if let (Some(f), Some(settings)) = (in_force.as_ref(), config.hq_policy.clone()) {
            f.apply_to(&settings, &mut config).map_err(|e| {
                StartError::Reload(format!(
                    "the HQ policy fragment in force no longer applies: {e}"
                ))
            })?;
        }
        let prepared = self.prepare(&config, &self.config_dir)?;
        self.put_in_force(prepared);
        Ok(())
    }

    /// Checks a configuration as a reload would put it in force. Blocks.
    pub(super) fn prepare(
        &self,
        config: &Config,
        config_dir: &std::path::Path,
    ) -> Result<Prepared, StartError> {
        if restart_only(config) != self.fixed {
            return Err(StartError::Reload(
                "devices, seals' keys, terminals, [daemon], [mfa], [hq_policy] or the audit key changed; those take a restart"
                    .into(),
            ));
        }
        for d in self.registry.devices.iter() {
            let dc = config
                .devices
                .iter()
                .find(|c| c.id == d.id())
                .expect("devices are unchanged");
            let profile = crate::device::profile::DeviceProfile::load(
                &config.daemon.profiles_dir,
                &dc.profile,
            )
            .map_err(|e| StartError::Reload(format!("device {:?}: {e}", dc.id)))?;
            if format!("{profile:?}") != format!("{:?}", d.profile()) {
                return Err(StartError::Reload(format!(
                    "device profile {:?} changed; profile changes take a restart",
                    dc.profile
                )));
            }
        }
        let rules = rules_of(config, config_dir)?;
        for w in rules.warnings() {
            tracing::warn!("{w}");
        }
        let anomaly = Anomaly::from_config(&config.audit.alerts).map_err(StartError::Reload)?;
        Ok(Prepared {
            rules,
            anomaly,
            callers: callers_of(config),
        })
    }

    /// Swaps a prepared configuration in.
    pub(super) fn put_in_force(&self, p: Prepared) {
        self.gate.replace_rules(p.rules);
        *self.callers.write().unwrap_or_else(|p| p.into_inner()) = p.callers;
        self.audit.replace_anomaly(p.anomaly);
    }
}
