//! Encryption at rest for webhook URLs and signing secrets (SPEC §2): AES-256-GCM from ring, the
//! library that already provides TLS and HMAC, with a key that never lives in the database
//! (`HOOKFLEET_ENCRYPTION_KEY`).
//!
//! Every stored value is `key_id (8 ASCII hex) ‖ nonce (12 random bytes) ‖ ciphertext ‖ tag (16)`.
//! The key id is what makes rotation possible: new values are sealed with the current key, and
//! values sealed earlier are still opened with the key whose id they carry, found among
//! `HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS`, until they have been re-encrypted. The key id is the first
//! 8 hex digits of SHA-256(key): public, safe to log and store, and it lets an error say exactly
//! which key is missing.
//!
//! The caller's associated data (e.g. `b"webhooks:42:url"`) is authenticated but not stored: it
//! binds a ciphertext to its row and column, so copying one webhook's encrypted URL or secret
//! into another row (or column) makes decryption fail instead of silently redirecting deliveries.
//!
//! It also holds the small helpers `signing` shares (`random_bytes`, `decode_base64_lenient`,
//! `hex_lower`), so signing secrets and encryption keys come from one random source and are read
//! in one base64 dialect.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::digest;
use ring::rand::{SecureRandom as _, SystemRandom};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};

/// The setting that holds the current key.
pub const ENCRYPTION_KEY_SETTING: &str = "HOOKFLEET_ENCRYPTION_KEY";
/// The setting that holds older keys, still accepted for decryption during a rotation.
pub const PREVIOUS_ENCRYPTION_KEYS_SETTING: &str = "HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS";

/// AES-256 needs exactly 32 key bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key id: 8 lowercase hex digits (32 bits of SHA-256(key)). Only needs to tell
/// apart the handful of keys of one deployment; a collision is handled by trying each match.
pub const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = aead::NONCE_LEN;
/// AES-GCM's tag; `AES_256_GCM.tag_len()` is not a `const fn`.
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = KEY_ID_LEN + NONCE_LEN;
/// The shortest valid blob: an empty plaintext still carries key id, nonce and tag.
pub const MIN_BLOB_LEN: usize = HEADER_LEN + TAG_LEN;

/// Standard base64 alphabet, `=` padding optional on input: people paste keys from tools that
/// pad (`openssl rand -base64 32`) and from tools that do not, and both mean the same bytes.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes standard base64 (padded or not, surrounding whitespace ignored) into a buffer that is
/// wiped when dropped, because what we decode here is always key material.
pub(crate) fn decode_base64_lenient(text: &str) -> Result<Zeroizing<Vec<u8>>, base64::DecodeError> {
    BASE64_LENIENT.decode(text.trim()).map(Zeroizing::new)
}

/// `N` bytes from the operating system's CSPRNG (getrandom), for keys and nonces.
///
/// # Panics
/// If the operating system cannot supply randomness. That is not a condition to recover from:
/// carrying on would mean predictable keys or repeated AES-GCM nonces, so stopping is the only
/// safe answer (it is also what `rand::rng()` does). On Linux, `getrandom(2)` only fails this
/// way before the kernel's pool is first initialised, which it waits out rather than failing.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new().fill(&mut bytes).expect("the operating system's random number generator failed");
    bytes
}

/// What is wrong with a key's text (never the text itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    Empty,
    NotBase64,
    WrongLength(usize),
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyProblem::Empty => f.write_str("is empty"),
            KeyProblem::NotBase64 => {
                f.write_str("is not valid base64 (standard alphabet A-Z a-z 0-9 + /, `=` padding optional)")
            }
            KeyProblem::WrongLength(length) => {
                write!(f, "decodes to {length} bytes instead of {KEY_LEN}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "{ENCRYPTION_KEY_SETTING} is not set: generate one with `hookfleet keygen` and set it in \
         the environment (32 random bytes, base64)"
    )]
    MissingKey,

    /// `setting` names where the key came from (`HOOKFLEET_ENCRYPTION_KEY`,
    /// `HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS entry 2`, or just "encryption key").
    #[error(
        "{setting} {problem}: it must be 32 random bytes, base64-encoded; generate one with \
         `hookfleet keygen`"
    )]
    InvalidKey { setting: String, problem: KeyProblem },

    #[error(
        "the encrypted value was written with key id {key_id}, which is not configured (current \
         key id {current_key_id}): add the key with id {key_id} to \
         {PREVIOUS_ENCRYPTION_KEYS_SETTING} (it may be missing there after a key rotation)"
    )]
    UnknownKeyId { key_id: String, current_key_id: String },

    #[error(
        "the encrypted value is truncated: {length} bytes, but even an empty value takes \
         {MIN_BLOB_LEN} (key id, nonce, tag); the stored column was cut or is not hookfleet's"
    )]
    Truncated { length: usize },

    #[error(
        "the encrypted value failed authentication with key id {key_id}: it was altered, or it \
         belongs to another row or column than the one it was read for"
    )]
    AuthenticationFailed { key_id: String },
}

