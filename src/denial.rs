//! Why a stamp or a grant is refused: the stable reason codes and the refusal itself. The
//! vocabulary the policy, the approval checks, the ledger and the service share; it depends
//! on nothing of theirs.

/// Why an approval does not authorise a stamp. The codes are stable: they appear in responses,
/// logs and (later) audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Malformed,
    BadSignature,
    UnknownApprover,
    ApproverRevoked,
    Expired,
    NotYetValid,
    SealMismatch,
    DigestMismatch,
    NoRule,
    MissingLevel,
    LevelOrder,
    SelfApproval,
    DuplicateApprover,
    DepartmentMismatch,
    OutsideHours,
    RateLimited,
    MfaRequired,
    MfaInvalid,
    MfaLocked,
    Replayed,
    Exhausted,
    UnknownApplicant,
    /// A passkey's credential the approver has not registered.
    UnknownCredential,
    WebauthnChallenge,
    WebauthnType,
    WebauthnOrigin,
    WebauthnRpId,
    WebauthnUserPresence,
    WebauthnUserVerification,
    /// A passkey's signature counter went back: the authenticator may have been copied.
    ClonedAuthenticator,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::BadSignature => "bad_signature",
            Reason::UnknownApprover => "unknown_approver",
            Reason::ApproverRevoked => "approver_revoked",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::SealMismatch => "seal_mismatch",
            Reason::DigestMismatch => "digest_mismatch",
            Reason::NoRule => "no_rule",
            Reason::MissingLevel => "missing_level",
            Reason::LevelOrder => "level_order",
            Reason::SelfApproval => "self_approval",
            Reason::DuplicateApprover => "duplicate_approver",
            Reason::DepartmentMismatch => "department_mismatch",
            Reason::OutsideHours => "outside_hours",
            Reason::RateLimited => "rate_limited",
            Reason::MfaRequired => "mfa_required",
            Reason::MfaInvalid => "mfa_invalid",
            Reason::MfaLocked => "mfa_locked",
            Reason::Replayed => "replayed",
            Reason::Exhausted => "exhausted",
            Reason::UnknownApplicant => "unknown_applicant",
            Reason::UnknownCredential => "unknown_credential",
            Reason::WebauthnChallenge => "webauthn_challenge",
            Reason::WebauthnType => "webauthn_type",
            Reason::WebauthnOrigin => "webauthn_origin",
            Reason::WebauthnRpId => "webauthn_rp_id",
            Reason::WebauthnUserPresence => "webauthn_user_presence",
            Reason::WebauthnUserVerification => "webauthn_user_verification",
            Reason::ClonedAuthenticator => "cloned_authenticator",
        }
    }
}

/// One reason a stamp is refused, with what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    pub detail: String,
}

impl Denial {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Denial {
        Denial {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.detail)
    }
}
