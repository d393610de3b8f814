//! Identifiers that become path components, and the one checked join.

use std::path::{Component, Path, PathBuf};

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 63;

/// An id that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} is invalid: {reason}")]
pub struct IdError {
    /// The request field the id came from (`vm_id`, `snapshot_id`, …).
    pub field: String,
    /// The rejected value, truncated for display.
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// Accepts `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`, and not `.` or `..`.
///
/// Runs before any file-system call that uses the id.
pub fn validate_id(field: &str, value: &str) -> Result<(), IdError> {
    let err = |reason| IdError {
        field: field.to_string(),
        value: value.chars().take(80).collect(),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(err("must be at most 63 characters"));
    }
    if value == "." || value == ".." {
        return Err(err("must not be `.` or `..`"));
    }
    let bytes = value.as_bytes();
    if !bytes[0].is_ascii_alphanumeric() {
        return Err(err("must start with an ASCII letter or digit"));
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(err(
            "may contain only ASCII letters, digits, `.`, `_` and `-`",
        ));
    }
    Ok(())
}

/// Joins a validated id under a root, refusing anything that is not one plain
/// path component. Every path built from user input goes through here.
pub fn checked_join(root: &Path, field: &str, id: &str) -> Result<PathBuf, IdError> {
    validate_id(field, id)?;
    let mut comps = Path::new(id).components();
    match (comps.next(), comps.next()) {
        (Some(Component::Normal(_)), None) => Ok(root.join(id)),
        _ => Err(IdError {
            field: field.to_string(),
            value: id.to_string(),
            reason: "must be a single path component",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str, ok: bool) {
        assert_eq!(validate_id("vm_id", value).is_ok(), ok, "{value:?}");
    }

    #[test]
    fn accepts_plain_ids() {
        for v in ["a", "A0", "vm-1", "vm_1.2", "0", &"x".repeat(63), "a..b"] {
            check(v, true);
        }
    }

    #[test]
    fn rejects_hostile_ids() {
        for v in [
            "",
            ".",
            "..",
            ".hidden",
            "-flag",
            "_x",
            "a/b",
            "../etc",
            "/abs",
            "a\0b",
            "a b",
            "vm\n",
            "é",
            "١٢٣",
            &"x".repeat(64),
        ] {
            check(v, false);
        }
    }

    #[test]
    fn error_names_the_field() {
        let e = validate_id("snapshot_id", "../x").unwrap_err();
        assert!(
            e.to_string().starts_with("snapshot_id \"../x\" is invalid"),
            "{e}"
        );
    }

    #[test]
    fn checked_join_stays_under_root() {
        let root = Path::new("/srv/sessions");
        assert_eq!(
            checked_join(root, "vm_id", "vm1").unwrap(),
            PathBuf::from("/srv/sessions/vm1")
        );
        assert!(checked_join(root, "vm_id", "..").is_err());
        assert!(checked_join(root, "vm_id", "a/../../b").is_err());
    }
}
