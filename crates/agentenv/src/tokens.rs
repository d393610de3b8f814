//! The tokens file (`[auth] tokens_file`): one token per line,
//! `NAME SCOPE SHA256-HEX-OF-TOKEN`, `#` comments and blank lines allowed.
//! Only the hash of a token is stored; a presented token is hashed and
//! compared with every entry in constant time.
//!
//! Tokens look like E2B API keys: `e2b_` + 40 lowercase hex digits (160 bits
//! from the OS's random source).

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentenv_core::principal::{Principal, Scope};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every generated token starts with.
pub const TOKEN_PREFIX: &str = "e2b_";

/// A tokens file that cannot be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It could not be opened or read.
    #[error("tokens file {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Others than its owner and group may read or write it.
    #[error(
        "tokens file {path} is accessible to every user (mode {mode:04o}); run chmod 600 {path}"
    )]
    WorldAccessible {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Its group may write it.
    #[error("tokens file {path} is writable by its group (mode {mode:04o}); run chmod 600 {path}")]
    GroupWritable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `NAME SCOPE SHA256-HEX`.
    #[error("tokens file {path} line {line}: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A line names a scope other than `admin` or `user`.
    #[error("tokens file {path} line {line}: unknown scope {scope:?} (expected admin or user)")]
    UnknownScope {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The scope given.
        scope: String,
    },
    /// Two lines give the same name.
    #[error("tokens file {path} line {line}: token name {name} is already given on line {first}")]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the second one.
        line: usize,
        /// The name.
        name: String,
        /// 1-based line number of the first one.
        first: usize,
    },
    /// A name that is not allowed (`token create`).
    #[error("token name {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// `token revoke` of a name the file does not have.
    #[error("tokens file {path}: no token named {name}")]
    NoSuchName {
        /// The file.
        path: PathBuf,
        /// The name.
        name: String,
    },
    /// It could not be written.
    #[error("tokens file {path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One line of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// The token's name: the `owner` of what it creates.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// SHA-256 of the token.
    hash: [u8; 32],
}

/// The tokens of one tokens file.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

impl Tokens {
    /// Parses the text of the tokens file `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Tokens, TokensError> {
        let mut entries: Vec<(usize, TokenEntry)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let malformed = |why: String| TokensError::Malformed {
                path: path.to_path_buf(),
                line,
                why,
            };
            let fields: Vec<&str> = l.split_whitespace().collect();
            let [name, scope, hash] = fields[..] else {
                return Err(malformed(format!(
                    "expected 3 fields `NAME SCOPE SHA256-HEX`, found {}",
                    fields.len()
                )));
            };
            check_name(name).map_err(|e| malformed(e.to_string()))?;
            let scope: Scope = scope.parse().map_err(|_| TokensError::UnknownScope {
                path: path.to_path_buf(),
                line,
                scope: scope.to_string(),
            })?;
            let hash = parse_hash(hash).ok_or_else(|| {
                malformed(
                    "the third field must be the SHA-256 of the token: 64 lowercase hex digits"
                        .into(),
                )
            })?;
            if let Some((first, _)) = entries.iter().find(|(_, e)| e.name == name) {
                return Err(TokensError::Duplicate {
                    path: path.to_path_buf(),
                    line,
                    name: name.to_string(),
                    first: *first,
                });
            }
            entries.push((
                line,
                TokenEntry {
                    name: name.to_string(),
                    scope,
                    hash,
                },
            ));
        }
        Ok(Tokens {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        })
    }

    /// Reads the tokens file: refused when it is accessible to every user or
    /// writable by its group. The mode is read from the opened file, not
    /// looked up again by name.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let read_err = |source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let mode = f.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(TokensError::WorldAccessible {
                path: path.to_path_buf(),
                mode,
            });
        }
        if mode & 0o020 != 0 {
            return Err(TokensError::GroupWritable {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        f.read_to_string(&mut text).map_err(read_err)?;
        Tokens::parse(path, &text)
    }

    /// The principal a presented token stands for. Every entry is compared
    /// (in constant time), so the time taken does not tell which one matched.
    pub fn find(&self, token: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found: Option<&TokenEntry> = None;
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&digest)) {
                found = Some(e);
            }
        }
        found.map(|e| Principal::new(e.name.clone(), e.scope))
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The SHA-256 of a token as the tokens file stores it (lowercase hex).
pub fn hash_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A new random token: `e2b_` + 40 lowercase hex digits.
pub fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

