//! Bounds on what an agent sends: every size and count checked where a message arrives, before
//! anything is stored.

use super::*;

/// Why a message was refused after it decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("name must be 1 to {MAX_NAME_LEN} bytes of letters, digits, '-', '_' or '.'")]
    Name,
    #[error("at most {MAX_ENDPOINTS} endpoints may be reported")]
    TooManyEndpoints,
    #[error("a NAT report may list at most {MAX_NAT_RELAYS} relays")]
    TooManyRelays,
    #[error("a relay address in a NAT report must be 1 to {MAX_RELAY_ADDR_LEN} printable bytes")]
    RelayAddr,
    #[error("a relay latency must be a finite number of milliseconds from 0 to 1e6")]
    Latency,
    #[error("an invite code is at most {} characters", crate::invite::MAX_CODE_LEN)]
    CodeTooLong,
    #[error("a party is named by 1 to {MAX_PARTY_ARG_LEN} bytes (its name or id)")]
    PartyArg,
}

impl ValidationError {
    /// The error code a refusal carries: [`ErrorCode::TooLarge`] for a bound exceeded,
    /// [`ErrorCode::BadRequest`] for a malformed value.
    pub fn code(&self) -> ErrorCode {
        match self {
            ValidationError::Name | ValidationError::Latency => ErrorCode::BadRequest,
            _ => ErrorCode::TooLarge,
        }
    }
}

impl From<ValidationError> for ErrorReply {
    fn from(e: ValidationError) -> Self {
        ErrorReply::new(e.code(), e.to_string())
    }
}

impl ClientMsg {
    /// Checks every size and count in the message against its bound (names, endpoints, NAT
    /// report, invite code, party argument). The signature of a registration is checked
    /// separately.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            ClientMsg::Hello { .. } => Ok(()),
            ClientMsg::Register {
                name, endpoints, ..
            } => {
                validate_name(name)?;
                validate_endpoints(endpoints)
            }
            ClientMsg::Request { body, .. } => body.validate(),
        }
    }
}

impl Request {
    /// Checks every size and count in the request against its bound.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Request::CreateParty { name, .. } => validate_name(name),
            Request::JoinParty { code } if code.len() > crate::invite::MAX_CODE_LEN => {
                Err(ValidationError::CodeTooLong)
            }
            Request::LeaveParty { party }
                if party.is_empty() || party.len() > MAX_PARTY_ARG_LEN =>
            {
                Err(ValidationError::PartyArg)
            }
            Request::UpdateEndpoints { endpoints } => validate_endpoints(endpoints),
            Request::ReportNat { nat } => validate_nat(nat),
            _ => Ok(()),
        }
    }
}

/// A NAT report's bounds: at most [`MAX_NAT_RELAYS`] relays, each with a valid name, an
/// address of printable ASCII up to [`MAX_RELAY_ADDR_LEN`] bytes, and a finite latency.
pub fn validate_nat(nat: &NatReport) -> Result<(), ValidationError> {
    if nat.relays.len() > MAX_NAT_RELAYS {
        return Err(ValidationError::TooManyRelays);
    }
    for r in &nat.relays {
        validate_name(&r.name)?;
        let addr_ok = !r.addr.is_empty()
            && r.addr.len() <= MAX_RELAY_ADDR_LEN
            && r.addr.bytes().all(|c| c.is_ascii_graphic());
        if !addr_ok {
            return Err(ValidationError::RelayAddr);
        }
        if r.latency_ms
            .is_some_and(|l| !l.is_finite() || !(0.0..=1e6).contains(&l))
        {
            return Err(ValidationError::Latency);
        }
    }
    Ok(())
}

/// A name for an agent or party: 1..=64 bytes of ASCII letters, digits, `-`, `_`, `.`.
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    ok.then_some(()).ok_or(ValidationError::Name)
}

pub fn validate_endpoints(endpoints: &[SocketAddr]) -> Result<(), ValidationError> {
    (endpoints.len() <= MAX_ENDPOINTS)
        .then_some(())
        .ok_or(ValidationError::TooManyEndpoints)
}
