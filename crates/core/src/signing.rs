//! Request signing (SPEC §4): the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64>`), which receivers verify with the official
//! `standardwebhooks` libraries, and the simpler `X-Webhook-Timestamp` /
//! `X-Webhook-Signature: sha256=<hex>` pair for receivers that expect that form.
//!
//! It also owns the signing secret type, so a webhook's key is only ever held as bytes in a
//! box that redacts `Debug` and is wiped on drop. HMAC-SHA256 comes from ring, the same library
//! that provides TLS and encryption at rest.
//!
//! Secret rotation: a request carries one `v1,` entry per secret, space-separated, current
//! first; receivers accept the request when any entry matches the secret they know, so they can
//! switch secrets at their own pace while both are sent.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use ring::hmac;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretSlice};

use crate::crypto::{decode_base64_lenient, hex_lower, random_bytes};

pub const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
pub const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
pub const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
pub const X_WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("x-webhook-timestamp");
pub const X_WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("x-webhook-signature");

/// The prefix Standard Webhooks puts before a secret's base64.
pub const SECRET_PREFIX: &str = "whsec_";
/// Standard Webhooks: secrets SHOULD be between 24 and 64 bytes. Shorter keys are too weak to
/// rely on; longer ones gain nothing (HMAC-SHA256 hashes keys over 64 bytes down to 32).
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;
/// What `SigningSecret::generate` makes: the strength of HMAC-SHA256 itself.
const GENERATED_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error(
        "the signing secret is empty: expected `whsec_` followed by the base64 of \
         {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes"
    )]
    EmptySecret,

    #[error(
        "the signing secret is not valid base64: expected `whsec_` followed by standard base64 \
         (A-Z a-z 0-9 + /, `=` padding optional)"
    )]
    SecretNotBase64,

    #[error(
        "the signing secret decodes to {length} bytes; it must be {MIN_SECRET_BYTES} to \
         {MAX_SECRET_BYTES} bytes (leave the secret out to have a 32-byte one generated)"
    )]
    SecretLength { length: usize },

    #[error("no signing secret given: a request is signed with at least one secret")]
    NoSecrets,

    /// A message id travels in the `webhook-id` header and is part of the signed content, so it
    /// must survive HTTP unchanged: proxies and parsers trim surrounding whitespace and many
    /// receivers read header values as ASCII only.
    #[error(
        "message_id {message_id:?} cannot be sent as the `webhook-id` header: it must be \
         non-empty printable ASCII without leading or trailing spaces"
    )]
    InvalidMessageId { message_id: String },
}

/// A webhook's signing key (24 to 64 bytes). `Debug` redacts it; it is wiped when dropped.
#[derive(Clone)]
pub struct SigningSecret {
    key: SecretSlice<u8>,
}

impl SigningSecret {
    /// Accepts `whsec_<base64>` or the bare base64, with standard base64 padded or not (both
    /// circulate: the reference libraries' own test secrets are unpadded) and surrounding
    /// whitespace ignored. The key must decode to 24..=64 bytes. Errors never echo the text.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let text = text.trim();
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        if encoded.is_empty() {
            return Err(SigningError::EmptySecret);
        }
        let mut bytes = decode_base64_lenient(encoded).map_err(|_| SigningError::SecretNotBase64)?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
            return Err(SigningError::SecretLength { length: bytes.len() });
        }
        // Moved, not copied: the buffer left behind is empty and wiped on drop anyway.
        Ok(SigningSecret { key: SecretSlice::from(std::mem::take(&mut *bytes)) })
    }

    /// 32 fresh random bytes from the operating system.
    pub fn generate() -> Self {
        let bytes = Zeroizing::new(random_bytes::<GENERATED_SECRET_BYTES>());
        SigningSecret { key: SecretSlice::from(bytes.to_vec()) }
    }

    /// `whsec_` + padded standard base64: the form every Standard Webhooks library reads
    /// (the Rust `standardwebhooks` crate accepts only the padded form).
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(self.key.expose_secret()))
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.key.expose_secret())
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret([REDACTED])")
    }
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one Standard Webhooks entry.
pub fn sign_v1(secret: &SigningSecret, message_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = hmac_of(&secret.hmac_key(), &v1_prefix(message_id, timestamp), body);
    format!("v1,{}", STANDARD.encode(tag.as_ref()))
}

