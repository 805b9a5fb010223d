//! API keys: configured as SHA-256 hashes, each bound to a tenant and an advertiser
//! allow-list, compared in constant time.

use std::collections::HashSet;
use std::path::Path;

use axum::http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why the key configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyConfigError {
    /// The keys file could not be read.
    #[error("cannot read API keys file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration is not the expected JSON.
    #[error("invalid API keys configuration ({origin}): {message}")]
    Invalid {
        /// Where it came from (file path or environment variable).
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The same key is configured twice.
    #[error("API key {sha256_prefix}… ({origin}) is configured already, for tenant {tenant:?}; give each key one record")]
    Duplicate {
        /// Where the second record came from.
        origin: String,
        /// The first 8 hex digits of its hash.
        sha256_prefix: String,
        /// The tenant of the first record.
        tenant: String,
    },
}

/// Which advertisers a key may send events for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdvertiserScope {
    /// Any advertiser (`"*"`).
    Any,
    /// Only these.
    Only(HashSet<String>),
}

impl AdvertiserScope {
    /// Whether `advertiser_id` is allowed.
    pub fn allows(&self, advertiser_id: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(set) => set.contains(advertiser_id),
        }
    }
}

/// One configured key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    sha256: [u8; 32],
    /// The tenant the key belongs to; it names the `spillway-tenant` attribute.
    pub tenant: String,
    /// The advertisers it may send for.
    pub advertisers: AdvertiserScope,
}

impl ApiKey {
    /// A key record from the plain key (hashed here; the plain key is not kept).
    pub fn from_plain(key: &str, tenant: &str, advertisers: AdvertiserScope) -> Self {
        Self {
            sha256: sha256(key),
            tenant: tenant.to_owned(),
            advertisers,
        }
    }
}

/// The key file / env format: `[{"sha256": "<hex>", "tenant": "acme", "advertisers": ["a"] | "*"}]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    sha256: String,
    tenant: String,
    advertisers: AdvertisersEntry,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AdvertisersEntry {
    All(String),
    List(Vec<String>),
}

/// The set of configured keys.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    /// Keys from records.
    pub fn new(keys: Vec<ApiKey>) -> Self {
        Self { keys }
    }

    /// Parses the JSON key configuration; `origin` names its source in errors.
    ///
    /// # Errors
    /// [`KeyConfigError::Invalid`] for malformed JSON, a hash that is not 64 hex digits, a
    /// tenant SNS would refuse (empty, control characters, over 256 bytes), or an advertiser
    /// scope other than a list or `"*"`.
    pub fn parse(json: &str, origin: &str) -> Result<Self, KeyConfigError> {
        let invalid = |message: String| KeyConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        let entries: Vec<KeyEntry> =
            serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        let mut keys = Self {
            keys: Vec::with_capacity(entries.len()),
        };
        for (i, e) in entries.into_iter().enumerate() {
            let mut sha = [0_u8; 32];
            hex::decode_to_slice(e.sha256.trim(), &mut sha)
                .map_err(|_| invalid(format!("entry {i}: sha256 must be 64 hex digits")))?;
            let advertisers = match e.advertisers {
                AdvertisersEntry::All(s) if s == "*" => AdvertiserScope::Any,
                AdvertisersEntry::All(s) => {
                    return Err(invalid(format!(
                        "entry {i}: advertisers must be a list or \"*\", not {s:?}"
                    )))
                }
                AdvertisersEntry::List(list) => AdvertiserScope::Only(list.into_iter().collect()),
            };
            // It becomes the `spillway-tenant` attribute of every message: SNS refuses an
            // empty one or one with control characters (each request of the key would answer
            // 503 for good), and a long one eats into the envelope's room for attributes.
            if let Some(why) = tenant_problem(&e.tenant) {
                return Err(invalid(format!("entry {i}: tenant {:?} {why}", e.tenant)));
            }
            let key = ApiKey {
                sha256: sha,
                tenant: e.tenant,
                advertisers,
            };
            keys.push(key, origin)?;
        }
        Ok(keys)
    }

    /// Loads keys from a file.
    ///
    /// # Errors
    /// [`KeyConfigError`] when the file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self, KeyConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Adds keys; `origin` names where they came from in errors.
    ///
    /// # Errors
    /// [`KeyConfigError::Duplicate`] when a key is configured already: the first record
    /// would win without a word, so a second one narrowing the key's advertisers (or naming
    /// another tenant) would do nothing.
    pub fn extend(&mut self, other: ApiKeys, origin: &str) -> Result<(), KeyConfigError> {
        for key in other.keys {
            self.push(key, origin)?;
        }
        Ok(())
    }

    fn push(&mut self, key: ApiKey, origin: &str) -> Result<(), KeyConfigError> {
        if let Some(same) = self.keys.iter().find(|k| k.sha256 == key.sha256) {
            return Err(KeyConfigError::Duplicate {
                origin: origin.to_owned(),
                sha256_prefix: hex::encode(&key.sha256[..4]),
                tenant: same.tenant.clone(),
            });
        }
        self.keys.push(key);
        Ok(())
    }

    /// For each key, the index of the same key (same hash) in `old`, if it was there.
    pub fn indexes_in(&self, old: &ApiKeys) -> Vec<Option<usize>> {
        self.keys
            .iter()
            .map(|k| old.keys.iter().position(|o| o.sha256 == k.sha256))
            .collect()
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether none is configured (every request is then refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Finds the key presented in `x-api-key` or `Authorization: Bearer …`, either one: a
    /// request through API Gateway with a usage-plan key carries that key in `x-api-key`,
    /// and used to be refused whatever its `Authorization` held. Every configured hash is
    /// compared with every presented key, in constant time, so timing reveals nothing about
    /// which matched.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<(usize, &ApiKey)> {
        let mut found = None;
        for presented in presented_keys(headers).into_iter().flatten() {
            let digest = sha256(presented);
            for (i, key) in self.keys.iter().enumerate() {
                if bool::from(key.sha256.ct_eq(&digest)) && found.is_none() {
                    found = Some((i, key));
                }
            }
        }
        found
    }
}