/// One AES-256-GCM key and its public id. `Debug` shows the id only.
pub struct EncryptionKey {
    key: LessSafeKey,
    key_id: String,
}

impl EncryptionKey {
    /// Parses a key from standard base64 (padded or not); it must decode to exactly 32 bytes.
    /// The error says what is wrong without repeating the text.
    pub fn parse_base64(text: &str) -> Result<Self, CryptoError> {
        Self::parse_named(text, "encryption key")
    }

    /// 32 fresh random bytes, padded standard base64: what `hookfleet keygen` prints.
    pub fn generate_base64() -> String {
        let bytes = Zeroizing::new(random_bytes::<KEY_LEN>());
        STANDARD.encode(bytes.as_slice())
    }

    /// First 8 hex digits of SHA-256(key): public, safe to log and store.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn parse_named(text: &str, setting: &str) -> Result<Self, CryptoError> {
        Self::decode(text).map_err(|problem| CryptoError::InvalidKey { setting: setting.to_owned(), problem })
    }

    fn decode(text: &str) -> Result<Self, KeyProblem> {
        if text.trim().is_empty() {
            return Err(KeyProblem::Empty);
        }
        let bytes = decode_base64_lenient(text).map_err(|_| KeyProblem::NotBase64)?;
        if bytes.len() != KEY_LEN {
            return Err(KeyProblem::WrongLength(bytes.len()));
        }
        // ring refuses only a key of the wrong length, checked just above.
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| KeyProblem::WrongLength(bytes.len()))?;
        let digest = digest::digest(&digest::SHA256, &bytes);
        let key_id = hex_lower(&digest.as_ref()[..KEY_ID_LEN / 2]);
        Ok(EncryptionKey { key: LessSafeKey::new(unbound), key_id })
    }

    /// Seals with an explicit nonce. Only `Keyring::encrypt` (random nonce) and the known-answer
    /// test call this: a nonce must never be used twice with one key.
    fn seal(&self, nonce: [u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut blob = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        blob.extend_from_slice(self.key_id.as_bytes());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(plaintext);
        // Proven invariant: ring's AES-GCM refuses only inputs over its limit of about 64 GiB
        // (2^36 - 32 bytes); we encrypt URLs and signing secrets, which are capped far below.
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut blob[HEADER_LEN..])
            .expect("AES-GCM input over 64 GiB");
        blob.extend_from_slice(tag.as_ref());
        blob
    }

    /// Opens `nonce ‖ ciphertext ‖ tag` (the blob after its key id).
    fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        // On failure ring leaves the buffer in an unspecified state; wipe it either way.
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = self.key.open_in_place(nonce, Aad::from(aad), &mut buffer).ok()?.len();
        buffer.truncate(plaintext_len);
        Some(std::mem::take(&mut *buffer))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey").field("key_id", &self.key_id).field("key", &"[REDACTED]").finish()
    }
}

/// The current key (encrypts) and the previous keys (still decrypt during a rotation).
#[derive(Debug)]
pub struct Keyring {
    current: EncryptionKey,
    previous: Vec<EncryptionKey>,
}

impl Keyring {
    pub fn new(current: EncryptionKey, previous: Vec<EncryptionKey>) -> Self {
        Keyring { current, previous }
    }