/// `sha256=<lowercase hex HMAC-SHA256(key, "{timestamp}.{body}")>`, the simple form.
pub fn sign_simple(secret: &SigningSecret, timestamp: i64, body: &[u8]) -> String {
    let tag = hmac_of(&secret.hmac_key(), &simple_prefix(timestamp), body);
    format!("sha256={}", hex_lower(tag.as_ref()))
}

/// Every signing header of SPEC §4 for one request: `webhook-id`, `webhook-timestamp`,
/// `webhook-signature` (one `v1,` entry per secret, space-separated, in the order given: during
/// rotation pass `[current, old]`), `x-webhook-timestamp` and `x-webhook-signature` (simple form,
/// first secret only). `Content-Type` and `User-Agent` are the HTTP client's to set.
pub fn signature_headers<'a>(
    secrets: impl IntoIterator<Item = &'a SigningSecret>,
    message_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<HeaderMap, SigningError> {
    let secrets: Vec<&SigningSecret> = secrets.into_iter().collect();
    let first = *secrets.first().ok_or(SigningError::NoSecrets)?;
    let id = message_id_header(message_id)?;
    let signatures =
        secrets.iter().map(|secret| sign_v1(secret, message_id, timestamp, body)).collect::<Vec<_>>().join(" ");

    let mut headers = HeaderMap::with_capacity(5);
    headers.insert(WEBHOOK_ID, id);
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    headers.insert(WEBHOOK_SIGNATURE, ascii_header_value(signatures));
    headers.insert(X_WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    headers.insert(X_WEBHOOK_SIGNATURE, ascii_header_value(sign_simple(first, timestamp, body)));
    Ok(headers)
}

/// True when any `v1,` entry of a `webhook-signature` value is the signature of this message
/// under `secret`; other versions and malformed entries are skipped, as the standard says.
/// Compares in constant time (`ring::hmac::verify`). It checks the signature only: a receiver
/// that wants replay protection also compares `timestamp` with its clock (the reference
/// libraries allow 5 minutes either way).
pub fn verify_v1(secret: &SigningSecret, message_id: &str, timestamp: i64, body: &[u8], header_value: &str) -> bool {
    let key = secret.hmac_key();
    let signed = [v1_prefix(message_id, timestamp).as_bytes(), body].concat();
    header_value
        .split_ascii_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, signature)| STANDARD.decode(signature).ok())
        .any(|tag| hmac::verify(&key, &signed, &tag).is_ok())
}

/// True when an `x-webhook-signature` value (`sha256=<hex>`) is the simple-form signature of
/// this body and timestamp under `secret`; constant-time like `verify_v1`.
pub fn verify_simple(secret: &SigningSecret, timestamp: i64, body: &[u8], header_value: &str) -> bool {
    let Some(tag) = header_value.trim().strip_prefix("sha256=").and_then(decode_hex) else {
        return false;
    };
    let signed = [simple_prefix(timestamp).as_bytes(), body].concat();
    hmac::verify(&secret.hmac_key(), &signed, &tag).is_ok()
}

fn v1_prefix(message_id: &str, timestamp: i64) -> String {
    format!("{message_id}.{timestamp}.")
}

fn simple_prefix(timestamp: i64) -> String {
    format!("{timestamp}.")
}

/// HMAC over `prefix ‖ body`, fed in pieces so the body (up to the size limit) is not copied.
fn hmac_of(key: &hmac::Key, prefix: &str, body: &[u8]) -> hmac::Tag {
    let mut context = hmac::Context::with_key(key);
    context.update(prefix.as_bytes());
    context.update(body);
    context.sign()
}

fn message_id_header(message_id: &str) -> Result<HeaderValue, SigningError> {
    let valid = !message_id.is_empty()
        && message_id.bytes().all(|byte| (b' '..=b'~').contains(&byte))
        && !message_id.starts_with(' ')
        && !message_id.ends_with(' ');
    let invalid = || SigningError::InvalidMessageId { message_id: message_id.to_owned() };
    if !valid {
        return Err(invalid());
    }
    HeaderValue::from_str(message_id).map_err(|_| invalid())
}

