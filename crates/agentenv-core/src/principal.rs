//! Who is calling: the principal a request was authenticated as, and what it
//! may see. The daemon's HTTP layer decides the principal (a bearer token, a
//! Unix socket peer, or `anonymous` with `[auth] mode = "none"`); the engine's
//! `*_as` entry points take it, stamp new VMs and snapshots with its name and
//! answer "not found" for what it may not see.

use serde::{Deserialize, Serialize};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Everything, on every VM and snapshot.
    Admin,
    /// Only the VMs and snapshots it created; the others look absent.
    User,
}

impl Scope {
    /// The scope's name in the tokens file and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::User => "user",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "admin" => Ok(Scope::Admin),
            "user" => Ok(Scope::User),
            other => Err(format!(
                "unknown scope {other:?} (expected \"admin\" or \"user\")"
            )),
        }
    }
}

/// An authenticated caller: a token's name, `uid:N` for a Unix socket peer,
/// or `anonymous` when authentication is off.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// Recorded as the `owner` of what it creates, and in the audit log.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
}

impl Principal {
    /// A principal with `scope`.
    pub fn new(name: impl Into<String>, scope: Scope) -> Principal {
        Principal {
            name: name.into(),
            scope,
        }
    }

    /// An admin principal (Unix socket peers, `mode = "none"`).
    pub fn admin(name: impl Into<String>) -> Principal {
        Principal::new(name, Scope::Admin)
    }

    /// True when it may see (and act on) something owned by `owner`. Things
    /// without an owner (made before owners were recorded) are admin-only.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.scope == Scope::Admin || owner == Some(self.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_see_only_their_own_and_admins_everything() {
        let alice = Principal::new("alice", Scope::User);
        assert!(alice.may_see(Some("alice")));
        assert!(!alice.may_see(Some("bob")));
        assert!(!alice.may_see(None));
        let root = Principal::admin("root");
        assert!(root.may_see(Some("alice")));
        assert!(root.may_see(None));
    }

    #[test]
    fn scopes_parse_by_name_only() {
        assert_eq!("admin".parse::<Scope>(), Ok(Scope::Admin));
        assert_eq!("user".parse::<Scope>(), Ok(Scope::User));
        assert!("Admin".parse::<Scope>().unwrap_err().contains("\"Admin\""));
    }
}
