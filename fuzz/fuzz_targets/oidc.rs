//! Tokens and key sets from anyone: a JWKS document (the bytes before the
//! first 0x00) is read into keys, and the text after it is checked as a
//! token against them for a space, and as a SASL bearer-token response. Refusals are fine; panics and large
//! allocations are not.
#![no_main]

use flotilla_core::oidc::{verify, Keys, OidcSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (jwks, rest) = data.split_at(split);
    let keys = Keys::from_jwks(jwks).unwrap_or_default();
    let Ok(token) = std::str::from_utf8(rest.get(1..).unwrap_or_default()) else {
        return;
    };
    let spec = OidcSpec {
        issuer: "https://idp.example".into(),
        audience: "flotilla".into(),
        ..Default::default()
    };
    let _ = verify(token, Some("default"), &spec, &keys, 1_800_000_000);
    let _ = verify(token, None, &spec, &keys, 1_800_000_000);
    let _ = flotilla_core::oidc::unverified_claims(token);
    let _ = flotilla_core::oidc::looks_like_jwt(token);
    // The same bytes as a SASL OAUTHBEARER or XOAUTH2 response.
    let _ = flotilla_amqp::transport::bearer("OAUTHBEARER", rest);
    let _ = flotilla_amqp::transport::bearer("XOAUTH2", rest);
});