    /// Builds the keyring from `HOOKFLEET_ENCRYPTION_KEY` (`current`) and
    /// `HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS` (`previous`, already split into entries).
    /// A blank current key counts as not set (`HOOKFLEET_ENCRYPTION_KEY=` in an `.env` file);
    /// blank previous entries are skipped (a trailing comma). Errors name the setting and what
    /// is wrong, never the value.
    pub fn from_settings(current: Option<&SecretString>, previous: &[SecretString]) -> Result<Self, CryptoError> {
        let current = match current.map(|text| text.expose_secret()) {
            Some(text) if !text.trim().is_empty() => text,
            _ => return Err(CryptoError::MissingKey),
        };
        let current = EncryptionKey::parse_named(current, ENCRYPTION_KEY_SETTING)?;
        let previous = previous
            .iter()
            .enumerate()
            .filter(|(_, text)| !text.expose_secret().trim().is_empty())
            .map(|(index, text)| {
                let setting = format!("{PREVIOUS_ENCRYPTION_KEYS_SETTING} entry {}", index + 1);
                EncryptionKey::parse_named(text.expose_secret(), &setting)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring::new(current, previous))
    }

    pub fn current_key_id(&self) -> &str {
        self.current.key_id()
    }

    /// Encrypts with the current key and a fresh random 96-bit nonce. Random nonces are safe
    /// for far more values than one key will ever seal here (NIST's bound is 2^32 per key).
    ///
    /// `aad` binds the value to where it is stored (e.g. `b"webhooks:42:url"`); decryption must
    /// pass the same bytes.
    ///
    /// # Panics
    /// Only if the plaintext exceeds AES-GCM's limit (about 64 GiB) or the operating system's
    /// random source fails (see `random_bytes`).
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        self.current.seal(random_bytes::<NONCE_LEN>(), plaintext, aad)
    }

    /// Decrypts a blob made by `encrypt`, with whichever configured key carries the blob's key
    /// id (current first). `aad` must be the bytes the value was encrypted with.
    pub fn decrypt(&self, blob: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if blob.len() < MIN_BLOB_LEN {
            return Err(CryptoError::Truncated { length: blob.len() });
        }
        let (key_id, sealed) = blob.split_at(KEY_ID_LEN);
        // Ids are 32-bit, so two configured keys could share one: try every match.
        let mut candidates = std::iter::once(&self.current)
            .chain(&self.previous)
            .filter(|key| key.key_id.as_bytes() == key_id)
            .peekable();
        // The key id is stored in clear and is not secret, so it may appear in the error; a
        // corrupted one is escaped rather than printed raw.
        let key_id = key_id.escape_ascii().to_string();
        if candidates.peek().is_none() {
            return Err(CryptoError::UnknownKeyId { key_id, current_key_id: self.current.key_id.clone() });
        }
        candidates.find_map(|key| key.open(sealed, aad)).ok_or(CryptoError::AuthenticationFailed { key_id })
    }
}