/// Adds a new token named `name` to the tokens file (created 0600 when
/// absent) and returns the token, which is shown nowhere else.
pub fn create(path: &Path, name: &str, scope: Scope) -> Result<String, TokensError> {
    check_name(name)?;
    let existing = match path.exists() {
        true => Tokens::load(path)?,
        false => Tokens::default(),
    };
    if existing.entries.iter().any(|e| e.name == name) {
        return Err(TokensError::BadName {
            name: name.into(),
            why: format!(
                "{} already has a token of this name; revoke it first",
                path.display()
            ),
        });
    }
    let token = generate().map_err(|source| TokensError::Read {
        path: PathBuf::from("/dev/urandom"),
        source,
    })?;
    let write_err = |source| TokensError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write_err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    let text = std::fs::read_to_string(path).map_err(write_err)?;
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let line = format!("{sep}{name} {scope} {}\n", hash_hex(&token));
    f.write_all(line.as_bytes()).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    Ok(token)
}

/// Removes the token named `name` from the tokens file (rewritten whole, by
/// rename, mode 0600); comments and other lines stay as they are.
pub fn revoke(path: &Path, name: &str) -> Result<(), TokensError> {
    let tokens = Tokens::load(path)?;
    if !tokens.entries.iter().any(|e| e.name == name) {
        return Err(TokensError::NoSuchName {
            path: path.to_path_buf(),
            name: name.into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let kept: String = text
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(name) || l.trim().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let write_err = |source| TokensError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    let written = f
        .write_all(kept.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(())
}

/// Token names follow the id grammar (they become `owner`s and log fields).
fn check_name(name: &str) -> Result<(), TokensError> {
    agentenv_core::ids::validate_id("name", name).map_err(|e| TokensError::BadName {
        name: name.chars().take(80).collect(),
        why: e.reason.to_string(),
    })
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/etc/agentenv/tokens";

    fn parse(text: &str) -> Result<Tokens, TokensError> {
        Tokens::parse(Path::new(P), text)
    }

    #[test]
    fn a_file_with_comments_blank_lines_and_both_scopes_parses() {
        let text = format!(
            "# who may call\n\nroot admin {}\n  alice   user   {}  \n",
            hash_hex("e2b_root"),
            hash_hex("e2b_alice")
        );
        let t = parse(&text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.find("e2b_root"), Some(Principal::admin("root")));
        assert_eq!(
            t.find("e2b_alice"),
            Some(Principal::new("alice", Scope::User))
        );
        assert_eq!(t.find("e2b_bob"), None);
        assert_eq!(t.find(""), None);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn every_bad_line_is_refused_with_the_file_and_line() {
        let h = hash_hex("x");
        let cases = [
            ("alice user".to_string(), "line 1: expected 3 fields"),
            (format!("alice user {h} extra"), "found 4"),
            (
                format!("# c\nalice root {h}"),
                "line 2: unknown scope \"root\"",
            ),
            ("alice user abc".to_string(), "64 lowercase hex"),
            (
                format!("alice user {}", h.to_uppercase()),
                "64 lowercase hex",
            ),
            (format!("al/ce user {h}"), "line 1:"),
            (
                format!("alice user {h}\n\nalice admin {}", hash_hex("y")),
                "line 3: token name alice is already given on line 1",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("tokens file {P}")), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn generated_tokens_look_like_e2b_keys_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        for t in [&a, &b] {
            let hexpart = t.strip_prefix("e2b_").unwrap();
            assert_eq!(hexpart.len(), 40, "{t}");
            assert!(hexpart
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        }
    }

    #[test]
    fn create_list_and_revoke_keep_only_hashes_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokens");
        let root = create(&path, "root", Scope::Admin).unwrap();
        let alice = create(&path, "alice", Scope::User).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&root) && !text.contains(&alice), "{text}");
        assert!(text.contains(&hash_hex(&alice)));
        let e = create(&path, "alice", Scope::Admin)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already has a token"), "{e}");
        let t = Tokens::load(&path).unwrap();
        assert_eq!(t.find(&alice), Some(Principal::new("alice", Scope::User)));
        revoke(&path, "alice").unwrap();
        let t = Tokens::load(&path).unwrap();
        assert_eq!(t.find(&alice), None);
        assert_eq!(t.find(&root), Some(Principal::admin("root")));
        let e = revoke(&path, "alice").unwrap_err().to_string();
        assert!(e.contains("no token named alice"), "{e}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_file_others_may_read_or_the_group_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        create(&path, "root", Scope::Admin).unwrap();
        for (mode, want) in [
            (0o604, "accessible to every user"),
            (0o620, "writable by its group"),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Tokens::load(&path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(want),
                "{e}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(Tokens::load(&path).unwrap().len(), 1);
        let e = Tokens::load(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent: cannot read"), "{e}");
    }
}
