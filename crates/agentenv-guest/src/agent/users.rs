//! Guest users, read from the guest's own /etc/passwd and /etc/group (the
//! agent is a static binary: no NSS), and the paths a request names on a
//! user's behalf (relative ones resolve against the user's home).

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use agentenv_proto::{ErrorCode, ErrorMsg};

/// Where the guest's account files are.
pub const ETC: &str = "/etc";

/// Longest path a request may name.
const MAX_PATH: usize = 4096;

/// One account, as /etc/passwd and /etc/group describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its supplementary groups (the primary one first).
    pub groups: Vec<u32>,
    /// Its home directory.
    pub home: String,
    /// Its login shell.
    pub shell: String,
}

/// The account database of a guest: users and groups by id and name.
#[derive(Debug, Default)]
pub struct Accounts {
    users: Vec<User>,
    /// Group id → name.
    group_names: HashMap<u32, String>,
    /// Group id → member names (from /etc/group's fourth field).
    members: HashMap<u32, Vec<String>>,
}

impl Accounts {
    /// Reads `etc/passwd` and `etc/group` (a missing file is an empty one).
    pub fn load(etc: &Path) -> Accounts {
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap_or_default();
        let group = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
        Accounts::parse(&passwd, &group)
    }

    /// The guest's accounts (`/etc`).
    pub fn guest() -> Accounts {
        Accounts::load(Path::new(ETC))
    }

    /// Parses the two files' text. Malformed lines are skipped.
    pub fn parse(passwd: &str, group: &str) -> Accounts {
        let mut a = Accounts::default();
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || line.starts_with('#') {
                continue;
            }
            let Ok(gid) = f[2].parse::<u32>() else {
                continue;
            };
            a.group_names.entry(gid).or_insert_with(|| f[0].to_string());
            let members = f.get(3).copied().unwrap_or_default();
            a.members.entry(gid).or_default().extend(
                members
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string),
            );
        }
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || line.starts_with('#') || f[0].is_empty() {
                continue;
            }
            let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
                continue;
            };
            a.users.push(User {
                name: f[0].to_string(),
                uid,
                gid,
                groups: Vec::new(),
                home: if f[5].is_empty() { "/" } else { f[5] }.to_string(),
                shell: f[6].to_string(),
            });
        }
        for i in 0..a.users.len() {
            let (name, gid) = (a.users[i].name.clone(), a.users[i].gid);
            let mut groups = vec![gid];
            let mut extra: Vec<u32> = a
                .members
                .iter()
                .filter(|(g, m)| **g != gid && m.contains(&name))
                .map(|(g, _)| *g)
                .collect();
            extra.sort_unstable();
            groups.extend(extra);
            a.users[i].groups = groups;
        }
        a
    }

    /// The account named `name`; `NotFound` on field `user` when there is none.
    pub fn user(&self, name: &str) -> Result<User, ErrorMsg> {
        self.users
            .iter()
            .find(|u| u.name == name)
            .cloned()
            .ok_or_else(|| {
                ErrorMsg::new(
                    ErrorCode::NotFound,
                    Some("user"),
                    format!("user {name} does not exist in the guest's /etc/passwd"),
                )
            })
    }

    /// The name of user id `uid`, or the number.
    pub fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map_or_else(|| uid.to_string(), |u| u.name.clone())
    }

    /// The name of group id `gid`, or the number.
    pub fn group_name(&self, gid: u32) -> String {
        self.group_names
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

/// The account a request acts for: `name`'s, or None (root, as before users
/// existed in the protocol).
pub fn acting(name: Option<&str>) -> Result<Option<User>, ErrorMsg> {
    match name {
        None => Ok(None),
        Some(n) => Accounts::guest().user(n).map(Some),
    }
}

fn bad(field: &str, msg: impl Into<String>) -> ErrorMsg {
    ErrorMsg::new(ErrorCode::BadRequest, Some(field), msg)
}

/// A request's path made absolute: a relative path is joined to `user`'s
/// home and cleaned lexically (`.` and `..`, as Go's `filepath.Join` does);
/// with no user it is refused. An absolute path is used as given (the
/// kernel resolves its `..` through symlinks as it always did).
pub fn resolve(field: &str, path: &str, user: Option<&User>) -> Result<PathBuf, ErrorMsg> {
    if path.is_empty() {
        return Err(bad(field, format!("{field} is empty")));
    }
    if path.contains('\0') {
        return Err(bad(field, format!("{field} {path:?} contains a NUL byte")));
    }
    if path.len() > MAX_PATH {
        return Err(bad(
            field,
            format!("{field} is longer than {MAX_PATH} bytes"),
        ));
    }
    if path.starts_with('/') {
        return Ok(PathBuf::from(path));
    }
    let joined = {
        match user {
            Some(u) => Path::new(&u.home).join(path),
            None => {
                return Err(bad(
                    field,
                    format!("{field} {path:?} is not absolute (and no user names a home)"),
                ))
            }
        }
    };
    Ok(normalize(&joined))
}

/// `p` with `.` and `..` resolved lexically (`..` at `/` stays at `/`).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
user:x:1000:1000::/home/user:/bin/bash
broken:x:notanumber:1::/:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";
    const GROUP: &str = "root:x:0:
sudo:x:27:user,other
user:x:1000:
docker:x:999:user
nogroup:x:65534:
";

    #[test]
    fn users_get_their_primary_and_supplementary_groups() {
        let a = Accounts::parse(PASSWD, GROUP);
        let u = a.user("user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, [1000, 27, 999]);
        assert_eq!(
            (u.home.as_str(), u.shell.as_str()),
            ("/home/user", "/bin/bash")
        );
        assert_eq!(a.user("root").unwrap().groups, [0]);
        let e = a.user("broken").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::NotFound, Some("user"))
        );
        assert!(a.user("ghost").unwrap_err().error.contains("ghost"));
        assert_eq!(a.user_name(65534), "nobody");
        assert_eq!(a.user_name(4242), "4242");
        assert_eq!(a.group_name(27), "sudo");
        assert_eq!(a.group_name(4242), "4242");
    }

    #[test]
    fn paths_resolve_against_the_users_home() {
        let a = Accounts::parse(PASSWD, GROUP);
        let u = a.user("user").unwrap();
        let r = |p: &str, u: Option<&User>| resolve("path", p, u);
        assert_eq!(
            r("a/b.txt", Some(&u)).unwrap(),
            Path::new("/home/user/a/b.txt")
        );
        assert_eq!(r("../x", Some(&u)).unwrap(), Path::new("/home/x"));
        assert_eq!(r("/etc/hosts", Some(&u)).unwrap(), Path::new("/etc/hosts"));
        assert_eq!(r("/a/../b", None).unwrap(), Path::new("/a/../b"));
        assert_eq!(normalize(Path::new("/../..")), Path::new("/"));
        assert_eq!(r(".", Some(&u)).unwrap(), Path::new("/home/user"));
        for (p, user) in [("rel", None), ("", Some(&u)), ("/a\0b", Some(&u))] {
            let e = r(p, user).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                (ErrorCode::BadRequest, Some("path"))
            );
        }
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert!(r(&long, None).is_err());
    }
}