/// The keys a request presents: `x-api-key`, then the `Authorization` bearer token. A header
/// given twice presents nothing (Lambda joins repeated values with commas, which matches no
/// key: the server answers the same).
fn presented_keys(headers: &HeaderMap) -> [Option<&str>; 2] {
    let once = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    };
    let x_api_key = once("x-api-key").map(str::trim);
    let bearer = once(axum::http::header::AUTHORIZATION.as_str())
        .and_then(|auth| auth.trim().split_once(' '))
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()));
    [x_api_key, bearer]
}

/// Authorization schemes a 401 may name back to the client.
const KNOWN_SCHEMES: [&str; 7] = [
    "Basic",
    "Token",
    "Digest",
    "ApiKey",
    "Api-Key",
    "Negotiate",
    "AWS4-HMAC-SHA256",
];

/// Why a request that presented no matching key was refused, for its 401: the header's
/// shape, never the key itself. A valid key sent as `Authorization: <key>` or
/// `Token <key>`, or a header sent twice, all got the same "missing or invalid API key".
pub fn why_unauthorized(headers: &HeaderMap) -> String {
    let authorization = axum::http::header::AUTHORIZATION.as_str();
    for name in ["x-api-key", authorization] {
        if headers.get_all(name).iter().count() > 1 {
            return format!("the {name} header was sent more than once; send it once");
        }
    }
    let [x_api_key, bearer] = presented_keys(headers);
    if x_api_key.is_some_and(|k| !k.is_empty()) || bearer.is_some_and(|k| !k.is_empty()) {
        return "the key presented matches none configured (keys are read when the server \
                starts)"
            .into();
    }
    match headers
        .get(authorization)
        .map(|v| v.to_str().map(str::trim))
    {
        Some(Ok(value)) if value.eq_ignore_ascii_case("bearer") => {
            "the bearer token is empty".into()
        }
        Some(Ok(value)) if !value.is_empty() => match value.split_once(' ') {
            // Named only when it is a scheme everyone knows: what comes before the first
            // space may be the key itself (`Authorization: <key> …`).
            Some((scheme, _)) => format!(
                "the Authorization header uses {}; send `Authorization: Bearer <key>` or \
                 `x-api-key: <key>`",
                KNOWN_SCHEMES
                    .iter()
                    .find(|known| known.eq_ignore_ascii_case(scheme))
                    .map_or_else(
                        || "a scheme other than Bearer".to_owned(),
                        |known| format!("the {known:?} scheme")
                    )
            ),
            None => "the Authorization header has no scheme; send `Authorization: Bearer <key>` \
                     or `x-api-key: <key>`"
                .into(),
        },
        Some(_) => "the Authorization header is empty or not ASCII; send `Authorization: \
                    Bearer <key>` or `x-api-key: <key>`"
            .into(),
        None if headers.contains_key("x-api-key") => {
            "the x-api-key header is empty or not ASCII".into()
        }
        None => "no API key; send `Authorization: Bearer <key>` or `x-api-key: <key>`".into(),
    }
}

