//! Accounts: who may connect and what each user may do (docs/DESIGN.md,
//! "Security").
//!
//! Every server and relay of a tree reads the same accounts file (TOML):
//!
//! ```toml
//! [[user]]
//! name = "feed"
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."   # `canopy passwd`
//! publish = ["md.>"]
//!
//! [[user]]
//! name = "reader"
//! tokens = ["sha256:9f86d0..."]                    # `canopy token`
//! certificates = ["reader"]  # TLS client certificates (common or DNS name) that log in as it
//! subscribe = ["md.>"]
//! call = ["get"]
//! members = false        # may be told who is connected (`full` reports)
//! relay = false          # may attach as a relay
//! http = false           # its tokens open the dashboard, API and /metrics
//! publish_rate = 1000    # publishes and calls a second, per server
//! ```
//!
//! A user past its publish rate is slowed, not refused: its connections
//! are read no faster than the rate allows, so its client's window fills
//! and its publishes wait (a refused publish would leave a hole in its
//! publisher sequence).
//!
//! Passwords are stored as argon2id hashes (they may be guessable, so the
//! hash must be slow); tokens, random and long, as SHA-256 hashes (a token
//! is found by its hash). Checking a password takes tens of milliseconds:
//! it is done on the connection's task, never on the server's loop.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use canopy_client::permissions::{Credentials, Permissions};
use canopy_client::topic::Pattern;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The accounts file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    user: Vec<FileUser>,
}

/// One `[[user]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUser {
    name: String,
    /// An argon2 hash (PHC string).
    password: Option<String>,
    /// `sha256:HEX` hashes of the user's tokens.
    #[serde(default)]
    tokens: Vec<String>,
    /// Names (common or DNS) of verified client certificates that log in
    /// as this user when the client sends no other credentials.
    #[serde(default)]
    certificates: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    call: Vec<String>,
    #[serde(default)]
    members: bool,
    #[serde(default)]
    relay: bool,
    #[serde(default)]
    http: bool,
    /// Publishes (and calls) per second, per server, at most: a bucket
    /// of that many refilled every second; none by default.
    publish_rate: Option<u32>,
}

/// Why an accounts file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// It could not be read.
    #[error("cannot read accounts file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML for the schema.
    #[error("accounts file {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: toml::de::Error,
    },
    /// A user's entry is wrong.
    #[error("accounts file {path}, user `{user}`: {why}")]
    User {
        /// The file.
        path: String,
        /// The user.
        user: String,
        /// Why.
        why: String,
    },
}

/// The accounts of a tree, read once at start.
#[derive(Debug, Default)]
pub struct Accounts {
    /// By name: the password hash, if any, and the permissions.
    users: HashMap<String, (Option<String>, Permissions)>,
    /// Token hash to user name.
    tokens: HashMap<[u8; 32], String>,
    /// Client certificate name to user name.
    certificates: HashMap<String, String>,
    /// A hash of a random password, checked against when a user is
    /// unknown, so that it takes as long to refuse as a wrong password
    /// (made when first needed).
    decoy: std::sync::OnceLock<String>,
    /// Per user with a publish rate: its bucket, shared by its
    /// connections to this server.
    rates: HashMap<String, Arc<Mutex<Bucket>>>,
}

/// A token bucket: `rate` tokens a second, at most `rate` held.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Bucket {
            rate,
            tokens: rate,
            at: None,
        }
    }

    /// Takes one token at `now`; if there is none, how long until there is
    /// (the token is taken then: the caller waits that long).
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let since = self
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.at = Some(now);
        self.tokens = (self.tokens + since * self.rate).min(self.rate) - 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