/// Proven invariant: every value passed here is made of `v1,`, `sha256=`, standard base64
/// (A-Z a-z 0-9 + / =), lowercase hex and spaces, all visible ASCII that `HeaderValue` accepts.
fn ascii_header_value(value: String) -> HeaderValue {
    HeaderValue::try_from(value).expect("signature header values are visible ASCII")
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    fn nibble(digit: u8) -> Option<u8> {
        char::from(digit).to_digit(16).and_then(|value| u8::try_from(value).ok())
    }
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes().chunks_exact(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The vector every Standard Webhooks library tests `sign` with (javascript, python, go,
    /// java, php and the docs: libraries/*/…test…, "sign function works").
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TIMESTAMP: i64 = 1614265330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn vector_secret() -> SigningSecret {
        SigningSecret::parse(VECTOR_SECRET).unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn oracle(secret: &SigningSecret) -> standardwebhooks::Webhook {
        standardwebhooks::Webhook::new(&secret.to_whsec()).unwrap()
    }

    #[test]
    fn standard_webhooks_published_vector() {
        assert_eq!(sign_v1(&vector_secret(), VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY), VECTOR_SIGNATURE);
        // Bare base64 (how the libraries' tests pass it) is the same key.
        let bare = SigningSecret::parse(&VECTOR_SECRET[SECRET_PREFIX.len()..]).unwrap();
        assert_eq!(sign_v1(&bare, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY), VECTOR_SIGNATURE);
    }

    #[test]
    fn standard_webhooks_rust_library_vector() {
        // libraries/rust/src/lib.rs `test_sign` in standard-webhooks/standard-webhooks.
        let secret = SigningSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            sign_v1(
                &secret,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn verify_v1_accepts_the_published_vector_and_nothing_close_to_it() {
        let secret = vector_secret();
        let verify =
            |id: &str, timestamp: i64, body: &[u8], header: &str| verify_v1(&secret, id, timestamp, body, header);
        assert!(verify(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, VECTOR_SIGNATURE));
        // The reference tests' multi-signature header: other versions and wrong v1 entries
        // around the valid one.
        let multi = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= \
             v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {VECTOR_SIGNATURE} \
             v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
        );
        assert!(verify(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, &multi));

        // The python reference's "invalid signature" (last byte changed).
        let refused = [
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1,g0hM9SsE",
            "v1,",
            "v1",
            "",
            "v1,dawfeoifkpqwoekfpqoekf",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ];
        for header in refused {
            assert!(!verify(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, header), "{header}");
        }
        assert!(!verify("msg_other", VECTOR_TIMESTAMP, VECTOR_BODY, VECTOR_SIGNATURE));
        assert!(!verify(VECTOR_ID, VECTOR_TIMESTAMP + 1, VECTOR_BODY, VECTOR_SIGNATURE));
        assert!(!verify(VECTOR_ID, VECTOR_TIMESTAMP, br#"{"test": 2432232315}"#, VECTOR_SIGNATURE));
        let other = SigningSecret::generate();
        assert!(!verify_v1(&other, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, VECTOR_SIGNATURE));
    }

    #[test]
    fn simple_form_known_answer() {
        // HMAC-SHA256(key, "1614265330.{body}") computed independently (Python hmac).
        let expected = "sha256=e96203c6de850e7dc1fde7489ef6140b402d3a5a64fe250cd2eef9830fac1cef";
        let secret = vector_secret();
        assert_eq!(sign_simple(&secret, VECTOR_TIMESTAMP, VECTOR_BODY), expected);
        assert!(verify_simple(&secret, VECTOR_TIMESTAMP, VECTOR_BODY, expected));
        assert!(!verify_simple(&secret, VECTOR_TIMESTAMP + 1, VECTOR_BODY, expected));
        assert!(!verify_simple(&secret, VECTOR_TIMESTAMP, VECTOR_BODY, &expected[..expected.len() - 1]));
        assert!(!verify_simple(&secret, VECTOR_TIMESTAMP, VECTOR_BODY, &expected["sha256=".len()..]));
    }

    #[test]
    fn signature_headers_are_exactly_the_spec_headers() {
        let secret = vector_secret();
        let headers = signature_headers(&[secret], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY).unwrap();
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["webhook-id", "webhook-signature", "webhook-timestamp", "x-webhook-signature", "x-webhook-timestamp"]
        );
        assert_eq!(headers[WEBHOOK_ID], VECTOR_ID);
        assert_eq!(headers[WEBHOOK_TIMESTAMP], "1614265330");
        assert_eq!(headers[WEBHOOK_SIGNATURE], VECTOR_SIGNATURE);
        assert_eq!(headers[X_WEBHOOK_TIMESTAMP], "1614265330");
        assert_eq!(
            headers[X_WEBHOOK_SIGNATURE],
            "sha256=e96203c6de850e7dc1fde7489ef6140b402d3a5a64fe250cd2eef9830fac1cef"
        );
        assert!(!headers.contains_key(http::header::CONTENT_TYPE));
        assert!(!headers.contains_key(http::header::USER_AGENT));
    }

    #[test]
    fn rotation_sends_one_v1_entry_per_secret_and_simple_form_uses_the_first() {
        let current = SigningSecret::generate();
        let old = SigningSecret::generate();
        let timestamp = now();
        let body = br#"{"type":"invoice.paid"}"#;
        let headers = signature_headers(&[current.clone(), old.clone()], "msg_1", timestamp, body).unwrap();
        let value = headers[WEBHOOK_SIGNATURE].to_str().unwrap();
        let entries: Vec<&str> = value.split(' ').collect();
        assert_eq!(entries, [sign_v1(&current, "msg_1", timestamp, body), sign_v1(&old, "msg_1", timestamp, body)]);
        // Each secret alone verifies the request, with our verifier and the reference library.
        for secret in [&current, &old] {
            assert!(verify_v1(secret, "msg_1", timestamp, body, value));
            assert!(verify_v1(secret, "msg_1", timestamp, body, entries[0]) == (secret == &current));
            oracle(secret).verify(body, &headers).unwrap();
        }
        assert!(!verify_v1(&SigningSecret::generate(), "msg_1", timestamp, body, value));
        let simple = headers[X_WEBHOOK_SIGNATURE].to_str().unwrap();
        assert_eq!(simple, sign_simple(&current, timestamp, body));
        assert!(verify_simple(&current, timestamp, body, simple));
        assert!(!verify_simple(&old, timestamp, body, simple));
    }

    #[test]
    fn signature_headers_refuses_no_secrets_and_unsendable_message_ids() {
        let error = signature_headers(&[], "msg_1", 1, b"{}").unwrap_err();
        assert!(matches!(error, SigningError::NoSecrets), "{error}");
        let secrets = [SigningSecret::generate()];
        for id in ["", " msg", "msg ", "msg\n1", "msg\r\nx-evil: 1", "msg\u{e9}", "m\tsg"] {
            let error = signature_headers(&secrets, id, 1, b"{}").unwrap_err();
            assert!(
                matches!(&error, SigningError::InvalidMessageId { message_id } if message_id == id),
                "{id:?}: {error}"
            );
        }
        for id in ["msg_1", "a b", "x", "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./"] {
            signature_headers(&secrets, id, 1, b"{}").unwrap();
        }
    }

    #[test]
    fn parse_accepts_padded_unpadded_and_bare_base64() {
        let key: Vec<u8> = (1..=32).collect();
        let padded = STANDARD.encode(&key);
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=');
        let expected = format!("whsec_{padded}");
        for text in [
            format!("whsec_{padded}"),
            format!("whsec_{unpadded}"),
            padded.clone(),
            unpadded.to_owned(),
            format!("  whsec_{padded}\n"),
        ] {
            let secret = SigningSecret::parse(&text).unwrap();
            assert_eq!(secret.to_whsec(), expected, "{text}");
        }
    }

    #[test]
    fn parse_enforces_24_to_64_bytes() {
        for length in [MIN_SECRET_BYTES, 32, MAX_SECRET_BYTES] {
            let text = format!("whsec_{}", STANDARD.encode(vec![9u8; length]));
            SigningSecret::parse(&text).unwrap();
        }
        for length in [1, 16, MIN_SECRET_BYTES - 1, MAX_SECRET_BYTES + 1, 100] {
            let text = format!("whsec_{}", STANDARD.encode(vec![9u8; length]));
            let error = SigningSecret::parse(&text).unwrap_err();
            assert!(matches!(error, SigningError::SecretLength { length: l } if l == length), "{error}");
        }
    }

    #[test]
    fn parse_errors_are_clear_and_never_echo_the_secret() {
        let cases = [
            ("", "empty"),
            ("whsec_", "empty"),
            ("   ", "empty"),
            ("whsec_not*base64*at*all", "not valid base64"),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS-", "not valid base64"),
            ("whsec_c2hvcnQtc2VjcmV0", "decodes to 12 bytes"),
        ];
        for (text, expected) in cases {
            let message = SigningSecret::parse(text).unwrap_err().to_string();
            assert!(message.contains(expected), "{text}: {message}");
            let encoded = text.trim().trim_start_matches(SECRET_PREFIX);
            if !encoded.is_empty() {
                assert!(!message.contains(encoded), "{message}");
            }
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let secret = vector_secret();
        let debug = format!("{secret:?} {:?}", Some(&secret));
        assert!(debug.contains("[REDACTED]"), "{debug}");
        assert!(!debug.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{debug}");
    }

    #[test]
    fn generate_makes_distinct_32_byte_secrets_the_reference_library_reads() {
        let first = SigningSecret::generate();
        let second = SigningSecret::generate();
        assert_eq!(first.key.expose_secret().len(), 32);
        assert_ne!(first.to_whsec(), second.to_whsec());
        let whsec = first.to_whsec();
        assert!(whsec.starts_with("whsec_"));
        assert_eq!(whsec.len(), "whsec_".len() + 44);
        assert_eq!(SigningSecret::parse(&whsec).unwrap().to_whsec(), whsec);
        let signature = oracle(&first).sign("msg_1", 1, b"{}").unwrap();
        assert_eq!(signature, sign_v1(&first, "msg_1", 1, b"{}"));
    }

    impl PartialEq for SigningSecret {
        // Test-only: production code never compares secrets (that would want constant time).
        fn eq(&self, other: &Self) -> bool {
            self.key.expose_secret() == other.key.expose_secret()
        }
    }

    fn any_secret() -> impl Strategy<Value = SigningSecret> {
        prop::collection::vec(any::<u8>(), MIN_SECRET_BYTES..=MAX_SECRET_BYTES)
            .prop_map(|key| SigningSecret { key: SecretSlice::from(key) })
    }

    /// Message ids as `signature_headers` accepts them: printable ASCII, no surrounding spaces.
    fn any_message_id() -> impl Strategy<Value = String> {
        "[!-~]([ -~]{0,62}[!-~])?"
    }

    proptest! {
        /// Our headers verify with the reference implementation, for every secret of a rotation.
        /// The oracle checks the timestamp against its clock (±5 min), so stay near now. It
        /// signs only UTF-8 bodies, which JSON bodies always are.
        #[test]
        fn headers_verify_with_the_standardwebhooks_crate(
            secrets in prop::collection::vec(any_secret(), 1..=3),
            message_id in any_message_id(),
            skew in -200i64..=200,
            body in "(?s).{0,2000}",
        ) {
            let timestamp = now() + skew;
            let headers = signature_headers(&secrets, &message_id, timestamp, body.as_bytes()).unwrap();
            for secret in &secrets {
                prop_assert!(oracle(secret).verify(body.as_bytes(), &headers).is_ok());
                prop_assert!(verify_v1(
                    secret,
                    &message_id,
                    timestamp,
                    body.as_bytes(),
                    headers[WEBHOOK_SIGNATURE].to_str().unwrap(),
                ));
            }
            // A changed body verifies with no secret.
            let tampered = format!("{body} ");
            prop_assert!(oracle(&secrets[0]).verify(tampered.as_bytes(), &headers).is_err());
        }

        /// The reference `sign` and ours agree on any timestamp, not just recent ones.
        #[test]
        fn sign_v1_matches_the_standardwebhooks_crate(
            secret in any_secret(),
            message_id in any_message_id(),
            timestamp in any::<i64>(),
            body in "(?s).{0,500}",
        ) {
            let expected = oracle(&secret).sign(&message_id, timestamp, body.as_bytes()).unwrap();
            prop_assert_eq!(sign_v1(&secret, &message_id, timestamp, body.as_bytes()), expected);
        }

        #[test]
        fn whsec_round_trips_padded_and_unpadded(secret in any_secret()) {
            let whsec = secret.to_whsec();
            prop_assert!(SigningSecret::parse(&whsec).unwrap() == secret);
            prop_assert!(SigningSecret::parse(whsec.trim_end_matches('=')).unwrap() == secret);
        }

        #[test]
        fn verify_v1_accepts_any_body_bytes(secret in any_secret(), body in prop::collection::vec(any::<u8>(), 0..500)) {
            let signature = sign_v1(&secret, "msg_1", 7, &body);
            prop_assert!(verify_v1(&secret, "msg_1", 7, &body, &signature));
            let simple = sign_simple(&secret, 7, &body);
            prop_assert!(verify_simple(&secret, 7, &body, &simple));
        }
    }
}