/// Hex SHA-256 of a plain key, as the key configuration expects it.
pub fn hash_key(key: &str) -> String {
    hex::encode(sha256(key))
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Most bytes of a tenant name (its attribute shares the 2 KiB kept for attributes).
const MAX_TENANT_BYTES: usize = 256;

/// What SNS would refuse in a tenant name, or `None`.
fn tenant_problem(tenant: &str) -> Option<String> {
    if tenant.trim().is_empty() {
        return Some("is empty".into());
    }
    if tenant.len() > MAX_TENANT_BYTES {
        return Some(format!("is over {MAX_TENANT_BYTES} bytes"));
    }
    tenant
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{FFFE}' | '\u{FFFF}'))
        .map(|c| format!("holds {c:?}, which SNS refuses in a message attribute"))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn keys() -> ApiKeys {
        let json = format!(
            r#"[{{"sha256":"{}","tenant":"acme","advertisers":["adv-1"]}},
                {{"sha256":"{}","tenant":"ops","advertisers":"*"}}]"#,
            hash_key("secret-1"),
            hash_key("secret-2")
        );
        ApiKeys::parse(&json, "test").unwrap()
    }

    #[test]
    fn a_bearer_or_x_api_key_header_finds_its_key() {
        let keys = keys();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer secret-1"));
        assert_eq!(keys.authenticate(&h).unwrap().1.tenant, "acme");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("secret-2"));
        let (_, key) = keys.authenticate(&h).unwrap();
        assert_eq!(key.tenant, "ops");
        assert!(key.advertisers.allows("anyone"));
    }

    #[test]
    fn a_valid_bearer_key_passes_beside_an_unknown_x_api_key() {
        let keys = keys();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("usage-plan-key"));
        h.insert("authorization", HeaderValue::from_static("Bearer secret-1"));
        assert_eq!(keys.authenticate(&h).unwrap().1.tenant, "acme");
    }

    #[test]
    fn a_key_header_given_twice_presents_nothing() {
        let keys = keys();
        let mut h = HeaderMap::new();
        h.append("authorization", HeaderValue::from_static("Bearer secret-1"));
        h.append("authorization", HeaderValue::from_static("Bearer secret-2"));
        assert!(keys.authenticate(&h).is_none());
    }

    #[test]
    fn a_key_configured_twice_is_refused() {
        let record = |tenant: &str| {
            format!(
                r#"[{{"sha256":"{}","tenant":"{tenant}","advertisers":"*"}}]"#,
                hash_key("secret-1")
            )
        };
        let mut all = keys();
        let err = all
            .extend(
                ApiKeys::parse(&record("narrowed"), "SPILLWAY_API_KEYS").unwrap(),
                "SPILLWAY_API_KEYS",
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("SPILLWAY_API_KEYS"), "{msg}");
        assert!(msg.contains("\"acme\""), "{msg}");
        assert!(!msg.contains(&hash_key("secret-1")), "{msg}");
        let twice = format!(
            r#"[{{"sha256":"{h}","tenant":"a","advertisers":"*"}},{{"sha256":"{h}","tenant":"b","advertisers":"*"}}]"#,
            h = hash_key("k")
        );
        assert!(ApiKeys::parse(&twice, "file").is_err());
    }

    #[test]
    fn a_wrong_or_missing_key_finds_nothing() {
        let keys = keys();
        let mut h = HeaderMap::new();
        assert!(keys.authenticate(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Bearer nope"));
        assert!(keys.authenticate(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Basic secret-1"));
        assert!(keys.authenticate(&h).is_none());
    }

    #[test]
    fn a_malformed_configuration_says_what_is_wrong() {
        let err = ApiKeys::parse(
            r#"[{"sha256":"abc","tenant":"t","advertisers":"*"}]"#,
            "env",
        )
        .unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let err = ApiKeys::parse(
            &format!(
                r#"[{{"sha256":"{}","tenant":"t","advertisers":"all"}}]"#,
                hash_key("k")
            ),
            "env",
        )
        .unwrap_err();
        assert!(err.to_string().contains("a list or"), "{err}");
        for tenant in ["", " ", "acme\\u0007", &"t".repeat(257)] {
            let err = ApiKeys::parse(
                &format!(
                    r#"[{{"sha256":"{}","tenant":"{tenant}","advertisers":"*"}}]"#,
                    hash_key("k")
                ),
                "env",
            )
            .unwrap_err();
            assert!(err.to_string().contains("entry 0: tenant"), "{err}");
        }
        // What SNS takes is taken: key files that worked keep working.
        let keys = ApiKeys::parse(
            &format!(
                r#"[{{"sha256":"{}","tenant":"Acme Corp – EU","advertisers":"*"}}]"#,
                hash_key("k")
            ),
            "env",
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
    }

    /// A valid key sent the wrong way, or a header sent twice, got the same "missing or
    /// invalid API key" as no key at all; the 401 now says which, never quoting the key.
    #[test]
    fn a_refusal_says_what_was_wrong_with_the_header_and_never_quotes_the_key() {
        let why = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            assert!(keys().authenticate(&h).is_none());
            why_unauthorized(&h)
        };
        for (pairs, expected) in [
            (&[][..], "no API key; send `Authorization: Bearer <key>`"),
            (
                &[("authorization", "secret-1")],
                "the Authorization header has no scheme",
            ),
            (
                &[("authorization", "Token secret-1")],
                "uses the \"Token\" scheme",
            ),
            (
                &[("authorization", "secret-1 x")],
                "uses a scheme other than Bearer",
            ),
            (&[("authorization", "Bearer ")], "the bearer token is empty"),
            (&[("x-api-key", "")], "the x-api-key header is empty"),
            (
                &[("x-api-key", "secret-1"), ("x-api-key", "secret-1")],
                "the x-api-key header was sent more than once",
            ),
            (
                &[("x-api-key", "wrong")],
                "the key presented matches none configured",
            ),
            (
                &[("authorization", "Bearer wrong")],
                "matches none configured",
            ),
        ] {
            let got = why(pairs);
            assert!(got.contains(expected), "{pairs:?}: {got}");
            assert!(!got.contains("secret-1") && !got.contains("wrong"), "{got}");
        }
    }
}
