//! Access checks as pure functions of credentials and inode attributes (POSIX rules).

use crate::format::{S_IFDIR, S_IFMT};

/// Read permission bit.
pub const MAY_READ: u32 = 4;
/// Write permission bit.
pub const MAY_WRITE: u32 = 2;
/// Execute / search permission bit.
pub const MAY_EXEC: u32 = 1;

/// Who is asking: effective uid, gid and supplementary groups of the calling process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Creds {
    /// The superuser.
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// A user with no supplementary groups.
    pub fn user(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            gid,
            groups: Vec::new(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller belongs to `gid` (primary or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The attributes an access decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Whether `cr` may access an inode with `want` (a mask of MAY_*).
///
/// Root passes read and write checks always, and execute checks on directories or when
/// any execute bit is set — as Linux's generic_permission does with CAP_DAC_OVERRIDE.
pub fn permits(cr: &Creds, o: Owner, want: u32) -> bool {
    let want = want & 7;
    if cr.is_root() {
        let is_dir = o.mode & S_IFMT == S_IFDIR;
        return want & MAY_EXEC == 0 || is_dir || o.mode & 0o111 != 0;
    }
    let bits = if cr.uid == o.uid {
        o.mode >> 6
    } else if cr.in_group(o.gid) {
        o.mode >> 3
    } else {
        o.mode
    } & 7;
    bits & want == want
}

/// Whether `cr` may remove or rename `victim` out of directory `dir`: write and search on
/// the directory, and in a sticky directory ownership of the file or the directory.
/// `Err(true)` means a missing permission bit (EACCES), `Err(false)` the sticky rule (EPERM).
pub fn may_delete(cr: &Creds, dir: Owner, victim: Owner) -> Result<(), bool> {
    if !permits(cr, dir, MAY_WRITE | MAY_EXEC) {
        return Err(true);
    }
    let sticky = dir.mode & 0o1000 != 0;
    if sticky && !cr.is_root() && cr.uid != dir.uid && cr.uid != victim.uid {
        return Err(false);
    }
    Ok(())
}

/// Whether `cr` owns the inode or is root (needed for chmod, utimes to a given time, ...).
pub fn is_owner(cr: &Creds, o: Owner) -> bool {
    cr.is_root() || cr.uid == o.uid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::S_IFREG;

    fn file(mode: u32, uid: u32, gid: u32) -> Owner {
        Owner {
            mode: S_IFREG | mode,
            uid,
            gid,
        }
    }

    #[test]
    fn owner_group_other_bits_apply_in_that_order() {
        let o = file(0o604, 10, 20);
        assert!(permits(&Creds::user(10, 99), o, MAY_READ | MAY_WRITE));
        // The group class is chosen, and it has no bits: no fallback to "other".
        assert!(!permits(&Creds::user(11, 20), o, MAY_READ));
        assert!(permits(&Creds::user(12, 30), o, MAY_READ));
        let member = Creds {
            uid: 11,
            gid: 1,
            groups: vec![5, 20],
        };
        assert!(!permits(&member, file(0o004, 10, 20), MAY_READ));
        assert!(permits(&member, file(0o040, 10, 20), MAY_READ));
    }

    #[test]
    fn root_needs_an_exec_bit_to_execute_files_only() {
        assert!(permits(
            &Creds::root(),
            file(0o000, 1, 1),
            MAY_READ | MAY_WRITE
        ));
        assert!(!permits(&Creds::root(), file(0o600, 1, 1), MAY_EXEC));
        assert!(permits(&Creds::root(), file(0o010, 1, 1), MAY_EXEC));
        let dir = Owner {
            mode: S_IFDIR,
            uid: 1,
            gid: 1,
        };
        assert!(permits(&Creds::root(), dir, MAY_EXEC));
    }

    #[test]
    fn sticky_directories_protect_other_users_files() {
        let dir = Owner {
            mode: S_IFDIR | 0o1777,
            uid: 0,
            gid: 0,
        };
        let theirs = file(0o644, 20, 20);
        assert_eq!(may_delete(&Creds::user(10, 10), dir, theirs), Err(false));
        assert_eq!(may_delete(&Creds::user(20, 20), dir, theirs), Ok(()));
        let plain = Owner {
            mode: S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
        };
        assert_eq!(may_delete(&Creds::user(20, 20), plain, theirs), Err(true));
    }
}
