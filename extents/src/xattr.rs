//! Extended attributes stored with the inode.

use crate::access::{self, Creds, MAY_READ, MAY_WRITE};
use crate::error::{FsError, Result};
use crate::filesystem::Fs;
use crate::format::{S_IFDIR, S_IFMT, S_IFREG, Timestamp};
use crate::state::Inode;
use crate::types::Ino;

/// Longest attribute name, as on Linux.
pub const XATTR_NAME_MAX: usize = 255;
/// Largest attribute value, as on Linux.
pub const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Most bytes of names and values one inode may hold.
pub const XATTR_TOTAL_MAX: usize = 256 * 1024;

/// setxattr flags.
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

/// Names under this prefix are views computed by the daemon, never stored, except the
/// owner policies below.
pub const RESERVED_PREFIX: &[u8] = b"user.nearfs.";

/// Stored attributes under the reserved prefix by which a file's owner (or root) sets a
/// policy for it; nobody else may set or remove them, whatever the file's mode.
pub const OWNER_POLICIES: &[&[u8]] = &[b"user.nearfs.offload"];

/// May `cr` set or remove `name` on `i`?
fn check_set(cr: &Creds, i: &Inode, name: &[u8]) -> Result<()> {
    if OWNER_POLICIES.contains(&name) {
        return if cr.is_root() || cr.uid == i.uid {
            Ok(())
        } else {
            Err(FsError::NotPermitted)
        };
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(FsError::NotPermitted);
    }
    check(cr, i, name, MAY_WRITE)
}

enum Namespace {
    User,
    Trusted,
    Security,
}

fn namespace(name: &[u8]) -> Result<Namespace> {
    if name.len() > XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    let prefixes: [(&[u8], Namespace); 3] = [
        (b"user.", Namespace::User),
        (b"trusted.", Namespace::Trusted),
        (b"security.", Namespace::Security),
    ];
    for (prefix, ns) in prefixes {
        if let Some(rest) = name.strip_prefix(prefix) {
            if rest.is_empty() || rest.contains(&0) {
                return Err(FsError::Invalid("xattr name"));
            }
            return Ok(ns);
        }
    }
    Err(FsError::Unsupported("xattr namespace"))
}

/// Checks access to the attribute `name` of `i` for `want` (MAY_READ or MAY_WRITE).
fn check(cr: &Creds, i: &Inode, name: &[u8], want: u32) -> Result<()> {
    match namespace(name)? {
        Namespace::Trusted if !cr.is_root() => Err(FsError::NotPermitted),
        Namespace::User => {
            // user.* is for regular files and directories only (as on Linux).
            let kind = i.mode & S_IFMT;
            if kind != S_IFREG && kind != S_IFDIR {
                return Err(if want == MAY_READ {
                    FsError::NoAttribute
                } else {
                    FsError::NotPermitted
                });
            }
            if access::permits(cr, i.owner(), want) {
                Ok(())
            } else {
                Err(FsError::AccessDenied)
            }
        }
        Namespace::Security if want == MAY_WRITE && !access::is_owner(cr, i.owner()) => {
            Err(FsError::NotPermitted)
        }
        _ => Ok(()),
    }
}

impl Fs {
    /// Sets attribute `name` (flags: XATTR_CREATE, XATTR_REPLACE).
    pub fn setxattr(
        &self,
        cr: &Creds,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<()> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::ValueTooLarge);
        }
        let mut st = self.table_mut()?;
        let i = st.get(ino)?;
        check_set(cr, i, name)?;
        let exists = i.xattrs.contains_key(name);
        if flags & XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttribute);
        }
        let others: usize = i
            .xattrs
            .iter()
            .filter(|(k, _)| k.as_slice() != name)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if others + name.len() + value.len() > XATTR_TOTAL_MAX {
            return Err(FsError::NoSpace);
        }
        let i = st.get_mut(ino)?;
        i.xattrs.insert(name.to_vec(), value.to_vec());
        i.ctime = Timestamp::now();
        Ok(())
    }

    /// Value of attribute `name`.
    pub fn getxattr(&self, cr: &Creds, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.table();
        let i = st.get(ino)?;
        check(cr, i, name, MAY_READ)?;
        i.xattrs.get(name).cloned().ok_or(FsError::NoAttribute)
    }

    /// Names of the stored attributes `cr` may see.
    pub fn listxattr(&self, cr: &Creds, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let st = self.table();
        let i = st.get(ino)?;
        Ok(i.xattrs
            .keys()
            .filter(|k| cr.is_root() || !k.starts_with(b"trusted."))
            .cloned()
            .collect())
    }

    /// Removes attribute `name`.
    pub fn removexattr(&self, cr: &Creds, ino: Ino, name: &[u8]) -> Result<()> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        let mut st = self.table_mut()?;
        check_set(cr, st.get(ino)?, name)?;
        if !st.get(ino)?.xattrs.contains_key(name) {
            return Err(FsError::NoAttribute);
        }
        let i = st.get_mut(ino)?;
        i.xattrs.remove(name);
        i.ctime = Timestamp::now();
        Ok(())
    }
}