impl Accounts {
    /// Reads an accounts file.
    ///
    /// # Errors
    /// When it cannot be read or parsed, a pattern or hash is invalid, or
    /// a name or token is given twice.
    pub fn load(path: &Path) -> Result<Self, AccountsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AccountsError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            AccountsError::Parse { source, .. } => AccountsError::Parse {
                path: shown.clone(),
                source,
            },
            AccountsError::User { user, why, .. } => AccountsError::User {
                path: shown.clone(),
                user,
                why,
            },
            other => other,
        })
    }

    /// Parses an accounts file's text.
    ///
    /// # Errors
    /// As [`Accounts::load`].
    pub fn parse(text: &str) -> Result<Self, AccountsError> {
        let file: File = toml::from_str(text).map_err(|source| AccountsError::Parse {
            path: String::new(),
            source,
        })?;
        let mut accounts = Accounts::default();
        for u in file.user {
            let bad = |why: String| AccountsError::User {
                path: String::new(),
                user: u.name.clone(),
                why,
            };
            let patterns = |what: &str, v: &[String]| -> Result<Vec<Pattern>, AccountsError> {
                v.iter()
                    .map(|p| Pattern::new(p).map_err(|e| bad(format!("{what}: {e}"))))
                    .collect()
            };
            if let Some(hash) = &u.password {
                PasswordHash::new(hash)
                    .map_err(|e| bad(format!("password: not an argon2 hash: {e}")))?;
            }
            let permissions = Permissions {
                user: u.name.clone(),
                publish: patterns("publish", &u.publish)?,
                subscribe: patterns("subscribe", &u.subscribe)?,
                call: patterns("call", &u.call)?,
                members: u.members,
                relay: u.relay,
                http: u.http,
            };
            if let Some(rate) = u.publish_rate {
                if rate == 0 {
                    return Err(bad("publish_rate: at least 1 a second".into()));
                }
                let bucket = Arc::new(Mutex::new(Bucket::new(rate)));
                accounts.rates.insert(u.name.clone(), bucket);
            }
            for t in &u.tokens {
                let hash = parse_token_hash(t).ok_or_else(|| {
                    bad(format!("token `{t}` is not `sha256:` and 64 hex digits"))
                })?;
                if accounts.tokens.insert(hash, u.name.clone()).is_some() {
                    return Err(bad("a token given twice".into()));
                }
            }
            for c in &u.certificates {
                if c.is_empty() {
                    return Err(bad("an empty certificate name".into()));
                }
                if accounts
                    .certificates
                    .insert(c.clone(), u.name.clone())
                    .is_some()
                {
                    return Err(bad(format!("certificate name `{c}` given twice")));
                }
            }
            if accounts
                .users
                .insert(u.name.clone(), (u.password.clone(), permissions))
                .is_some()
            {
                return Err(bad("the name is given twice".into()));
            }
        }
        Ok(accounts)
    }

    fn decoy(&self) -> &str {
        self.decoy
            .get_or_init(|| hash_password(&new_token().0).unwrap_or_default())
    }

    /// The bucket that paces `user`'s publishes here, if it has a rate.
    pub fn rate_of(&self, user: &str) -> Option<Arc<Mutex<Bucket>>> {
        self.rates.get(user).cloned()
    }

    /// Whether `token` opens the servers' HTTP side (its user has `http`).
    pub fn opens_http(&self, token: &str) -> bool {
        self.check(Some(&Credentials::Token(token.to_owned())), &[])
            .is_ok_and(|p| p.http)
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user `credentials` prove, or without any, the first user
    /// mapped from the names of the client's verified TLS certificate
    /// (`certificate`, empty without one); and what it may do. Slow for a
    /// password (argon2): call it off the server's loop.
    ///
    /// # Errors
    /// Why they prove nothing, for the client (never which part was
    /// wrong, so names cannot be guessed one at a time).
    pub fn check(
        &self,
        credentials: Option<&Credentials>,
        certificate: &[String],
    ) -> Result<Permissions, String> {
        const WRONG: &str = "wrong credentials";
        match credentials {
            None => certificate
                .iter()
                .find_map(|name| self.certificates.get(name))
                .and_then(|user| self.users.get(user))
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    "this server requires credentials (a token, a user and password, or a client certificate it knows)".into()
                }),
            Some(Credentials::Token(token)) => self
                .tokens
                .get(&sha256(token))
                .and_then(|name| self.users.get(name))
                .map(|(_, p)| p.clone())
                .ok_or_else(|| WRONG.into()),
            Some(Credentials::Password { user, password }) => {
                let (hash, permissions) = match self.users.get(user) {
                    Some((Some(hash), p)) => (hash.as_str(), Some(p)),
                    _ => (self.decoy(), None),
                };
                let ok = PasswordHash::new(hash).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                });
                match (ok, permissions) {
                    (true, Some(p)) => Ok(p.clone()),
                    _ => Err(WRONG.into()),
                }
            }
        }
    }
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_token_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// An argon2id hash of `password` for an accounts file (`canopy passwd`).
///
/// # Errors
/// When hashing fails (it does not with the default parameters).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A new random token and the line for an accounts file (`canopy token`).
pub fn new_token() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let hash: String = sha256(&token).iter().map(|b| format!("{b:02x}")).collect();
    (token.clone(), format!("sha256:{hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> (Accounts, String) {
        let (token, hash) = new_token();
        let password = hash_password("hunter2").expect("hashes");
        let text = format!(
            r#"
[[user]]
name = "feed"
password = "{password}"
publish = ["md.>"]

[[user]]
name = "reader"
tokens = ["{hash}"]
certificates = ["reader.plant-a", "reader-backup"]
subscribe = ["md.>"]
members = true
"#
        );
        (Accounts::parse(&text).expect("parses"), token)
    }

    #[test]
    fn passwords_and_tokens_prove_their_user_and_nothing_else() {
        let (a, token) = accounts();
        let pw = |user: &str, password: &str| Credentials::Password {
            user: user.into(),
            password: password.into(),
        };
        let feed = a
            .check(Some(&pw("feed", "hunter2")), &[])
            .expect("the password");
        assert_eq!(feed.user, "feed");
        assert!(feed.may_publish("md.x") && !feed.members);
        let reader = a
            .check(Some(&Credentials::Token(token)), &[])
            .expect("the token");
        assert_eq!(reader.user, "reader");
        assert!(reader.members && !reader.may_publish("md.x"));
        for wrong in [
            Some(pw("feed", "hunter3")),
            Some(pw("nobody", "hunter2")),
            Some(pw("reader", "")),
            Some(Credentials::Token("0".repeat(48))),
            None,
        ] {
            assert!(a.check(wrong.as_ref(), &[]).is_err(), "{wrong:?}");
        }
    }

    #[test]
    fn a_certificate_name_proves_its_user_only_without_other_credentials() {
        let (a, _) = accounts();
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let by_cert = a.check(None, &names(&["canopy-x", "reader-backup"]));
        assert_eq!(by_cert.expect("the second name maps").user, "reader");
        assert!(
            a.check(None, &names(&["feed", "reader"])).is_err(),
            "user names are not certificate names"
        );
        // Credentials given decide, whatever the certificate says.
        let wrong = Credentials::Token("0".repeat(48));
        assert!(a.check(Some(&wrong), &names(&["reader.plant-a"])).is_err());
        let twice = "[[user]]\nname = \"a\"\ncertificates = [\"x\"]\n[[user]]\nname = \"b\"\ncertificates = [\"x\"]\n";
        let err = Accounts::parse(twice).expect_err("one name, two users");
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn the_example_tree_and_its_demonstration_accounts_work_as_the_readme_says() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let tree = std::fs::read_to_string(dir.join("secure.toml")).expect("reads");
        let tree = crate::launcher::TreeConfig::parse(&tree).expect("a tree");
        assert_eq!(tree.token.as_deref(), Some("demo-tree-token"));
        let a = Accounts::load(&dir.join("secure-accounts.toml")).expect("loads");
        let token = |t: &str| a.check(Some(&Credentials::Token(t.into())), &[]);
        assert!(token("demo-tree-token").expect("the tree's").relay);
        let reader = token("demo-reader-token").expect("the reader's");
        assert!(reader.may_subscribe(&Pattern::new("md.NASDAQ.>").expect("pattern")));
        assert!(!reader.may_subscribe(&Pattern::new("md.>").expect("pattern")));
        let feed = a.check(
            Some(&Credentials::Password {
                user: "feed".into(),
                password: "feed-demo".into(),
            }),
            &[],
        );
        assert!(feed.expect("the feed's").may_publish("md.NASDAQ.AAPL"));
    }

    #[test]
    fn a_bucket_allows_its_rate_and_says_how_long_to_wait_past_it() {
        let mut b = Bucket::new(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.take(t0), None, "a second's worth at once");
        }
        let wait = b.take(t0).expect("the eleventh waits");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After that wait, the next token is there again (and was taken
        // by the one that waited): the one after waits another tenth.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b
            .take(t1)
            .is_some_and(|w| (w.as_secs_f64() - 0.1).abs() < 1e-9));
        // A quiet second refills it, to the rate and no more.
        let t2 = t1 + Duration::from_secs(5);
        for _ in 0..10 {
            assert_eq!(b.take(t2), None);
        }
        assert!(b.take(t2).is_some());
    }

    #[test]
    fn bad_accounts_files_are_refused_with_the_reason() {
        let bad = [
            ("[[user]]\nname = \"a\"\npublish = [\"a..b\"]\n", "publish"),
            ("[[user]]\nname = \"a\"\npassword = \"plain\"\n", "argon2"),
            ("[[user]]\nname = \"a\"\ntokens = [\"abc\"]\n", "sha256"),
            ("[[user]]\nname = \"a\"\n[[user]]\nname = \"a\"\n", "twice"),
            ("[[user]]\nname = \"a\"\nwho = 1\n", "who"),
        ];
        for (text, why) in bad {
            let e = Accounts::parse(text).expect_err(text).to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