/// Lowercase hex, for key ids and the `sha256=` signature.
pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 zero bytes; SHA-256 of it is 66687aad…, so its key id is known.
    const ZERO_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const AAD: &[u8] = b"webhooks:42:url";

    fn key() -> EncryptionKey {
        EncryptionKey::parse_base64(&EncryptionKey::generate_base64()).unwrap()
    }

    fn keyring() -> Keyring {
        Keyring::new(key(), Vec::new())
    }

    fn secret(text: &str) -> SecretString {
        SecretString::from(text)
    }

    #[test]
    fn round_trip() {
        let keyring = keyring();
        for plaintext in [&b""[..], b"https://example.com/hook", &[0u8; 1000]] {
            let blob = keyring.encrypt(plaintext, AAD);
            assert_eq!(keyring.decrypt(&blob, AAD).unwrap(), plaintext);
        }
    }

    #[test]
    fn blob_is_key_id_nonce_ciphertext_tag() {
        let keyring = keyring();
        let blob = keyring.encrypt(b"secret", AAD);
        assert_eq!(blob.len(), KEY_ID_LEN + 12 + 6 + 16);
        assert_eq!(&blob[..KEY_ID_LEN], keyring.current_key_id().as_bytes());
    }

    /// AES-256-GCM known answers, computed independently (Python `cryptography`): the stored
    /// bytes are plain AES-GCM, readable by any other implementation given key, nonce and AAD.
    #[test]
    fn aes_gcm_known_answers() {
        // McGrew & Viega GCM test case 14: zero key, zero nonce, 16 zero bytes, no AAD.
        let zero = EncryptionKey::parse_base64(ZERO_KEY).unwrap();
        let blob = zero.seal([0; 12], &[0; 16], b"");
        assert_eq!(hex_lower(&blob[HEADER_LEN..]), "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919");
        // Key 00..1f, nonce 64..6f, with associated data.
        let bytes: Vec<u8> = (0..32).collect();
        let key = EncryptionKey::parse_base64(&STANDARD.encode(&bytes)).unwrap();
        let nonce: [u8; 12] = std::array::from_fn(|i| 100 + i as u8);
        let blob = key.seal(nonce, b"https://example.com/hook", AAD);
        assert_eq!(&blob[..KEY_ID_LEN], b"630dcd29");
        assert_eq!(&blob[KEY_ID_LEN..HEADER_LEN], &nonce);
        assert_eq!(
            hex_lower(&blob[HEADER_LEN..]),
            "206faa160ad379b15b1a3e85aa090fd321ad6b25e3039c19a18e7c9b4e78d26107458d85991827aa"
        );
        let keyring = Keyring::new(key, Vec::new());
        assert_eq!(keyring.decrypt(&blob, AAD).unwrap(), b"https://example.com/hook");
    }

    #[test]
    fn key_id_is_first_8_hex_of_sha256() {
        let zero = EncryptionKey::parse_base64(ZERO_KEY).unwrap();
        assert_eq!(zero.key_id(), "66687aad");
    }

    #[test]
    fn wrong_aad_fails() {
        let keyring = keyring();
        let blob = keyring.encrypt(b"https://example.com/hook", b"webhooks:42:url");
        for aad in [&b"webhooks:43:url"[..], b"webhooks:42:secret", b""] {
            let error = keyring.decrypt(&blob, aad).unwrap_err();
            assert!(matches!(error, CryptoError::AuthenticationFailed { .. }), "{error}");
        }
    }

    #[test]
    fn tampered_byte_fails() {
        let keyring = keyring();
        let blob = keyring.encrypt(b"https://example.com/hook", AAD);
        for index in 0..blob.len() {
            let mut tampered = blob.clone();
            tampered[index] ^= 0x01;
            let error = keyring.decrypt(&tampered, AAD).unwrap_err();
            if index < KEY_ID_LEN {
                assert!(matches!(error, CryptoError::UnknownKeyId { .. }), "{error}");
            } else {
                assert!(matches!(error, CryptoError::AuthenticationFailed { .. }), "byte {index}: {error}");
            }
        }
    }

    #[test]
    fn truncated_blob_is_refused() {
        let keyring = keyring();
        let blob = keyring.encrypt(b"", AAD);
        assert_eq!(blob.len(), MIN_BLOB_LEN);
        for length in 0..MIN_BLOB_LEN {
            let error = keyring.decrypt(&blob[..length], AAD).unwrap_err();
            assert!(matches!(error, CryptoError::Truncated { length: l } if l == length), "{error}");
        }
        // Cutting off part of the tag of a longer value is an authentication failure.
        let blob = keyring.encrypt(b"hello", AAD);
        let error = keyring.decrypt(&blob[..blob.len() - 1], AAD).unwrap_err();
        assert!(matches!(error, CryptoError::AuthenticationFailed { .. }), "{error}");
    }

    #[test]
    fn decrypts_with_a_previous_key() {
        let old = EncryptionKey::generate_base64();
        let new = EncryptionKey::generate_base64();
        let before = Keyring::from_settings(Some(&secret(&old)), &[]).unwrap();
        let blob = before.encrypt(b"https://example.com/hook", AAD);

        let after = Keyring::from_settings(Some(&secret(&new)), &[secret(&old)]).unwrap();
        assert_ne!(after.current_key_id(), before.current_key_id());
        assert_eq!(after.decrypt(&blob, AAD).unwrap(), b"https://example.com/hook");
        // New values use the new key.
        let fresh = after.encrypt(b"x", AAD);
        assert_eq!(&fresh[..KEY_ID_LEN], after.current_key_id().as_bytes());
        assert!(matches!(before.decrypt(&fresh, AAD), Err(CryptoError::UnknownKeyId { .. })));
    }

    #[test]
    fn unknown_key_id_error_names_the_id() {
        let writer = keyring();
        let reader = keyring();
        let blob = writer.encrypt(b"https://example.com/hook", AAD);
        let error = reader.decrypt(&blob, AAD).unwrap_err();
        let message = error.to_string();
        assert!(matches!(&error, CryptoError::UnknownKeyId { key_id, .. } if key_id == writer.current_key_id()));
        assert!(message.contains(writer.current_key_id()), "{message}");
        assert!(message.contains(reader.current_key_id()), "{message}");
        assert!(message.contains("HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS"), "{message}");
    }

    #[test]
    fn a_colliding_key_id_falls_through_to_the_right_key() {
        // Two keys can only share an id by a 1-in-2^32 accident; force it to test the fallback.
        let first = key();
        let mut second = key();
        second.key_id = first.key_id.clone();
        let writer = Keyring::new(second, Vec::new());
        let blob = writer.encrypt(b"value", AAD);
        let reader = Keyring::new(first, vec![writer.current]);
        assert_eq!(reader.decrypt(&blob, AAD).unwrap(), b"value");
    }

    #[test]
    fn encryptions_of_the_same_plaintext_differ() {
        let keyring = keyring();
        let first = keyring.encrypt(b"https://example.com/hook", AAD);
        let second = keyring.encrypt(b"https://example.com/hook", AAD);
        assert_ne!(first, second);
        assert_ne!(&first[KEY_ID_LEN..HEADER_LEN], &second[KEY_ID_LEN..HEADER_LEN]);
    }

    #[test]
    fn parse_base64_accepts_padded_unpadded_and_surrounding_whitespace() {
        let padded = EncryptionKey::generate_base64();
        assert_eq!(padded.len(), 44);
        assert!(padded.ends_with('='));
        let expected = EncryptionKey::parse_base64(&padded).unwrap();
        for text in [padded.trim_end_matches('=').to_owned(), format!("{padded}\n"), format!("  {padded}  ")] {
            let key = EncryptionKey::parse_base64(&text).unwrap();
            assert_eq!(key.key_id(), expected.key_id());
        }
        assert_ne!(EncryptionKey::generate_base64(), EncryptionKey::generate_base64());
    }

    #[test]
    fn parse_base64_refuses_bad_keys_without_echoing_them() {
        let short = STANDARD.encode([7u8; 16]);
        let long = STANDARD.encode([7u8; 33]);
        let cases = [
            ("", KeyProblem::Empty),
            ("   ", KeyProblem::Empty),
            ("not base64 at all!", KeyProblem::NotBase64),
            ("c2VjcmV0LWtleS1tYXRlcmlhbA_-", KeyProblem::NotBase64),
            (short.as_str(), KeyProblem::WrongLength(16)),
            (long.as_str(), KeyProblem::WrongLength(33)),
        ];
        for (text, expected) in cases {
            let error = EncryptionKey::parse_base64(text).unwrap_err();
            assert!(matches!(&error, CryptoError::InvalidKey { problem, .. } if *problem == expected), "{error}");
            let message = error.to_string();
            assert!(message.contains("hookfleet keygen"), "{message}");
            if !text.trim().is_empty() {
                assert!(!message.contains(text.trim()), "{message}");
            }
        }
    }

    #[test]
    fn from_settings_missing_key_says_how_to_make_one() {
        for current in [None, Some(secret("")), Some(secret("  \n"))] {
            let error = Keyring::from_settings(current.as_ref(), &[]).unwrap_err();
            assert!(matches!(error, CryptoError::MissingKey));
            assert_eq!(
                error.to_string(),
                "HOOKFLEET_ENCRYPTION_KEY is not set: generate one with `hookfleet keygen` and set \
                 it in the environment (32 random bytes, base64)"
            );
        }
    }

    #[test]
    fn from_settings_malformed_names_the_setting_not_the_value() {
        let value = "c2hvcnQta2V5LXZhbHVl"; // base64 of 15 bytes
        let error = Keyring::from_settings(Some(&secret(value)), &[]).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("HOOKFLEET_ENCRYPTION_KEY "), "{message}");
        assert!(message.contains("15 bytes instead of 32"), "{message}");
        assert!(!message.contains(value), "{message}");

        let value = "this is *not* base64";
        let message = Keyring::from_settings(Some(&secret(value)), &[]).unwrap_err().to_string();
        assert!(message.starts_with("HOOKFLEET_ENCRYPTION_KEY "), "{message}");
        assert!(message.contains("not valid base64"), "{message}");
        assert!(!message.contains(value), "{message}");

        let good = secret(&EncryptionKey::generate_base64());
        let previous = [secret(&EncryptionKey::generate_base64()), secret(value)];
        let message = Keyring::from_settings(Some(&good), &previous).unwrap_err().to_string();
        assert!(message.starts_with("HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS entry 2 "), "{message}");
        assert!(!message.contains(value), "{message}");
    }

    #[test]
    fn from_settings_skips_blank_previous_entries() {
        let current = secret(&EncryptionKey::generate_base64());
        let old = EncryptionKey::generate_base64();
        let keyring = Keyring::from_settings(Some(&current), &[secret(""), secret(&old), secret(" ")]).unwrap();
        assert_eq!(keyring.previous.len(), 1);
    }

    #[test]
    fn debug_redacts_keys() {
        let text = EncryptionKey::generate_base64();
        let key = EncryptionKey::parse_base64(&text).unwrap();
        let key_id = key.key_id().to_owned();
        let keyring = Keyring::new(key, vec![EncryptionKey::parse_base64(ZERO_KEY).unwrap()]);
        let debug = format!("{keyring:?}");
        assert!(debug.contains(&key_id), "{debug}");
        assert!(debug.contains("[REDACTED]"), "{debug}");
        assert!(!debug.contains(&text), "{debug}");
        assert!(!debug.contains(text.trim_end_matches('=')), "{debug}");
    }
}
