//! Who a process runs as: user names and groups from the guest's own `/etc/passwd` and
//! `/etc/group` (plain files; no NSS, which a static agent cannot load anyway).

use std::path::Path;

/// The identity a child switches to before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    /// From the passwd entry, when there is one.
    pub name: Option<String>,
    pub home: Option<String>,
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(etc: &Path) -> Vec<Passwd> {
    let text = std::fs::read_to_string(etc.join("passwd")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(Passwd { name: f[0].into(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].into() })
        })
        .collect()
}

/// Groups that list `name` as a member.
fn member_groups(etc: &Path, name: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
                return None;
            }
            f[2].parse().ok()
        })
        .collect()
}

/// Resolves `user` (a name, `"uid"` or `"uid:gid"`) and the explicit overrides against the
/// files in `etc`. `Ok(None)`: nothing asked, the child keeps the agent's identity.
pub fn resolve(etc: &Path, user: Option<&str>, uid: Option<u32>, gid: Option<u32>) -> Result<Option<Ids>, String> {
    if user.is_none() && uid.is_none() && gid.is_none() {
        return Ok(None);
    }
    let entries = passwd(etc);
    let mut ids = match user {
        Some("") => return Err("user is empty: give a name or a numeric uid".into()),
        Some(u) if u.bytes().next().is_some_and(|b| b.is_ascii_digit()) => {
            let (uid_s, gid_s) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            let uid: u32 =
                uid_s.parse().map_err(|_| format!("user {u:?}: give a name, \"uid\" or \"uid:gid\" in digits"))?;
            let entry = entries.iter().find(|p| p.uid == uid);
            let gid = match gid_s {
                Some(g) => g.parse().map_err(|_| format!("user {u:?}: the gid is not a number"))?,
                None => entry.map_or(uid, |p| p.gid),
            };
            Ids { uid, gid, groups: vec![], name: entry.map(|p| p.name.clone()), home: entry.map(|p| p.home.clone()) }
        }
        Some(name) => {
            let p = entries
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| format!("no user {name:?} in the guest's {}", etc.join("passwd").display()))?;
            Ids { uid: p.uid, gid: p.gid, groups: vec![], name: Some(p.name.clone()), home: Some(p.home.clone()) }
        }
        None => {
            // SAFETY: plain syscalls.
            let (cur_uid, cur_gid) = unsafe { (libc::getuid(), libc::getgid()) };
            Ids { uid: cur_uid, gid: cur_gid, groups: vec![], name: None, home: None }
        }
    };
    if let Some(u) = uid {
        ids.uid = u;
    }
    if let Some(g) = gid {
        ids.gid = g;
    }
    ids.groups.push(ids.gid);
    if let Some(name) = &ids.name {
        for g in member_groups(etc, name) {
            if !ids.groups.contains(&g) {
                ids.groups.push(g);
            }
        }
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups() {
        let d = std::env::temp_dir().join(format!("microcell-users-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1001:Bob:/home/bob:/bin/sh\nbroken:line\n",
        )
        .unwrap();
        std::fs::write(d.join("group"), "root:x:0:\nbob:x:1001:\nwheel:x:10:alice,bob\nother:x:11:alice\n").unwrap();
        let r = |u: Option<&str>, uid, gid| resolve(&d, u, uid, gid);
        assert_eq!(r(None, None, None), Ok(None));
        let bob = r(Some("bob"), None, None).unwrap().unwrap();
        assert_eq!(
            (bob.uid, bob.gid, bob.groups.clone(), bob.home.as_deref()),
            (1000, 1001, vec![1001, 10], Some("/home/bob"))
        );
        let n = r(Some("1000"), None, None).unwrap().unwrap();
        assert_eq!((n.uid, n.gid, n.name.as_deref()), (1000, 1001, Some("bob")));
        let n = r(Some("4242:7"), None, None).unwrap().unwrap();
        assert_eq!((n.uid, n.gid, n.groups, n.name), (4242, 7, vec![7], None));
        let n = r(Some("bob"), Some(5), Some(6)).unwrap().unwrap();
        assert_eq!((n.uid, n.gid), (5, 6));
        assert!(r(Some("nobody-here"), None, None).unwrap_err().contains("no user"));
        assert!(r(Some("12x"), None, None).is_err());
        assert!(r(Some(""), None, None).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
